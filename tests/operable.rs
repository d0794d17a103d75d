//! Operable: what a new user meets. A run that would fail record by record stops before it
//! sends; each mistake is an error that says where; read-only commands write nothing; the
//! `/metrics` scrape, the logs and the help. The `loopsync` binary against PostgreSQL, the
//! simulator and (where said) NATS.

use loopsync_testkit::{Stack, StackOptions};
use reqwest::Method;
use serde_json::json;

/// A mailing list the mapping names and Loops lacks, or a property Loops types otherwise than
/// the mapping declares, would have every record refused: `run` sends nothing of that sync
/// (the other syncs go on), exit 2, with a message that names the key to fix; fixed, the next
/// run sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_sends_nothing_that_loops_would_refuse() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        // A second sync, an event sync that maps no list: it goes on.
        events: Some(3),
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        config.replace(
            "\"cm_news\" = \"newsletter\"",
            "\"cm_missing\" = \"newsletter\"",
        ),
    )
    .unwrap();
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "sync users: nothing sent, every record would be refused by Loops: \
             mailing_lists.\"cm_missing\": Loops has no mailing list with this id"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(seen.to("PUT /v1/contacts/update"), 0, "nothing sent");
    assert_eq!(seen.to("POST /v1/events/send"), 3, "the other sync went on");
    let plan = stack.output(&["plan"]).await;
    assert_eq!(plan.status.code(), Some(0));
    std::fs::write(&stack.config, &config).unwrap();

    // Loops has `seats` as a string; the mapping declares a number.
    stack
        .loops(
            Method::POST,
            "/v1/contacts/properties",
            json!({"name": "seats", "type": "string"}),
        )
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("mapping.seats is declared number, but Loops has the property as string"),
        "{}",
        out.stderr
    );
    assert_eq!(seen.to("PUT /v1/contacts/update"), 0, "nothing sent");

    let fixed = config.replace(
        "seats = { column = \"seats\", type = \"number\" }",
        "seats = { column = \"seats\", type = \"string\" }",
    );
    std::fs::write(&stack.config, fixed).unwrap();
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 5);
}

/// `[nats] token`: a server that asks for a token is reached with it, and refused without
/// it with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token() {
    let Some(server) = loopsync_testkit::nats::NatsServer::start_with_token(Some("s3cret")).await
    else {
        return;
    };
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        nats_url: Some(server.url()),
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "FAIL NATS: cannot connect to NATS at {}",
            server.url()
        )) && text.contains("authorization violation"),
        "{text}"
    );
    let out = stack.run_once(&[]).await;
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("cannot connect to NATS at {}", server.url()))
            && out.stderr.contains("authorization violation"),
        "{}",
        out.stderr
    );
    std::fs::write(
        &stack.config,
        config.replace("ack_wait_seconds", "token = \"s3cret\"\nack_wait_seconds"),
    )
    .unwrap();
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 3);
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        text.contains("ok   NATS reachable, JetStream on (nats-server "),
        "{text}"
    );
}

/// NATS credentials in cleartext to a host that is not loopback are refused before anything
/// connects (exit 2, naming `nats.url` and the ways out), by `check` and `run` alike;
/// `nats.allow_plaintext_credentials = true` lets the config through (`check` then meets the
/// unknown host). Loopback with a token is allowed: `nats_with_a_token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_in_cleartext_are_refused() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let text = std::fs::read_to_string(&stack.config).unwrap();
    let nats = "[nats]\nurl = \"nats://loopsync:s3cret@nats.invalid:4222\"\n";
    let cleartext = stack.dir.join("cleartext.toml");
    std::fs::write(&cleartext, format!("{text}\n{nats}")).unwrap();
    for args in [&["check"][..], &["run", "--once"][..]] {
        let (code, stdout, stderr) = with_config(&stack, &cleartext, args).await;
        assert_eq!(code, Some(2), "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(
                "nats.url: the credentials in nats.url would cross the network in cleartext to \
                 nats.invalid: use a tls:// url (or nats.tls_ca), or set \
                 nats.allow_plaintext_credentials = true if the network is trusted"
            ),
            "{args:?}: {stderr}"
        );
    }
    let allowed = stack.dir.join("allowed.toml");
    std::fs::write(
        &allowed,
        format!("{text}\n{nats}allow_plaintext_credentials = true\n"),
    )
    .unwrap();
    let line = check_line(&stack, &allowed, "NATS").await;
    assert!(line.starts_with("FAIL NATS: cannot connect"), "{line}");
}

/// Runs `loopsync ARGS --config CONFIG` with the stack's key, to its end.
async fn with_config(
    stack: &Stack,
    config: &std::path::Path,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let out = loopsync_testkit::output_within(
        tokio::process::Command::new(loopsync_testkit::loopsync_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .env("LOOPS_API_KEY", "test-key")
            .env_remove("LOOPSYNC_LOG"),
        loopsync_testkit::COMMAND_DEADLINE,
        &format!("loopsync {}", args.join(" ")),
    )
    .await;
    let _ = stack;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `loopsync check` with `config` fails (exit 1); its first line that contains `needle`.
async fn check_line(stack: &Stack, config: &std::path::Path, needle: &str) -> String {
    let (code, stdout, stderr) = with_config(stack, config, &["check"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    stdout
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle}: {stdout}"))
        .to_owned()
}

/// The stack's config with `from` replaced by `to`, in a file of its own.
fn config_with(stack: &Stack, name: &str, from: &str, to: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&stack.config).unwrap();
    assert!(text.contains(from), "the config has {from}");
    let path = stack.dir.join(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

/// Each mistake of a new user is said where it is: the mapping key of a missing column, the
/// model's own words and position for a typo, the URL of a Loops not reached (not blamed on
/// the key), the host of a warehouse down, the valid types of a mapping; a config error exits
/// 2 before anything is checked. The messages are printed for the closing note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_mistake_says_where_it_is() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        // A Loops that is not there is tried twice, not ten times.
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut said = Vec::new();

    let column = config_with(
        &stack,
        "column.toml",
        "firstName = \"first_name\"",
        "firstName = \"firstname\"",
    );
    let line = check_line(&stack, &column, "missing from the model").await;
    assert!(
        !line.contains("does not run")
            && line.contains(
                "sync users: a column is missing from the model: \
             mapping.firstName names the column \"firstname\", which the model does not return; \
             the model's columns are: id, email, first_name, plan, seats, signed_up_at, newsletter"
            ),
        "{line}"
    );
    said.push(("a mapped column that does not exist (check)", line));
    let (code, _, stderr) = with_config(&stack, &column, &["plan"]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("mapping.firstName names the column \"firstname\""),
        "{stderr}"
    );
    said.push(("the same (plan)", stderr.trim().to_owned()));

    let typo = config_with(
        &stack,
        "typo.toml",
        "model = \"select id,",
        "model = \"selec id,",
    );
    let line = check_line(&stack, &typo, "does not run").await;
    assert!(
        line.contains("syntax error at or near \"selec\" at character 1: \"selec id, email")
            && line.contains("(the model as written)"),
        "{line}"
    );
    said.push(("a model with `selec`", line));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = stack.sim.api();
    let down = config_with(
        &stack,
        "loops-down.toml",
        &api,
        &format!("http://127.0.0.1:{port}/api"),
    );
    let line = check_line(&stack, &down, "FAIL Loops").await;
    assert!(
        line.starts_with(&format!(
            "FAIL Loops: transport error: cannot reach Loops at http://127.0.0.1:{port}"
        )) && line.contains("Connection refused"),
        "{line}"
    );
    said.push(("the simulator not running", line));

    let url = stack.warehouse.url();
    let without_port = url
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap()
        .to_owned();
    let wh_down = config_with(
        &stack,
        "wh-down.toml",
        &without_port,
        &format!("127.0.0.1:{port}"),
    );
    let line = check_line(&stack, &wh_down, "FAIL warehouse").await;
    assert!(
        line.contains(&format!("PostgreSQL at 127.0.0.1:{port} (user "))
            && line.contains("Connection refused"),
        "{line}"
    );
    said.push(("the warehouse down", line));

    for (what, from, to, says) in [
        (
            "type = \"datetime\"",
            "type = \"date\"",
            "type = \"datetime\"",
            "sync \"users\".mapping.signedUpAt: type: unknown variant `datetime`, expected one of `string`, `number`, `boolean`, `date`",
        ),
        (
            "a warehouse URL without its scheme",
            &url,
            "127.0.0.1:5432/test",
            "warehouse.url: \"127.0.0.1:5432/test\" is not a warehouse URL",
        ),
        (
            "a PostgreSQL URL that does not parse",
            &url,
            "postgres://u@127.0.0.1:notaport/test",
            "warehouse.url: not a PostgreSQL URL (postgres://user:password@host:port/database)",
        ),
        (
            "an SQLite file that does not exist",
            &url,
            "sqlite:///nowhere/loopsync-missing.db",
            "warehouse.url: /nowhere/loopsync-missing.db: no such file",
        ),
        (
            "an empty API key",
            "api_key = \"${LOOPS_API_KEY}\"",
            "api_key = \"\"",
            "loops.api_key: the API key is empty",
        ),
        (
            "on_remove with upsert",
            "behavior = \"upsert\"",
            "behavior = \"upsert\"\non_remove = \"unsubscribe\"",
            "sync \"users\".on_remove: is for mirror syncs only",
        ),
    ] {
        let path = config_with(&stack, "mistake.toml", from, to);
        for command in ["check", "run"] {
            let args: &[&str] = if command == "run" {
                &["run", "--once"]
            } else {
                &["check"]
            };
            let (code, stdout, stderr) = with_config(&stack, &path, args).await;
            assert_eq!(code, Some(2), "{what}, {command}: {stdout}{stderr}");
            assert!(stderr.contains(says), "{what}, {command}: {stderr}");
            assert!(
                !stdout.contains("ok  "),
                "{what}: nothing is said ok before: {stdout}"
            );
            if command == "check" {
                said.push((what, stderr.trim().to_owned()));
            }
        }
    }
    assert!(
        !std::path::Path::new("/nowhere/loopsync-missing.db").exists(),
        "no SQLite file is made"
    );
    for (what, message) in &said {
        eprintln!("MISTAKE {what}:\n    {message}");
    }
}

/// Commands that only read create nothing: on a fresh database, `plan` (every row new),
/// `runs`, `rejections`, `status`, `record`, `dlq list` and `check` leave no state schema
/// behind. A user that
/// may only read the model: `check` says which privilege the state lacks; `plan` and `runs`
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_write_nothing() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 4,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let schemas = "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'loopsync'";
    let plan = stack.output(&["plan", "--json"]).await;
    assert_eq!(
        plan.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let data = loopsync_testkit::json_data(&plan.stdout).unwrap();
    assert_eq!(data[0]["counts"]["added"], 4, "{data}");
    for args in [
        &["runs"][..],
        &["rejections"],
        &["dlq", "list"],
        &["check"],
        &["runs", "--json"],
        &["status", "--json"],
        &["record", "--sync", "users", "1", "--json"],
    ] {
        let out = stack.output(args).await;
        assert!(
            out.status.code() == Some(0) || (args == ["check"] && out.status.code() == Some(1)),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(stack.count(schemas).await, 0, "nothing made by reading");

    // A user that may read the model and nothing else.
    let role = loopsync_testkit::unique("ro_");
    let role = role.replace('-', "_");
    let db = stack.warehouse.url().rsplit('/').next().unwrap().to_owned();
    stack
        .sql(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT ON users TO {role}; \
             REVOKE CREATE ON DATABASE \"{db}\" FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        ))
        .await;
    let url = stack.warehouse.url();
    let user = url
        .split("://")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let reader = config_with(
        &stack,
        "reader.toml",
        &format!("://{user}"),
        &format!("://{role}"),
    );
    let (code, stdout, stderr) = with_config(&stack, &reader, &["check"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "FAIL privileges: user {role} may not create the state's schema loopsync in database {db}: GRANT CREATE ON DATABASE {db} TO {role}"
        )),
        "{stdout}"
    );
    eprintln!(
        "MISTAKE a user that may only read the model (check):\n    {}",
        stdout
            .lines()
            .find(|l| l.contains("privileges"))
            .unwrap_or_default()
    );
    let (code, stdout, stderr) = with_config(&stack, &reader, &["plan"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("added 4"), "{stdout}");
    let (code, stdout, stderr) = with_config(&stack, &reader, &["runs"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // Made by a user that may, and granted: the reader's check passes the privileges.
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    stack
        .sql(&format!(
            "GRANT USAGE ON SCHEMA loopsync TO {role}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA loopsync TO {role}"
        ))
        .await;
    let (_, stdout, _) = with_config(&stack, &reader, &["check"]).await;
    assert!(
        stdout.contains(&format!(
            "FAIL privileges: user {role} lacks what the state needs: "
        )),
        "{stdout}"
    );
    let (code, stdout, stderr) = with_config(&stack, &reader, &["runs", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        loopsync_testkit::json_data(stdout.as_bytes())
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    stack
        .sql(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA loopsync TO {role}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA loopsync TO {role}"
        ))
        .await;
    let (_, stdout, _) = with_config(&stack, &reader, &["check"]).await;
    assert!(
        stdout.contains("ok   the warehouse user may make and write the state"),
        "{stdout}"
    );
    stack
        .sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}

/// `loopsync plan | head -1`: the reader goes away, the command ends without a panic, each
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_is_no_crash() {
    use tokio::io::AsyncBufReadExt;
    let Some(stack) = Stack::start(StackOptions {
        rows: 3000,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    for args in [&["plan", "--json"][..], &["plan", "--show", "3000"]] {
        for _ in 0..3 {
            let mut child = stack
                .command(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = loopsync_testkit::process::collect(child.stderr.take());
            let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
            let first = lines.next_line().await.unwrap();
            assert!(first.is_some());
            drop(lines);
            let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
                .await
                .expect("plan ends")
                .unwrap();
            let stderr = String::from_utf8_lossy(&stderr.await.unwrap()).into_owned();
            assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let demo = loopsync_testkit::output_within(
        tokio::process::Command::new(loopsync_testkit::loopsync_bin())
            .args(["demo", "--users", "0"]),
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync demo --users 0",
    )
    .await;
    assert_eq!(demo.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&demo.stderr).contains("0 is not in 3..=1000000"),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
}

/// `run --metrics-addr` over NATS, following a schedule: the scrape taken while it runs has
/// every series of docs/operations.md, with the requests by endpoint and status, the 429s,
/// the rate budget, the consumers' lag and the diff and run durations; each run ends with a
/// timestamped line on stdout; every series deploy/'s dashboard and alert rules read is in it.
/// The scrape is printed for the closing note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_while_it_runs() {
    use tokio::io::AsyncBufReadExt;
    let Some(stack) = Stack::start(StackOptions {
        rows: 30,
        nats: true,
        extra_sync: "schedule = \"*/2 * * * * *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sim_post(
            "faults",
            json!({"rate_limit_429": 0.2, "seed": 7, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = stack
        .command(&["run", "--metrics-addr", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = loopsync_testkit::process::collect(child.stderr.take());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(" ended: ") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("a scheduled run ends within 60 s");
    // `2026-11-29T10:00:02Z run 1 of sync users ended: succeeded`
    assert!(
        ended.len() > 20
            && ended.as_bytes()[4] == b'-'
            && ended.contains("run 1 of sync users ended: succeeded"),
        "{ended}"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = loopsync_testkit::http_client();
    let url = format!("http://{addr}/metrics");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let scrape = loop {
        let scrape = match client.get(&url).send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        if scrape.contains("loopsync_run_seconds") {
            break scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full scrape within 30 s; last: {scrape}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let _ = child.kill().await;
    let stderr = String::from_utf8_lossy(&stderr.await.unwrap()).into_owned();
    for series in [
        "loopsync_records_total{sync=\"users\",stage=\"extractor\",outcome=\"added\"} 30",
        "loopsync_records_total{sync=\"users\",stage=\"transformer\",outcome=\"operation\"} 30",
        "loopsync_records_total{sync=\"users\",stage=\"loader\",outcome=\"confirmed\"} 30",
        "loopsync_loops_requests_total{endpoint=\"PUT /v1/contacts/update\",status=\"200\"} 30",
        "loopsync_loops_requests_total{endpoint=\"PUT /v1/contacts/update\",status=\"429\"}",
        "loopsync_loops_requests_total{endpoint=\"GET /v1/api-key\",status=\"200\"}",
        "loopsync_loops_rate_limited_total",
        "loopsync_rate_budget_acquired_total",
        "loopsync_rate_budget_per_second 50",
        "loopsync_consumer_pending{consumer=\"loader\"}",
        "loopsync_diff_seconds_bucket{sync=\"users\",le=\"0.05\"}",
        "loopsync_run_seconds_bucket{sync=\"users\",status=\"succeeded\",le=\"+Inf\"}",
    ] {
        assert!(
            scrape.contains(series),
            "{series} in:\n{scrape}\nstderr:\n{stderr}"
        );
    }
    // The counts of requests are Loops' own: the writes (every record was written in the first
    // run; the runs after it find nothing changed) by answer, and the 429s.
    let value = |series: &str| -> u64 {
        scrape
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{scrape}")) as u64
    };
    let seen = stack.sim.seen().await;
    for status in [200, 429] {
        assert_eq!(
            value(&format!(
                "loopsync_loops_requests_total{{endpoint=\"PUT /v1/contacts/update\",status=\"{status}\"}}"
            )),
            seen.answered("PUT /v1/contacts/update", status),
            "writes answered {status}: {seen:?}"
        );
    }
    assert_eq!(
        value("loopsync_loops_rate_limited_total"),
        seen.rate_limited,
        "{seen:?}"
    );
    // Every series the dashboard and the alert rules of deploy/ read is served.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let mut read_by_deploy = 0;
    for file in [
        "deploy/grafana/loopsync.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (at, _) in text.match_indices("loopsync_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let served = scrape.lines().any(|line| {
                line.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            });
            assert!(
                served,
                "{file} reads {name}, which the scrape lacks:\n{scrape}"
            );
            read_by_deploy += 1;
        }
    }
    assert!(
        read_by_deploy >= 10,
        "{read_by_deploy} series read by deploy/"
    );
    eprintln!("SCRAPE\n{scrape}");
}

/// A debug-level run with retries and dead letters, logged as JSON: every line on stderr is
/// one JSON object — the log lines (a line per run start and end, per retry and per dead
/// letter, naming the record by its log key and no NATS subject), and what the text format
/// prints plainly (the metrics address, the destination bound, progress lines, an error);
/// the API key in none of them, nor in a dead letter. Text logs to a pipe carry no colour
/// codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_say_what_happened_and_never_the_key() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 12,
        max_attempts: 2,
        // A run of more than 10 s: a progress line.
        requests_per_second: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let key_file = stack.dir.join("key");
    std::fs::write(&key_file, "test-key\n").unwrap();
    let from_file = config_with(
        &stack,
        "key-file.toml",
        "api_key = \"${LOOPS_API_KEY}\"",
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    stack
        .sim_post(
            "faults",
            json!({"error_503": 0.5, "seed": 3, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = loopsync_testkit::output_within(
        tokio::process::Command::new(loopsync_testkit::loopsync_bin())
            .args([
                "run",
                "--once",
                "--log-format",
                "json",
                "--metrics-addr",
                &metrics,
            ])
            .arg("--config")
            .arg(&from_file)
            .env_remove("LOOPS_API_KEY")
            .env("LOOPSYNC_LOG", "debug"),
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync run --once --log-format json",
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "some dead letters: {stderr}");
    let mut messages = Vec::new();
    let mut objects = Vec::new();
    for line in stderr.lines() {
        assert!(!line.contains("test-key"), "the key in a log line: {line}");
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}\n{stderr}"));
        assert!(object.is_object(), "{line}");
        messages.push(
            object["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        objects.push(object);
    }
    for wanted in [
        "run requested",
        "run finished",
        "retrying a message",
        "dead-lettered: given up and kept with its reason (loopsync dlq list shows it)",
    ] {
        assert!(
            messages.iter().any(|m| m == wanted),
            "{wanted} in {messages:?}"
        );
    }
    for wanted in [
        "metrics at http://",
        "sync users: its state is bound to",
        "run 1 of users: sending",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(wanted)),
            "{wanted} in {messages:?}"
        );
    }
    // A dead letter names its record by its log key, never by a NATS subject (there is none).
    let keys: Vec<String> = (1..=12)
        .map(|k| loopsync_core::keys::log_key("users", &k.to_string()))
        .collect();
    let letters: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| {
            o["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("dead-lettered"))
        })
        .collect();
    assert!(!letters.is_empty());
    for letter in letters {
        let record = letter["fields"]["record"].as_str().unwrap_or_default();
        assert!(keys.iter().any(|k| k == record), "{letter}");
        assert!(letter["fields"].get("subject").is_none(), "{letter}");
    }
    // An error, too, is a JSON object.
    let refused = stack
        .output(&["dlq", "park", "--key", "99999", "--log-format", "json"])
        .await;
    let refused = String::from_utf8_lossy(&refused.stderr).into_owned();
    let error: serde_json::Value = serde_json::from_str(refused.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {refused}"));
    assert_eq!(error["level"], "ERROR", "{error}");
    let letters = stack.output(&["dlq", "list", "--json"]).await;
    let letters = String::from_utf8_lossy(&letters.stdout).into_owned();
    assert!(letters.contains("dead_lettered"), "{letters}");
    assert!(!letters.contains("test-key"));

    let text = loopsync_testkit::output_within(
        stack.command(&["plan"]).env("LOOPSYNC_LOG", "debug"),
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync plan with debug logs",
    )
    .await;
    let text = String::from_utf8_lossy(&text.stderr).into_owned();
    assert!(text.contains("DEBUG"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes in a pipe: {text}"
    );
}

/// Dead letters: `dlq list` tells the parked from the others; `dlq unpark` undoes `park`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_letters_are_shown_and_can_be_unparked() {
    let Some((stack, _)) = Stack::with_dead_letters(StackOptions {
        rows: 3,
        max_attempts: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let parked = stack.output(&["dlq", "park", "--key", "2", "--json"]).await;
    assert_eq!(
        loopsync_testkit::json_data(&parked.stdout).unwrap()["parked"],
        1
    );
    let list = stack.output(&["dlq", "list", "--json"]).await;
    let list = loopsync_testkit::json_data(&list.stdout).unwrap();
    let parked: Vec<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_owned(),
                l["parked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parked,
        [
            ("1".to_owned(), false),
            ("2".to_owned(), true),
            ("3".to_owned(), false)
        ]
    );
    let text = String::from_utf8_lossy(&stack.output(&["dlq", "list"]).await.stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains(" 2 ") && l.contains("parked")),
        "{text}"
    );
    let unparked = stack
        .output(&["dlq", "unpark", "--key", "2", "--json"])
        .await;
    assert_eq!(
        loopsync_testkit::json_data(&unparked.stdout).unwrap()["unparked"],
        1
    );
    stack.sim_post("faults", json!({})).await;
    let (again, seen) = stack.run_seen(&[]).await;
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(
        seen.to("PUT /v1/contacts/update"),
        3,
        "the unparked one is tried again"
    );
}

/// Every `--json` document has the envelope (`version` 1, the command, `data`), and every
/// field any of them prints is defined in docs/json.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_field_is_documented() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 4,
        max_attempts: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md"),
    )
    .unwrap();
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    stack
        .sql("INSERT INTO users (id, email) VALUES (99, 'not-an-email')")
        .await;
    let mut documents = Vec::new();
    for args in [
        &["run", "--once", "--json"][..],
        &["runs", "--json"],
        &["runs", "show", "1", "--json"],
        &["rejections", "--json"],
        &["rejections", "accept", "--key", "99", "--json"],
        &["rejections", "unaccept", "--key", "99", "--json"],
        &["dlq", "list", "--json"],
        &["dlq", "park", "--key", "1", "--json"],
        &["dlq", "unpark", "--key", "1", "--json"],
        &["plan", "--json"],
        &["check", "--json"],
        &["verify", "--json"],
        &["status", "--json"],
        &["record", "--sync", "users", "2", "--json"],
        &["record", "--sync", "users", "99", "--json"],
        &["forget", "--sync", "users", "--key", "2", "--json"],
        &["reset", "--sync", "users", "--yes", "--json"],
        &["adopt", "--json"],
    ] {
        let out = stack.output(args).await;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(doc["version"], 1, "{args:?}");
        let command: Vec<&str> = args
            .iter()
            .copied()
            .take_while(|a| !a.starts_with('-'))
            .filter(|a| a.parse::<i64>().is_err())
            .collect();
        assert_eq!(doc["command"], command.join(" "), "{args:?}");
        documents.push((args, doc["data"].clone()));
    }
    fn keys(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    out.insert(k.clone());
                    // Keys chosen by the user's config: the Loops properties, lists, events.
                    if !matches!(
                        k.as_str(),
                        "properties" | "mailing_lists" | "event_properties"
                    ) {
                        keys(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| keys(i, out)),
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for (args, data) in &documents {
        let mut found = std::collections::BTreeSet::new();
        keys(data, &mut found);
        for key in found {
            if !doc.contains(&format!("`{key}`")) {
                missing.push(format!("{args:?}: {key}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/json.md: {missing:?}");
}

/// The model runs read-only: a model that would write (here `nextval`, a write to a sequence)
/// fails the run at once, not retried, and nothing was written. A model PostgreSQL refuses
/// (a data-modifying WITH inside it) fails too, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_cannot_write() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack.sql("CREATE SEQUENCE hits").await;
    let config = std::fs::read_to_string(&stack.config).unwrap();
    for (model, says) in [
        (
            "model = \"select nextval('hits') AS hit, id,",
            "cannot execute nextval() in a read-only transaction",
        ),
        (
            "model = \"with gone as (delete from users where id = 1 returning id) select id,",
            "data-modifying statement",
        ),
    ] {
        std::fs::write(&stack.config, config.replace("model = \"select id,", model)).unwrap();
        let out = stack.run_once(&[]).await;
        assert_eq!(out.status, 1, "{}", out.stderr);
        let run = out.run();
        assert_eq!(run["status"], "failed", "{run}");
        assert!(
            run["error"].as_str().unwrap_or_default().contains(says),
            "{run}"
        );
    }
    assert_eq!(stack.count("SELECT count(*) FROM users").await, 3);
    assert_eq!(
        stack
            .count("SELECT count(*) FROM hits WHERE is_called")
            .await,
        0,
        "the sequence was not advanced"
    );
}

/// The same on SQLite: before the first run, `plan` reads every row as new and the reading
/// commands leave no table in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_write_nothing_on_sqlite() {
    let Some(stack) = Stack::start(
        StackOptions {
            rows: 4,
            ..StackOptions::default()
        }
        .on(loopsync_testkit::Backend::Sqlite),
    )
    .await
    else {
        return;
    };
    let plan = stack.output(&["plan", "--json"]).await;
    assert_eq!(
        plan.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let data = loopsync_testkit::json_data(&plan.stdout).unwrap();
    assert_eq!(data[0]["counts"]["added"], 4, "{data}");
    for args in [&["runs"][..], &["rejections"], &["dlq", "list"], &["check"]] {
        let out = stack.output(args).await;
        assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}");
    }
    assert_eq!(
        stack
            .count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'loopsync%'")
            .await,
        0
    );
    assert_eq!(stack.run_once(&[]).await.status, 0);
    assert!(
        stack
            .count("SELECT count(*) FROM sqlite_master WHERE name LIKE 'loopsync%'")
            .await
            > 0
    );
}

/// `[nats]` over TLS with a user and password: a server that asks for both is reached with
/// `tls_ca` (the CA that signed its certificate), `user` and `password`; `check` says NATS is
/// reachable. Refused by the certificate check, and said so (not any connection error: a
/// server down or a timeout would fail the test): without the CA, with another CA, and with
/// the right CA under a name the certificate does not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_user() {
    let certs = std::env::temp_dir().join(loopsync_testkit::unique("loopsync-tls-"));
    std::fs::create_dir_all(&certs).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&certs)
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(certs.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    let Some(server) = loopsync_testkit::nats::NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         authorization {{\n  user: \"loopsync\"\n  password: \"s3cret\"\n}}\n",
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    ))
    .await
    else {
        return;
    };
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        nats_url: Some(server.url()),
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let with =
        |lines: &str| config.replace("ack_wait_seconds", &format!("{lines}\nack_wait_seconds"));
    std::fs::write(
        &stack.config,
        with("user = \"loopsync\"\npassword = \"s3cret\""),
    )
    .unwrap();
    let out = stack.run_once(&[]).await;
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert_refused_by_the_certificate(
        &out.stderr,
        &format!("cannot connect to NATS at {}", server.url()),
        "UnknownIssuer",
    );
    std::fs::write(
        &stack.config,
        with(&format!(
            "user = \"loopsync\"\npassword = \"s3cret\"\ntls_ca = \"{}\"",
            certs.join("ca.pem").display()
        )),
    )
    .unwrap();
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 3);
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(text.contains("ok   NATS reachable"), "{text}");
    // A `tls://` url: with the CA, TLS as above; without it, the system's roots, which do not
    // know the test's CA: refused by the certificate check, not sent in cleartext.
    let tls_url = server.url().replace("nats://", "tls://");
    let tls_config = std::fs::read_to_string(&stack.config)
        .unwrap()
        .replace(&server.url(), &tls_url);
    std::fs::write(&stack.config, &tls_config).unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(text.contains("ok   NATS reachable"), "{tls_url}: {text}");
    let without_ca: String = tls_config
        .lines()
        .filter(|l| !l.starts_with("tls_ca"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&stack.config, without_ca).unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert_refused_by_the_certificate(
        &text,
        &format!("FAIL NATS: cannot connect to NATS at {tls_url}"),
        "UnknownIssuer",
    );
    // Another CA (one that did not sign the server's certificate): refused by the check.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=another CA",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
    ]);
    std::fs::write(
        &stack.config,
        tls_config.replace(
            &certs.join("ca.pem").display().to_string(),
            &certs.join("other-ca.pem").display().to_string(),
        ),
    )
    .unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert_refused_by_the_certificate(
        &text,
        &format!("FAIL NATS: cannot connect to NATS at {tls_url}"),
        "UnknownIssuer",
    );
    // The right CA, the server reached as `localhost`: its certificate names 127.0.0.1 only.
    let by_name = tls_url.replace("127.0.0.1", "localhost");
    std::fs::write(&stack.config, tls_config.replace(&tls_url, &by_name)).unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert_refused_by_the_certificate(
        &text,
        &format!("FAIL NATS: cannot connect to NATS at {by_name}"),
        "certificate not valid for name \"localhost\"",
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// `said` says `what` failed because the server's certificate failed the check, for `why`
/// (rustls' words for its `CertificateError`: `UnknownIssuer`, `certificate not valid for
/// name …`): a connection refused, a timeout or a cleartext connection says something else.
fn assert_refused_by_the_certificate(said: &str, what: &str, why: &str) {
    let line = said
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} in:\n{said}"));
    assert!(
        line.contains(&format!("invalid peer certificate: {why}")),
        "refused, but not by the certificate check ({why}): {line}"
    );
}
