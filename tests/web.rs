//! The status page of `loopsync run --http-addr`, in a real browser: Debian's headless
//! Chromium driven through chromedriver (WebDriver), against the binary, PostgreSQL and the
//! Loops simulator. After two degraded runs (invalid rows), a `run` that follows the schedules
//! serves the page: the sync's status and its charts (one bar per run and series, one point per
//! run) are there, the rejections page asks for the token and shows no key or email before it,
//! a wrong token is refused, and the right one, typed into the form, shows the keys and a
//! record's page.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use loopsync_testkit::{ChromeDriver, Stack, StackOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

const TOKEN: &str = "e2e-status-page-token-0123456789abcdef";
/// Bars per run of the records chart: added, changed, removed, unchanged, invalid, rejected,
/// dead-lettered.
const RECORD_SERIES: usize = 7;
/// Bars per run of the requests chart: requests, retries, rate-limited.
const REQUEST_SERIES: usize = 3;

/// `loopsync run --http-addr 127.0.0.1:0 …` following the schedules, its stderr collected;
/// killed on drop.
struct Serving {
    _child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    /// `http://127.0.0.1:PORT`, as the run said it.
    base: String,
}

impl Serving {
    async fn start(stack: &Stack, token_file: &std::path::Path) -> Serving {
        let token_file = token_file.display().to_string();
        let mut child = stack
            .command(&[
                "run",
                "--http-addr",
                "127.0.0.1:0",
                "--http-token-file",
                &token_file,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start loopsync run");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (address, said) = tokio::sync::oneshot::channel::<String>();
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        tokio::spawn({
            let stderr = stderr.clone();
            async move {
                let mut address = Some(address);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(url) = line.strip_prefix("status page at ")
                        && let Some(address) = address.take()
                    {
                        let _ = address.send(url.trim_end_matches('/').to_owned());
                    }
                    let mut text = stderr.lock().expect("stderr");
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let base = match tokio::time::timeout(Duration::from_secs(30), said).await {
            Ok(Ok(base)) => base,
            _ => panic!(
                "loopsync run did not say where the status page is; its stderr:\n{}",
                stderr.lock().expect("stderr")
            ),
        };
        Serving {
            _child: child,
            stderr,
            base,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }
}

/// The texts of the elements `css` selects.
async fn texts(client: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for element in client.find_all(Locator::Css(css)).await.expect(css) {
        out.push(element.text().await.expect("an element's text"));
    }
    out
}

async fn count(client: &Client, css: &str) -> usize {
    client.find_all(Locator::Css(css)).await.expect(css).len()
}

/// Types `token` into the sign-in form and submits it; waits for the next page.
async fn sign_in(client: &Client, token: &str, then: &str) {
    let input = client
        .find(Locator::Css("form.token input[name=token]"))
        .await
        .expect("the token field");
    input.send_keys(token).await.expect("type the token");
    client
        .form(Locator::Css("form.token"))
        .await
        .expect("the sign-in form")
        .submit()
        .await
        .expect("submit the form");
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(then))
        .await
        .unwrap_or_else(|e| panic!("{then} after signing in: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_real_browser() {
    let Some(driver) = ChromeDriver::start().await else {
        return;
    };
    let Some(stack) = Stack::start(StackOptions {
        rows: 6,
        extra_sync: "schedule = \"0 3 * * *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // Two runs, each degraded by the same two invalid rows.
    stack
        .sql(
            "UPDATE users SET email = NULL WHERE id = 2;
             UPDATE users SET email = 'not-an-email' WHERE id = 3;",
        )
        .await;
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 3, "{}", first.stderr);
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 4;")
        .await;
    let second = stack.run_once(&[]).await;
    assert_eq!(second.status, 3, "{}", second.stderr);
    let second_id = second.run()["id"].as_i64().unwrap();

    let token_file = stack.dir.join("status-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let serving = Serving::start(&stack, &token_file).await;

    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(driver.capabilities())
        .connect(&driver.url)
        .await
        .expect("a WebDriver session of headless Chromium");
    let result = browse(&client, &serving.base, second_id).await;
    let _ = client.close().await;
    if let Err(e) = result {
        panic!("{e}\n--- loopsync run's stderr:\n{}", serving.stderr());
    }
    drop(serving);
}

/// What the browser sees; an error says what was wrong.
async fn browse(client: &Client, base: &str, last_run: i64) -> Result<(), String> {
    client
        .goto(&format!("{base}/"))
        .await
        .map_err(|e| e.to_string())?;
    let section = "section[data-sync=\"users\"]";
    let last = texts(client, &format!("{section} dd.last-run")).await;
    let expected = format!("run {last_run} · degraded");
    if !last.first().is_some_and(|t| t.starts_with(&expected)) {
        return Err(format!("the last run: {last:?}, not {expected:?}"));
    }
    let schedule = texts(client, &format!("{section} dd.schedule")).await;
    if !schedule
        .first()
        .is_some_and(|t| t.starts_with("0 3 * * * · next run ") && t.ends_with("T03:00:00.000Z"))
    {
        return Err(format!("the schedule: {schedule:?}"));
    }
    let pending = texts(client, &format!("{section} dd.pending")).await;
    if !pending
        .first()
        .is_some_and(|t| t.starts_with("2 records · to retry 2 (invalid 2"))
    {
        return Err(format!("pending: {pending:?}"));
    }
    let why = texts(client, &format!("{section} dd.degraded li")).await;
    if why.len() != 2 || !why.iter().all(|w| w.starts_with("1 invalid: ")) {
        return Err(format!("why degraded: {why:?}"));
    }
    // The charts: two runs, one bar per run and series, one point per run.
    let runs = 2;
    for (chart, expected) in [
        ("svg.records rect.bar", runs * RECORD_SERIES),
        ("svg.requests rect.bar", runs * REQUEST_SERIES),
        ("svg.durations circle.point", runs),
        // Two kinds of reason (no email, a malformed email), in each run.
        ("svg.reasons rect.bar", runs * 2),
    ] {
        let n = count(client, &format!("{section} {chart}")).await;
        if n != expected {
            return Err(format!("{chart}: {n}, not {expected}"));
        }
    }
    let source = client.source().await.map_err(|e| e.to_string())?;
    if source.contains("@example.com") || source.contains("not-an-email") {
        return Err("the summary shows an email".into());
    }

    // The records: the sign-in form first, and no key, email or reason's record before it.
    client
        .find(Locator::Css(&format!("{section} a.rejections")))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("form.token"))
        .await
        .map_err(|e| format!("no sign-in form: {e}"))?;
    if count(client, "td.key").await != 0 {
        return Err("keys before the token".into());
    }
    let source = client.source().await.map_err(|e| e.to_string())?;
    if source.contains("@example.com") || source.contains("not-an-email") {
        return Err("an email before the token".into());
    }

    // A wrong token is refused.
    sign_in(client, "not-the-token-0123456789", ".wrong-token").await;
    if count(client, "td.key").await != 0 {
        return Err("keys with a wrong token".into());
    }

    // The right one shows the keys, and a record's page.
    sign_in(client, TOKEN, "table.rejections").await;
    let keys = texts(client, "table.rejections td.key").await;
    if keys != ["2", "3"] {
        return Err(format!("the keys: {keys:?}"));
    }
    let url = client.current_url().await.map_err(|e| e.to_string())?;
    if url.path() != "/sync/users/rejections" {
        return Err(format!("signed in, back at {url}, not the rejections"));
    }
    client
        .find(Locator::Css("table.rejections td.key a"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("table.outcomes"))
        .await
        .map_err(|e| format!("no record page: {e}"))?;
    let outcomes = count(client, "table.outcomes tbody tr").await;
    let next = texts(client, "dd.next").await;
    if outcomes != 2
        || !next
            .first()
            .is_some_and(|n| n.starts_with("invalid · none"))
    {
        return Err(format!(
            "record 2: {outcomes} outcomes (not 2), next run {next:?}"
        ));
    }
    Ok(())
}
