//! What loopsync prints for people cannot drive their terminal, nor show a URL's secret: keys
//! and reasons in text output have their control characters escaped, and a NATS URL written
//! with a password or a token is shown redacted in `check --json` and in errors. The `loopsync`
//! binary against PostgreSQL and the simulator, real processes.

use loopsync_testkit::{Stack, StackOptions};

/// Replaces `from` (which must be there) by `to` in the stack's config.
fn edit_config(stack: &Stack, from: &str, to: &str) {
    let text = std::fs::read_to_string(&stack.config).expect("read the config");
    assert!(text.contains(from), "{from} in:\n{text}");
    std::fs::write(&stack.config, text.replace(from, to)).expect("write the config");
}

/// Raw control characters an output must not carry (a line's own `\n` aside).
fn assert_no_control(what: &str, text: &str) {
    let found: Vec<char> = text
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(found.is_empty(), "{what} carries {found:?}:\n{text}");
}

/// A key holding `ESC [31m` and a carriage return, and an email holding `ESC [2J`: `run`,
/// `rejections`, `runs show` and `plan` print them escaped; `--json` keeps them exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_keys_and_reasons_are_escaped() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    edit_config(
        &stack,
        "model = \"select id, email, first_name, plan, seats, signed_up_at, newsletter from users\"",
        "model = \"select id::text || chr(27) || '[31m' || chr(13) as id, \
         case when id = 1 then 'bad' || chr(27) || '[2J' else email end as email, \
         first_name, plan, seats, signed_up_at, newsletter from users\"",
    );
    let key = "1\u{1b}[31m\r";
    let escaped = "1\\u{1b}[31m\\r";

    let run = stack.output(&["run", "--once"]).await;
    assert_eq!(run.status.code(), Some(3), "degraded: one invalid record");
    assert_no_control("run", &String::from_utf8_lossy(&run.stdout));
    assert_no_control("run's stderr", &String::from_utf8_lossy(&run.stderr));

    let rejections = stack.output(&["rejections"]).await;
    let text = String::from_utf8_lossy(&rejections.stdout);
    assert_no_control("rejections", &text);
    assert!(text.contains(escaped), "the key, escaped:\n{text}");

    let runs = stack.output(&["runs", "--json"]).await;
    let run_id = loopsync_testkit::json_data(&runs.stdout).expect("runs JSON")[0]["id"]
        .as_i64()
        .expect("a run id")
        .to_string();
    let show = stack.output(&["runs", "show", &run_id]).await;
    let text = String::from_utf8_lossy(&show.stdout);
    assert_no_control("runs show", &text);
    assert!(text.contains(escaped), "the key, escaped:\n{text}");

    let plan = stack.output(&["plan"]).await;
    let text = String::from_utf8_lossy(&plan.stdout);
    assert_no_control("plan", &text);
    assert!(text.contains(escaped), "the key, escaped:\n{text}");

    // JSON escapes control characters itself: the data stays exact.
    let json = stack.output(&["rejections", "--json"]).await;
    let data = loopsync_testkit::json_data(&json.stdout).expect("rejections JSON");
    assert_eq!(data[0]["key"], key, "{data}");
}

/// A NATS URL with a password or a token: `check --json` and the error of a run that cannot
/// connect show it redacted, never the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_url_is_shown_without_its_secret() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // A port nothing listens on: the connection is refused, and the error names the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut section = String::new();
    for (url, shown) in [
        (
            format!("nats://user:s3cret@127.0.0.1:{port}"),
            format!("nats://user:***@127.0.0.1:{port}"),
        ),
        (
            format!("nats://s3cret@127.0.0.1:{port}"),
            format!("nats://***@127.0.0.1:{port}"),
        ),
    ] {
        let nats = format!("[nats]\nurl = \"{url}\"\n\n[[sync]]");
        if section.is_empty() {
            edit_config(&stack, "[[sync]]", &nats);
        } else {
            edit_config(&stack, &section, &nats);
        }
        section = nats;

        let check = stack.output(&["check", "--json"]).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
        );
        assert!(
            !stdout.contains("s3cret") && !stderr.contains("s3cret"),
            "{stdout}\n{stderr}"
        );
        let data = loopsync_testkit::json_data(&check.stdout).expect("check JSON");
        let error = data["nats"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(&shown), "{url}: {data}");

        let run = stack.output(&["run", "--once"]).await;
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_ne!(run.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
        assert!(stderr.contains(&shown), "{url}: {stderr}");
    }
}
