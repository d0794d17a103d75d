//! The tests that measure against a real one-second window: the simulator's rate limit and
//! the rate budget shared by loader processes. Each holds [`loopsync_testkit::serial`] for its
//! whole length, and this binary holds nothing else, so none runs beside another test.

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
