//! The status page over real HTTP on loopback, against an SQLite state: headers, the host
//! check, the token gate, escaping, and the header read timeout.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use loopsync_core::envelope::{Outcome, OutcomeStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::COOKIE_NAME;
use super::*;

const TOKEN: &str = "a-token-of-the-test-0123456789";

/// A state with one sync, `users`, and one degraded run whose invalid record's key is markup.
struct Page {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(token: bool, header_read_timeout: Duration) -> Page {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    std::fs::File::create(&db).unwrap();
    let config = loopsync_config::Config::parse(
        &format!(
            "[warehouse]\nurl = \"sqlite://{}\"\n\n[loops]\napi_key = \"k\"\n\n[[sync]]\n\
             name = \"users\"\nmodel = \"select id, email from users\"\nprimary_key = \"id\"\n\
             identify_by = \"email\"\n\n[sync.mapping]\nemail = \"email\"\n",
            db.display()
        ),
        |_| None,
    )
    .unwrap();
    let warehouse = loopsync_engine::state::open(&config).await.unwrap();
    let run = warehouse.create_run("users").await.unwrap();
    let invalid = Outcome::new(
        "users",
        run,
        "<script>x</script>",
        "",
        OutcomeStatus::Invalid,
        "none",
    )
    .with_reason("no email: the contact is identified by email");
    warehouse.record_outcomes(&[invalid]).await.unwrap();
    // A run's error may quote a value or an email.
    warehouse
        .fail_run(run, "the model failed near 'ann@example.com'")
        .await
        .unwrap();
    let auth = if token {
        let path = dir.path().join("token");
        std::fs::write(&path, TOKEN).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Auth::from_file(&path).unwrap()
    } else {
        Auth::none()
    };
    let app = Arc::new(App {
        warehouse,
        syncs: config.syncs.clone(),
        auth,
        loopback: true,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, router(app), header_read_timeout));
    Page { addr, _dir: dir }
}

/// One request on a fresh connection (`head` after the request line), and the whole answer.
async fn ask(addr: SocketAddr, line: &str, head: &str, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{line} HTTP/1.1\r\nConnection: close\r\n{head}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

fn host(addr: SocketAddr) -> String {
    format!("Host: {addr}\r\n")
}

/// The status page answers with the security headers, and only to a loopback host name.
#[tokio::test]
async fn every_answer_forbids_scripts_framing_and_caching() {
    let page = start(false, Duration::from_secs(10)).await;
    let answer = ask(page.addr, "GET /", &host(page.addr), "").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    for header in [
        "content-security-policy: default-src 'none'; style-src 'self'",
        "x-frame-options: DENY",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
        "content-type: text/html; charset=utf-8",
    ] {
        assert!(answer.contains(header), "{header} in {answer}");
    }
    assert!(
        !answer.contains("<script"),
        "no script, and no key: {answer}"
    );
    assert!(
        !answer.contains("ann@example.com") && answer.contains("an error, shown with the token"),
        "no run error without the token: {answer}"
    );
    assert!(answer.contains("data-sync=\"users\""), "{answer}");
    for name in ["localhost:1", "[::1]:8080", "127.0.0.2"] {
        let ok = ask(page.addr, "GET /health", &format!("Host: {name}\r\n"), "").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{name}: {ok}");
    }
    let elsewhere = ask(page.addr, "GET /", "Host: rebound.example:80\r\n", "").await;
    assert!(elsewhere.starts_with("HTTP/1.1 421"), "{elsewhere}");
    assert!(elsewhere.contains("x-frame-options: DENY"), "{elsewhere}");
}

/// A page of records asks for the token: a wrong one is refused, the right one (or the session
/// it gives) shows the records, escaped.
#[tokio::test]
async fn records_are_shown_only_with_the_token() {
    let page = start(true, Duration::from_secs(10)).await;
    let h = host(page.addr);
    let gated = ask(page.addr, "GET /sync/users/rejections", &h, "").await;
    assert!(gated.starts_with("HTTP/1.1 401"), "{gated}");
    assert!(gated.contains("name=\"token\""), "{gated}");
    assert!(
        !gated.contains("script"),
        "no key before the token: {gated}"
    );

    let form = "application/x-www-form-urlencoded";
    let wrong = ask(
        page.addr,
        "POST /login",
        &format!("{h}Content-Type: {form}\r\n"),
        "token=wrong-token-000000000000&next=%2Fsync%2Fusers%2Frejections",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(
        wrong.contains("That is not the token") && !wrong.contains("set-cookie"),
        "{wrong}"
    );

    let right = ask(
        page.addr,
        "POST /login",
        &format!("{h}Content-Type: {form}\r\n"),
        &format!("token={TOKEN}&next=%2Fsync%2Fusers%2Frejections"),
    )
    .await;
    assert!(right.starts_with("HTTP/1.1 303"), "{right}");
    assert!(
        right.contains("location: /sync/users/rejections"),
        "{right}"
    );
    let cookie = right
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is not the token: {cookie}"
    );
    let session = cookie.split(';').next().unwrap();

    let shown = ask(
        page.addr,
        "GET /sync/users/rejections",
        &format!("{h}Cookie: {session}\r\n"),
        "",
    )
    .await;
    assert!(shown.starts_with("HTTP/1.1 200"), "{shown}");
    assert!(
        shown.contains("&lt;script&gt;x&lt;/script&gt;"),
        "the key, escaped: {shown}"
    );
    assert!(!shown.contains("<script>"), "{shown}");
    assert!(
        shown.contains("/record/users/%3Cscript%3Ex%3C%2Fscript%3E"),
        "{shown}"
    );
    let forged = ask(
        page.addr,
        "GET /sync/users/rejections",
        &format!("{h}Cookie: {COOKIE_NAME}=0123456789abcdef\r\n"),
        "",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 401"), "{forged}");
    let bearer = ask(
        page.addr,
        "GET /sync/users/rejections",
        &format!("{h}Authorization: Bearer {TOKEN}\r\n"),
        "",
    )
    .await;
    assert!(bearer.starts_with("HTTP/1.1 200"), "{bearer}");
    let index = ask(
        page.addr,
        "GET /",
        &format!("{h}Authorization: Bearer {TOKEN}\r\n"),
        "",
    )
    .await;
    assert!(
        index.contains("the model failed near &#39;ann@example.com&#39;"),
        "{index}"
    );
    // A redirect after sign-in never leaves the site.
    let away = ask(
        page.addr,
        "POST /login",
        &format!("{h}Content-Type: {form}\r\n"),
        &format!("token={TOKEN}&next=%2F%2Fevil.example%2F"),
    )
    .await;
    assert!(away.contains("location: /\r\n"), "{away}");
}

/// Without a token file, no record is shown to anyone.
#[tokio::test]
async fn without_a_token_no_record_is_shown() {
    let page = start(false, Duration::from_secs(10)).await;
    let h = host(page.addr);
    let gated = ask(page.addr, "GET /sync/users/rejections", &h, "").await;
    assert!(gated.starts_with("HTTP/1.1 403"), "{gated}");
    assert!(
        gated.contains("--http-token-file") && !gated.contains("script"),
        "{gated}"
    );
    let login = ask(
        page.addr,
        "POST /login",
        &format!("{h}Content-Type: application/x-www-form-urlencoded\r\n"),
        "token=",
    )
    .await;
    assert!(!login.contains("set-cookie"), "{login}");
}

/// A client that sends half a request and waits is closed once the header read timeout passes.
#[tokio::test]
async fn half_a_request_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let page = start(false, timeout).await;
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(page.addr).await.unwrap();
    stream.write_all(b"GET / HT").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within the timeout")
        .ok();
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).contains("408"),
        "{rest:?}"
    );
    assert!(started.elapsed() >= timeout);
}

/// An address other machines reach needs --http-allow-remote, and then a token file.
#[test]
fn a_remote_address_needs_to_be_allowed_and_a_token() {
    let args = |addr: &str, allow: bool| HttpArgs {
        http_addr: Some(addr.parse().unwrap()),
        http_token_file: None,
        http_allow_remote: allow,
    };
    let refused = args("0.0.0.0:0", false).bind().err().unwrap().to_string();
    assert!(refused.contains("not a loopback address"), "{refused}");
    let no_token = args("0.0.0.0:0", true).bind().err().unwrap().to_string();
    assert!(no_token.contains("needs --http-token-file"), "{no_token}");
    assert!(HttpArgs::default().bind().unwrap().is_none());
}
