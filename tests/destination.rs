//! A sync's state belongs to one Loops: the team of the API key at the API's base URL. Pointed
//! at another Loops, a run (in process, over NATS, `--remote`) and `dlq replay` refuse the sync
//! (exit 2) and send it nothing, until `loopsync reset` (the next run sends every row there) or
//! `loopsync adopt` (the model is recorded as confirmed there). The `loopsync` binary against
//! PostgreSQL, two simulator processes and (where said) NATS, all real processes.

use loopsync_testkit::{COMMAND_DEADLINE, Seen, SimProcess, Stack, StackOptions, output_within};
use serde_json::{Value, json};

/// A second simulated Loops, with the stack's mailing list.
fn another_loops() -> SimProcess {
    SimProcess::start(&["--rate-limit", "100", "--list", "cm_news=Newsletter"])
}

/// Rewrites the config's `base_url` from one API root to another.
fn point_at(stack: &Stack, from: &str, to: &str) {
    let text = std::fs::read_to_string(&stack.config).expect("read the config");
    let (from, to) = (
        format!("base_url = \"{from}\""),
        format!("base_url = \"{to}\""),
    );
    assert!(text.contains(&from), "{from} in:\n{text}");
    std::fs::write(&stack.config, text.replace(&from, &to)).expect("write the config");
}

/// What `sim` received while `f` ran.
async fn seen_by<T>(sim: &SimProcess, f: impl std::future::Future<Output = T>) -> (T, Seen) {
    let before = sim.seen().await;
    let out = f.await;
    (out, sim.seen().await.since(&before))
}

/// The refusal of sync `users`: it names where the state belongs, where the config points,
/// and both ways forward.
fn assert_refused(status: i32, stderr: &str, bound: &str, configured: &str) {
    assert_eq!(status, 2, "{stderr}");
    for part in [
        "sync users: its state belongs to another Loops, so nothing was sent",
        &format!("state confirmed against: {bound}"),
        &format!("the config points at:    {configured}"),
        "loopsync adopt --sync users",
        "loopsync reset --sync users",
    ] {
        assert!(stderr.contains(part), "{part:?} in:\n{stderr}");
    }
}

fn team_at(team: &str, api: &str) -> String {
    format!("team \"{team}\" at {api}")
}

/// Sync to simulator A; point the config at simulator B (same team name, another URL): refused,
/// nothing sent to B; `reset` (without Loops' secrets) → the next run sends every row to B;
/// pointed back at A: refused again until `adopt`, after which a run sends A nothing. State from
/// before bindings existed is bound to the first destination it meets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_refuses_another_loops_until_reset_or_adopt() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        // Once a year: for `loopsync run` without --once, which refuses before it follows.
        extra_sync: "schedule = \"0 0 1 1 *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let a = stack.sim.api();
    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 5);
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.destinations WHERE sync = 'users'")
            .await,
        1
    );

    // State from before bindings existed: bound to the first destination it meets.
    stack.sql("DELETE FROM loopsync.destinations").await;
    let (again, seen) = stack.run_seen(&[]).await;
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(again.run()["unchanged"], 5);
    assert_eq!(seen.writes(), 0, "{seen:?}");
    assert_eq!(
        seen.to("GET /v1/api-key"),
        1,
        "the team, asked once: {seen:?}"
    );
    assert_eq!(
        again.run()["requests_by_kind"]["preflight"],
        3,
        "the team, the property list and the mailing lists: {}",
        again.run()
    );
    assert!(
        again.stderr.contains(&format!(
            "sync users: its state is bound to {} from now on",
            team_at("Simulated Team", &a)
        )),
        "{}",
        again.stderr
    );

    // Pointed at B, an empty Loops with the same team name.
    let sim_b = another_loops();
    let b = sim_b.api();
    point_at(&stack, &a, &b);
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "ok   destination: {}",
            team_at("Simulated Team", &b)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "FAIL sync users: state bound to {} (since ",
            team_at("Simulated Team", &a)
        )),
        "{text}"
    );
    let check = stack.output(&["check", "--json"]).await;
    let report: Value = loopsync_testkit::json_data(&check.stdout).unwrap();
    assert_eq!(report["destination"]["base_url"], b.as_str(), "{report}");
    assert_eq!(report["bindings"][0]["bound_to"]["base_url"], a.as_str());
    assert_eq!(report["bindings"][0]["matches"], false);

    let ((refused, on_a), on_b) = seen_by(&sim_b, seen_by(&stack.sim, stack.run_once(&[]))).await;
    assert_refused(
        refused.status,
        &refused.stderr,
        &team_at("Simulated Team", &a),
        &team_at("Simulated Team", &b),
    );
    assert_eq!(refused.runs, json!([]), "no run was requested");
    assert_eq!(on_b.writes(), 0, "{on_b:?}");
    assert_eq!(
        (on_b.total, on_b.to("GET /v1/api-key")),
        (1, 1),
        "B was only asked for its team: {on_b:?}"
    );
    assert_eq!(on_a.total, 0, "{on_a:?}");
    // Following the schedules: refused before the first fire.
    let (scheduled, on_b) = seen_by(&sim_b, stack.output(&["run"])).await;
    assert_refused(
        scheduled.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&scheduled.stderr),
        &team_at("Simulated Team", &a),
        &team_at("Simulated Team", &b),
    );
    assert_eq!(on_b.writes(), 0, "{on_b:?}");
    assert!(sim_b.contacts().await.is_empty());

    // reset: asks first (stdin is no terminal here: --yes is needed), knows only the config's
    // syncs, and needs the warehouse only.
    let unconfirmed = stack.output(&["reset", "--sync", "users"]).await;
    assert_eq!(unconfirmed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unconfirmed.stderr).contains("--yes"));
    let unknown = stack.output(&["reset", "--sync", "nobody", "--yes"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no sync named \"nobody\""));
    assert_eq!(stack.count("SELECT count(*) FROM loopsync.state").await, 5);
    let reset = output_within(
        stack
            .command(&["reset", "--sync", "users", "--yes", "--json"])
            .env_remove("LOOPS_API_KEY"),
        COMMAND_DEADLINE,
        "loopsync reset without LOOPS_API_KEY",
    )
    .await;
    assert_eq!(
        reset.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let forgot: Value = loopsync_testkit::json_data(&reset.stdout).unwrap();
    assert_eq!(forgot["sync"], "users");
    assert_eq!(forgot["state_records"], 5, "{forgot}");
    assert_eq!(forgot["confirmed_records"], 5, "{forgot}");
    assert_eq!(forgot["destination"]["base_url"], a.as_str(), "{forgot}");
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
            .await,
        0,
        "nothing confirmed is left (each record keeps only its generation)"
    );
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.destinations")
            .await,
        0
    );
    assert_eq!(
        stack.count("SELECT count(*) FROM loopsync.records").await,
        5,
        "the records are history, kept"
    );

    // The next run sends every row to B, and binds the sync there.
    let (sent, on_b) = seen_by(&sim_b, stack.run_once(&[])).await;
    assert_eq!(sent.status, 0, "{}", sent.stderr);
    assert_eq!(sent.run()["added"], 5);
    assert_eq!(on_b.to("PUT /v1/contacts/update"), 5, "{on_b:?}");
    assert_eq!(sim_b.contacts().await.len(), 5);

    // Back at A: refused until adopt; adopt sends nothing, and a run after it neither.
    point_at(&stack, &b, &a);
    let (refused, on_a) = seen_by(&stack.sim, stack.run_once(&[])).await;
    assert_refused(
        refused.status,
        &refused.stderr,
        &team_at("Simulated Team", &b),
        &team_at("Simulated Team", &a),
    );
    assert_eq!(on_a.writes(), 0, "{on_a:?}");
    let (adopted, on_a) = seen_by(&stack.sim, stack.output(&["adopt", "--sync", "users"])).await;
    let text = String::from_utf8_lossy(&adopted.stdout);
    assert!(
        adopted.status.success(),
        "{}",
        String::from_utf8_lossy(&adopted.stderr)
    );
    assert!(
        text.contains(&format!(
            "sync users: its state is bound to {} (it was bound to {}).",
            team_at("Simulated Team", &a),
            team_at("Simulated Team", &b)
        )),
        "{text}"
    );
    assert_eq!(on_a.writes(), 0, "adopt sends nothing: {on_a:?}");
    let (quiet, on_a) = seen_by(&stack.sim, stack.run_once(&[])).await;
    assert_eq!(quiet.status, 0, "{}", quiet.stderr);
    assert_eq!(quiet.run()["unchanged"], 5, "{}", quiet.run());
    assert_eq!(on_a.writes(), 0, "{on_a:?}");
}

/// Over NATS, with B a Loops of another team: `run --once` (stages in process, over NATS),
/// `run --once --remote` (no worker needed: no run is requested) and `dlq replay` all refuse,
/// and B receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_team_is_refused_over_nats() {
    // A fails every contact write: the records are dead-lettered, for `dlq replay` below.
    let Some((stack, first)) = Stack::with_dead_letters(StackOptions {
        rows: 5,
        nats: true,
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let a = stack.sim.api();
    assert_eq!(first.run()["dead_lettered"], 5);

    let sim_b = another_loops();
    let mut settings = sim_b.inspect("settings").await;
    settings["team_name"] = json!("Other Team");
    sim_b.post("settings", settings).await;
    let b = sim_b.api();
    point_at(&stack, &a, &b);
    let bound = team_at("Simulated Team", &a);
    let configured = team_at("Other Team", &b);

    let (refused, on_b) = seen_by(&sim_b, stack.run_once(&[])).await;
    assert_refused(refused.status, &refused.stderr, &bound, &configured);
    assert_eq!(on_b.writes(), 0, "{on_b:?}");
    let (remote, on_b) = seen_by(&sim_b, stack.run_once(&["--remote"])).await;
    assert_refused(remote.status, &remote.stderr, &bound, &configured);
    assert_eq!(on_b.writes(), 0, "{on_b:?}");
    let (replay, on_b) = seen_by(&sim_b, stack.output(&["dlq", "replay", "--json"])).await;
    assert_refused(
        replay.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&replay.stderr),
        &bound,
        &configured,
    );
    assert_eq!(on_b.writes(), 0, "{on_b:?}");
    assert!(sim_b.contacts().await.is_empty());
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.runs WHERE sync = 'users'")
            .await,
        1,
        "no run was requested after the first"
    );
}

/// `loopsync ARGS…` with another API key in `LOOPS_API_KEY`.
async fn with_key(stack: &Stack, key: &str, args: &[&str]) -> std::process::Output {
    output_within(
        stack.command(args).env("LOOPS_API_KEY", key),
        COMMAND_DEADLINE,
        &format!("loopsync {} with another key", args.join(" ")),
    )
    .await
}

/// The fingerprint of the API key the sync's binding keeps.
async fn bound_key(stack: &Stack) -> String {
    stack
        .text("SELECT key_fingerprint FROM loopsync.destinations WHERE sync = 'users'")
        .await
}

/// The simulator restarted empty, on the same URL, with another key and the same team name:
/// by name and URL the same Loops, but the contacts the state says it confirmed are not there.
/// Over NATS, `run --once` and `run --once --remote` both refuse (exit 2) after reading back a
/// few contacts, and send nothing; `check` says so and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loops_restarted_empty_with_another_key_is_refused() {
    let Some(mut stack) = Stack::start(StackOptions {
        rows: 8,
        nats: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(stack.sim.contacts().await.len(), 8);
    let key = bound_key(&stack).await;
    assert_eq!(key.len(), 16, "a fingerprint, not the key: {key}");
    assert!(!key.contains("test-key"));

    stack.sim.restart(&[
        "--api-key",
        "other-key",
        "--rate-limit",
        "100",
        "--list",
        "cm_news=Newsletter",
    ]);
    let api = stack.sim.api();
    let team = team_at("Simulated Team", &api);
    for args in [&["run", "--once"][..], &["run", "--once", "--remote"]] {
        let (refused, seen) = seen_by(&stack.sim, with_key(&stack, "other-key", args)).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_refused(refused.status.code().unwrap_or(-1), &stderr, &team, &team);
        for part in [
            "with another API key (since ",
            "The API key changed, and 5 of the 5 contacts the state says Loops confirmed",
            "point loops.api_key back at the key the state was confirmed with",
        ] {
            assert!(stderr.contains(part), "{part:?} in:\n{stderr}");
        }
        assert_eq!(seen.writes(), 0, "{args:?}: nothing sent: {seen:?}");
        assert_eq!(
            (seen.to("GET /v1/api-key"), seen.to("GET /v1/contacts/find")),
            (1, 5),
            "{args:?}: the team, and five contacts read back: {seen:?}"
        );
        assert_eq!(seen.total, 6, "{seen:?}");
    }
    assert!(stack.sim.contacts().await.is_empty());
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.runs WHERE sync = 'users'")
            .await,
        1,
        "no run was requested"
    );

    // check: says why, reads the same contacts back, changes nothing.
    let check = with_key(&stack, "other-key", &["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "FAIL sync users: state bound to this destination with another API key (since "
        ) && text.contains("and 5 of the 5 confirmed contacts read back are not in Loops"),
        "{text}"
    );
    let check = with_key(&stack, "other-key", &["check", "--json"]).await;
    let report: Value = loopsync_testkit::json_data(&check.stdout).unwrap();
    let binding = &report["bindings"][0];
    assert_eq!(binding["matches"], true, "{report}");
    assert_eq!(binding["key_matches"], false, "{report}");
    assert_eq!(
        binding["read_back"],
        json!({"checked": 5, "missing": 5, "by_id": 0})
    );
    assert_eq!(binding["bound_to"]["key_fingerprint"], key.as_str());
    assert_eq!(bound_key(&stack).await, key, "check changes nothing");
    assert_eq!(stack.sim.seen().await.writes(), 0);
}

/// A key rotated on the same team (the simulator accepts both keys, with its contacts): the
/// run reads a few confirmed contacts back, finds them, keeps the state (nothing re-sent),
/// records the new key and says so once. A binding from before key fingerprints takes the key
/// of its next run without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_on_the_same_team_keeps_the_state() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 8,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let team = SimProcess::start(&[
        "--api-key",
        "test-key",
        "--api-key",
        "rotated-key",
        "--rate-limit",
        "100",
        "--list",
        "cm_news=Newsletter",
    ]);
    point_at(&stack, &stack.sim.api(), &team.api());
    let (first, seen) = seen_by(&team, stack.run_once(&[])).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 8);
    let original = bound_key(&stack).await;

    let notice = "sync users: the API key changed; 5 confirmed contacts were found in Loops with \
                  it (5 by their contact id), so the state is kept and bound to the new key";
    let run_with = |key: &'static str| {
        let stack = &stack;
        async move {
            let out = with_key(stack, key, &["run", "--once", "--json"]).await;
            let report: Value = loopsync_testkit::json_data(&out.stdout).unwrap_or(Value::Null);
            (
                out.status.code().unwrap_or(-1),
                report,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let ((status, report, stderr), seen) = seen_by(&team, run_with("rotated-key")).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stderr.matches(notice).count(), 1, "{stderr}");
    assert_eq!(report[0]["unchanged"], 8, "{report}");
    assert_eq!(seen.writes(), 0, "nothing re-sent: {seen:?}");
    assert_eq!(seen.to("GET /v1/contacts/find"), 5, "{seen:?}");
    assert_eq!(
        report[0]["requests_by_kind"]["preflight"], 8,
        "the team, the properties, the lists and five contacts read back: {report}"
    );
    let rotated = bound_key(&stack).await;
    assert_ne!(rotated, original, "the new key is recorded");

    // Told once: the next run with the new key reads nothing back, says nothing.
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 3")
        .await;
    let ((status, report, stderr), seen) = seen_by(&team, run_with("rotated-key")).await;
    assert_eq!(status, 0, "{stderr}");
    assert!(!stderr.contains("API key changed"), "{stderr}");
    assert_eq!(seen.to("GET /v1/contacts/find"), 0, "{seen:?}");
    assert_eq!(
        (report[0]["changed"].as_i64(), seen.writes()),
        (Some(1), 1),
        "{report}"
    );

    // A binding from before fingerprints were kept: its next run records the key it runs
    // with, reading nothing back and saying nothing.
    stack
        .sql("UPDATE loopsync.destinations SET key_fingerprint = NULL")
        .await;
    let ((status, _, stderr), seen) = seen_by(&team, run_with("test-key")).await;
    assert_eq!(status, 0, "{stderr}");
    assert!(!stderr.contains("API key changed"), "{stderr}");
    assert_eq!(seen.to("GET /v1/contacts/find"), 0, "{seen:?}");
    assert_eq!(bound_key(&stack).await, original);

    // Adopted with the rotated key: the state keeps no contact id (adopt reads none, and the
    // rebinding to another key forgets those it had). A run with the first key again finds the
    // contacts by email alone: kept, with a warning that names the risk; `check` warns alike.
    let adopted = with_key(&stack, "rotated-key", &["adopt"]).await;
    assert!(
        adopted.status.success(),
        "{}",
        String::from_utf8_lossy(&adopted.stderr)
    );
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE contact_id IS NOT NULL")
            .await,
        0
    );
    let check = with_key(&stack, "test-key", &["check", "--json"]).await;
    let report: Value = loopsync_testkit::json_data(&check.stdout).unwrap();
    assert_eq!(
        report["bindings"][0]["read_back"],
        json!({"checked": 5, "missing": 0, "by_id": 0}),
        "{report}"
    );
    let check = with_key(&stack, "test-key", &["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("warn sync users: state bound to this destination with another API key")
            && text.contains("but by their email or userId alone"),
        "{text}"
    );
    let ((status, report, stderr), seen) = seen_by(&team, run_with("test-key")).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(seen.writes(), 0, "nothing re-sent: {seen:?}");
    assert_eq!(report[0]["unchanged"], 8, "{report}");
    assert!(
        stderr.contains(
            "5 confirmed contacts were found in Loops with it, so the state is kept and bound \
             to the new key. warning: they were found by their email or userId alone"
        ),
        "{stderr}"
    );
    assert_eq!(bound_key(&stack).await, original);
}

/// A key rotated on the same team must keep working (above). Here the sync's records were
/// confirmed by contact writes (their contact ids kept), then the sync turned on
/// `trigger_workflows` (no row is re-sent for it) and row 1's email changed: the re-key's write
/// goes through `events/send`, which makes a new contact and answers no contact id, and the
/// confirmation keeps the id of the old contact (`COALESCE` in the state's confirm rule). The
/// read-back of the rotated key reads the most recently confirmed records, with their ids,
/// first: row 1 is found by its email as another contact, counted missing, and the sync is
/// refused as another Loops (exit 2) — on the team that holds every one of its contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_through_events_send_does_not_make_a_rotated_key_look_like_another_team() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let team = SimProcess::start(&[
        "--api-key",
        "test-key",
        "--api-key",
        "rotated-key",
        "--rate-limit",
        "100",
        "--list",
        "cm_news=Newsletter",
    ]);
    point_at(&stack, &stack.sim.api(), &team.api());
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE contact_id IS NOT NULL")
            .await,
        3,
        "each write answered its contact id"
    );

    let text = std::fs::read_to_string(&stack.config).unwrap();
    let anchor = "identify_by = \"email\"\n";
    assert!(text.contains(anchor), "{text}");
    std::fs::write(
        &stack.config,
        text.replacen(anchor, &format!("{anchor}trigger_workflows = true\n"), 1),
    )
    .unwrap();
    stack
        .sql("UPDATE users SET email = 'moved1@example.com' WHERE id = 1")
        .await;
    let (moved, seen) = seen_by(&team, stack.run_once(&[])).await;
    assert_eq!(moved.status, 0, "{}", moved.stderr);
    assert_eq!(seen.to("POST /v1/events/send"), 1, "{seen:?}");
    let contacts = team.contacts().await;
    assert!(contacts.contains_key("moved1@example.com"), "{contacts:#?}");

    let rotated = with_key(&stack, "rotated-key", &["run", "--once", "--json"]).await;
    assert_eq!(
        rotated.status.code(),
        Some(0),
        "the same team, every contact there: {}",
        String::from_utf8_lossy(&rotated.stderr)
    );
}
