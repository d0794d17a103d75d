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
