//! The tests that measure against a real one-second window: the simulator's rate limit and
//! the rate budget shared by loader processes. Each holds [`loopsync_testkit::serial`] for its
//! whole length; under cargo-nextest (`scripts/test.sh`) the `serial` test group of
//! `.config/nextest.toml` runs them one at a time, with at most three other tests beside.

use loopsync_testkit::{SimProcess, Stack, StackOptions, http_client};

/// The acceptance check of the simulator: 200 concurrent requests at `--rate-limit 10`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_200_at_rate_limit_10() {
    let _alone = loopsync_testkit::serial().await;
    let sim = SimProcess::start(&["--rate-limit", "10"]);
    let client = http_client();
    let url = format!("{}/v1/contacts/find?email=a%40example.com", sim.api());
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client
                    .get(url)
                    .bearer_auth("test-key")
                    .send()
                    .await
                    .unwrap();
                let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                (
                    r.status().as_u16(),
                    header("x-ratelimit-limit"),
                    header("x-ratelimit-remaining"),
                )
            })
        })
        .collect();
    let (mut ok, mut limited) = (0u64, 0u64);
    for call in calls {
        let (status, limit, remaining) = call.await.unwrap();
        assert_eq!(limit.as_deref(), Some("10"));
        assert!(remaining.is_some());
        match status {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("status {other}"),
        }
    }
    let stats = sim.inspect("stats").await;
    assert_eq!(ok + limited, 200);
    assert!(ok >= 10);
    assert_eq!(stats["max_accepted_in_one_second"], 10, "{stats}");
    assert_eq!(stats["rate_limited"], limited);
    assert_eq!(stats["total_requests"], 200);
    assert_eq!(
        stats["by_endpoint"]["GET /v1/contacts/find"]["429"],
        limited
    );
}

/// One rate budget for the team, shared by every loader process: three loaders against a
/// simulated team limit equal to the budget stay within it, where three independent paces
/// would offer three times the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_loaders_share_one_rate_budget() {
    let _alone = loopsync_testkit::serial().await;
    let options = StackOptions {
        rows: 60,
        nats: true,
        sim_rate_limit: 20,
        requests_per_second: 20,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let _extractor = stack.worker("extractor").await;
    let _transformer = stack.worker("transformer").await;
    let _loaders = [
        stack.worker("loader").await,
        stack.worker("loader").await,
        stack.worker("loader").await,
    ];
    let (out, seen) = stack.run_seen(&["--remote"]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.run()["confirmed"], 60);
    assert_eq!(
        seen.answered("PUT /v1/contacts/update", 200),
        60,
        "{seen:?}"
    );
    assert_eq!(stack.contacts().await.len(), 60);
    // Three paces of 20 a second each would offer 60 a second to a limit of 20: about two
    // requests in three refused (some 120 429s for 60 records). One shared budget offers the
    // limit itself, and a request taken late by a loaded process can still meet the odd 429
    // on Loops' sliding window: a few, never a share.
    assert!(seen.rate_limited <= 6, "{seen:?}");
    assert!(seen.to("PUT /v1/contacts/update") <= 66, "{seen:?}");
}

/// Without NATS, processes that share a state share one rate budget per team (kept in the
/// state): a `verify` beside a `run`, against a simulated team limit one request above the budget, stay
/// within it together, where two paces of their own would offer twice the limit and meet 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_beside_a_run_shares_the_budget_without_nats() {
    let _alone = loopsync_testkit::serial().await;
    let options = StackOptions {
        rows: 60,
        // One request of headroom: the budget spaces the times requests are granted, and on
        // a loaded machine one can reach Loops a slot late, beside the next (a 429 once, in
        // CI); budgets of their own would send beside the run's full pace, well beyond it.
        sim_rate_limit: 11,
        requests_per_second: 10,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    // Half the rows change: the run writes 30, verify reads the 30 others back.
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id <= 30")
        .await;
    let before = stack.sim.seen().await;
    let mut run = stack.command(&["run", "--once", "--json"]);
    let mut verify = stack.command(&["verify", "--sample", "all", "--json"]);
    let (run, verify) = tokio::join!(
        loopsync_testkit::output_within(&mut run, loopsync_testkit::COMMAND_DEADLINE, "run --once"),
        loopsync_testkit::output_within(
            &mut verify,
            loopsync_testkit::COMMAND_DEADLINE,
            "verify --sample all"
        ),
    );
    let seen = stack.sim.seen().await.since(&before);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(seen.to("PUT /v1/contacts/update"), 30, "{seen:?}");
    assert_eq!(seen.to("GET /v1/contacts/find"), 30, "{seen:?}");
    let stats = stack.sim.inspect("stats").await;
    assert!(
        seen.rate_limited == 0,
        "one budget for both: {seen:?} {stats}"
    );
}

/// Without NATS, an `adopt` and a `check` beside a `run` take their requests to Loops (adopt
/// asks the key's team; check asks it and lists the properties and mailing lists) from the
/// team's budget kept in the state, as the run does: against a simulated team limit one above
/// the budget, none of them meets a 429, where budgets of their own would send beside the
/// run's full pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopt_and_a_check_beside_a_run_share_the_budget() {
    let _alone = loopsync_testkit::serial().await;
    let options = StackOptions {
        rows: 80,
        events: Some(20),
        // One request of headroom: the budget spaces the times requests are granted, and on
        // a loaded machine one can reach Loops a slot late, beside the next (a 429 once, in
        // CI); budgets of their own would send beside the run's full pace, well beyond it.
        sim_rate_limit: 11,
        requests_per_second: 10,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let before = stack.sim.seen().await;
    let mut run = stack.command(&["run", "--once", "--sync", "users", "--json"]);
    let beside = async {
        // Once the run sends at the budget's pace.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let mut outputs = Vec::new();
        for args in [
            &["adopt", "--sync", "events"][..],
            &["check"],
            &["adopt", "--sync", "events"],
            &["check"],
            &["adopt", "--sync", "events"],
        ] {
            outputs.push((args.join(" "), stack.output(args).await));
        }
        outputs
    };
    let (run, beside) = tokio::join!(
        loopsync_testkit::output_within(&mut run, loopsync_testkit::COMMAND_DEADLINE, "run --once"),
        beside
    );
    let seen = stack.sim.seen().await.since(&before);
    let stats = stack.sim.inspect("stats").await;
    assert!(
        seen.rate_limited == 0,
        "one budget for all: {seen:?} {stats}"
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for (what, out) in &beside {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        seen.answered("PUT /v1/contacts/update", 200),
        80,
        "{seen:?}"
    );
    // The run's, and each adopt's and check's.
    assert_eq!(seen.to("GET /v1/api-key"), 6, "{seen:?}");
}
