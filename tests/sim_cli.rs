//! `loopsync sim` as a user starts it: the binary, a free port, real HTTP.

use loopsync_testkit::{SimProcess, http_client};

/// The acceptance check of the simulator: 200 concurrent requests at `--rate-limit 10`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_200_at_rate_limit_10() {
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

#[tokio::test]
async fn sim_flags_seed_lists_and_properties_and_key() {
    let sim = SimProcess::start(&[
        "--api-key",
        "k-123",
        "--list",
        "cm_news=Newsletter",
        "--property",
        "planName:string",
    ]);
    let client = http_client();
    let lists: serde_json::Value = client
        .get(format!("{}/v1/lists", sim.api()))
        .bearer_auth("k-123")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lists[0]["id"], "cm_news");
    assert_eq!(lists[0]["name"], "Newsletter");
    let props: serde_json::Value = client
        .get(format!("{}/v1/contacts/properties?list=custom", sim.api()))
        .bearer_auth("k-123")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(props[0]["key"], "planName");
    let denied = client
        .get(format!("{}/v1/lists", sim.api()))
        .bearer_auth("test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
}

/// The config the compose stack mounts is one loopsync accepts.
#[test]
fn compose_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/loopsync.toml");
    let text = std::fs::read_to_string(&path).expect("deploy/loopsync.toml");
    let env = |name: &str| match name {
        "LOOPS_API_KEY" => Some("k".to_owned()),
        "LOOPS_BASE_URL" => Some("http://sim:8788/api".to_owned()),
        _ => None,
    };
    let config = loopsync_config::Config::parse(&text, env).expect("a valid config");
    assert_eq!(config.nats.unwrap().url, "nats://nats:4222");
    assert_eq!(config.syncs[0].spec.name, "users");
}
