//! `loopsync sim` as a user starts it: the binary, a free port, real HTTP.

use loopsync_testkit::{SimProcess, http_client};

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

/// The configs the compose stack mounts are ones loopsync accepts: the real Loops' over https
/// (plain http to the simulator's host refused), and the simulator's, which names its URL and
/// test key itself and alone allows plain http.
#[test]
fn compose_config_is_valid() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let text = read("loopsync.toml");
    let env = |base_url: &'static str| {
        move |name: &str| match name {
            "LOOPS_API_KEY" => Some("k".to_owned()),
            "LOOPS_BASE_URL" => Some(base_url.to_owned()),
            _ => None,
        }
    };
    let config = loopsync_config::Config::parse(&text, env("https://app.loops.so/api"))
        .expect("a valid config");
    assert_eq!(config.nats.unwrap().url, "nats://nats:4222");
    assert_eq!(config.syncs[0].spec.name, "users");
    let refused = loopsync_config::Config::parse(&text, env("http://sim:8788/api"))
        .expect_err("plain http to another host");
    assert!(
        refused.to_string().contains("loops.allow_insecure_http"),
        "{refused}"
    );

    let sim = loopsync_config::Config::parse(&read("loopsync-sim.toml"), |_| None)
        .expect("a valid config, needing no variable");
    assert_eq!(sim.loops.base_url, "http://sim:8788/api");
    assert_eq!(sim.loops.api_key.expose(), "sim-only-test-key");
    assert_eq!(sim.syncs, config.syncs, "the same syncs as the real config");
}
