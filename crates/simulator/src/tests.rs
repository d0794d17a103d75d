//! The simulator over real HTTP on loopback.

use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

use crate::{Faults, MailingList, PropertyType, Settings, SimConfig, SimHandle, spawn};

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn sim_with(settings: Settings) -> SimHandle {
    spawn(SimConfig {
        settings,
        lists: vec![MailingList {
            id: "news".into(),
            name: "News".into(),
            description: None,
            is_public: true,
        }],
        properties: vec![("planName".into(), PropertyType::String)],
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

async fn sim() -> SimHandle {
    sim_with(Settings {
        rate_limit: 1000,
        ..Settings::default()
    })
    .await
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

async fn call(sim: &SimHandle, method: Method, path: &str, body: Option<Value>) -> Answer {
    call_with(
        sim,
        method,
        path,
        body,
        &[("authorization", "Bearer test-key")],
    )
    .await
}

async fn call_with(
    sim: &SimHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = client().request(method, format!("{}{}", sim.base_url(), path));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

#[tokio::test]
async fn bad_or_missing_key_is_401_with_both_message_fields() {
    let sim = sim().await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "test-key")],
    ] {
        let a = call_with(&sim, Method::GET, "/v1/api-key", None, &headers).await;
        assert_eq!(a.status, 401);
        assert_eq!(a.body["success"], false);
        assert_eq!(a.body["error"], "Invalid API key");
        assert_eq!(a.body["message"], "Invalid API key");
        assert!(a.headers.contains_key("x-ratelimit-limit"));
    }
    let ok = call(&sim, Method::GET, "/v1/api-key", None).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.body,
        json!({"success": true, "teamName": "Simulated Team"})
    );
}

#[tokio::test]
async fn every_api_answer_carries_rate_limit_headers() {
    let sim = sim().await;
    for (method, path, body) in [
        (Method::GET, "/v1/api-key", None),
        (Method::PUT, "/v1/contacts/update", Some(json!({}))),
        (Method::GET, "/v1/nope", None),
        (Method::DELETE, "/v1/contacts/update", None),
    ] {
        let a = call(&sim, method, path, body).await;
        assert_eq!(a.headers["x-ratelimit-limit"], "1000", "{path}");
        assert!(a.headers.contains_key("x-ratelimit-remaining"), "{path}");
    }
}

#[tokio::test]
async fn burst_of_200_concurrent_requests_at_limit_10() {
    let sim = sim_with(Settings::default()).await;
    let client = client();
    let url = format!("{}/v1/api-key", sim.base_url());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client
                    .get(url)
                    .bearer_auth("test-key")
                    .send()
                    .await
                    .unwrap();
                (
                    r.status(),
                    r.headers().get("x-ratelimit-limit").cloned(),
                    r.headers().get("x-ratelimit-remaining").cloned(),
                )
            })
        })
        .collect();
    let mut accepted = 0;
    let mut limited = 0;
    for task in tasks {
        let (status, limit, remaining) = task.await.unwrap();
        assert_eq!(limit.unwrap(), "10");
        match status.as_u16() {
            200 => accepted += 1,
            429 => {
                limited += 1;
                assert_eq!(remaining.unwrap(), "0");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let stats = sim.stats();
    assert!(accepted >= 10, "accepted {accepted}");
    assert_eq!(accepted + limited, 200);
    assert!(stats.max_accepted_in_one_second <= 10, "{stats:?}");
    assert_eq!(stats.max_accepted_in_one_second, 10);
    assert_eq!(stats.rate_limited, limited);
    assert_eq!(stats.total_requests, 200);
    assert_eq!(stats.by_endpoint["GET /v1/api-key"]["429"], limited);
}

#[tokio::test]
async fn retry_after_is_a_setting() {
    let sim = sim_with(Settings {
        rate_limit: 1,
        retry_after: true,
        ..Settings::default()
    })
    .await;
    assert_eq!(
        call(&sim, Method::GET, "/v1/api-key", None).await.status,
        200
    );
    let limited = call(&sim, Method::GET, "/v1/api-key", None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["message"], "Rate limit exceeded");
    assert_eq!(limited.headers["retry-after"], "1");
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_answer() {
    let sim = sim().await;
    let auth = ("authorization", "Bearer test-key");
    // Malformed JSON.
    let r = client()
        .put(format!("{}/v1/contacts/update", sim.base_url()))
        .header(auth.0, auth.1)
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("Invalid JSON"));
    // Wrong content type.
    let r = client()
        .put(format!("{}/v1/contacts/update", sim.base_url()))
        .header(auth.0, auth.1)
        .header("content-type", "text/plain")
        .body("{\"email\": \"a@x.co\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Not an object.
    let a = call(
        &sim,
        Method::POST,
        "/v1/contacts/create",
        Some(json!([1, 2])),
    )
    .await;
    assert_eq!(a.status, 400);
    // Huge body.
    let huge = json!({"email": "a@x.co", "planName": "x".repeat(400_000)});
    let a = call(&sim, Method::PUT, "/v1/contacts/update", Some(huge)).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.body["success"], false);
    // Unknown path and wrong method.
    let a = call(&sim, Method::GET, "/v1/contacts/everything", None).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["success"], false);
    let a = call(
        &sim,
        Method::POST,
        "/v1/contacts/update",
        Some(json!({"email": "a@x.co"})),
    )
    .await;
    assert_eq!(a.status, 405);
    assert_eq!(a.body["message"], "Method not allowed.");
    let a = call(&sim, Method::GET, "/v1/contacts/delete", None).await;
    assert_eq!(a.status, 405);
    // Nothing was created by any of it.
    assert_eq!(sim.contacts(), json!([]));
}

#[tokio::test]
async fn contact_lifecycle_over_http() {
    let sim = sim().await;
    let created = call(
        &sim,
        Method::POST,
        "/v1/contacts/create",
        Some(json!({"email": "ann@x.co", "firstName": "Ann", "userId": "u1", "mailingLists": {"news": true}})),
    )
    .await;
    assert_eq!(created.status, 200);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 25);
    let again = call(
        &sim,
        Method::POST,
        "/v1/contacts/create",
        Some(json!({"email": "ANN@x.co"})),
    )
    .await;
    assert_eq!(again.status, 409);
    let found = call(
        &sim,
        Method::GET,
        "/v1/contacts/find?email=ann%40x.co",
        None,
    )
    .await;
    assert_eq!(found.body[0]["id"], id.as_str());
    assert_eq!(found.body[0]["mailingLists"], json!({"news": true}));
    assert_eq!(found.body[0]["planName"], Value::Null);
    let updated = call(
        &sim,
        Method::PUT,
        "/v1/contacts/update",
        Some(json!({"userId": "u1", "email": "ann2@x.co", "planName": "pro"})),
    )
    .await;
    assert_eq!(updated.body["id"], id.as_str());
    let by_user = call(&sim, Method::GET, "/v1/contacts/find?userId=u1", None).await;
    assert_eq!(by_user.body[0]["email"], "ann2@x.co");
    assert_eq!(by_user.body[0]["planName"], "pro");
    let deleted = call(
        &sim,
        Method::POST,
        "/v1/contacts/delete",
        Some(json!({"userId": "u1"})),
    )
    .await;
    assert_eq!(
        deleted.body,
        json!({"success": true, "message": "Contact deleted."})
    );
    let gone = call(
        &sim,
        Method::POST,
        "/v1/contacts/delete",
        Some(json!({"userId": "u1"})),
    )
    .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.body["message"], "Contact not found.");
    let kinds: Vec<_> = sim.workflows().iter().map(|w| w.kind).collect();
    assert_eq!(kinds, ["contact_added", "added_to_list", "contact_updated"]);
}

#[tokio::test]
async fn properties_and_lists_over_http() {
    let sim = sim().await;
    let all = call(&sim, Method::GET, "/v1/contacts/properties", None).await;
    assert!(
        all.body
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == "subscribed" && p["type"] == "boolean")
    );
    let custom = call(
        &sim,
        Method::GET,
        "/v1/contacts/properties?list=custom",
        None,
    )
    .await;
    assert_eq!(
        custom.body,
        json!([{"key": "planName", "label": "Plan Name", "type": "string"}])
    );
    let bad = call(&sim, Method::GET, "/v1/contacts/properties?list=some", None).await;
    assert_eq!(bad.status, 400);
    let made = call(
        &sim,
        Method::POST,
        "/v1/contacts/properties",
        Some(json!({"name": "seats", "type": "number"})),
    )
    .await;
    assert_eq!(made.body, json!({"success": true}));
    let dup = call(
        &sim,
        Method::POST,
        "/v1/contacts/properties",
        Some(json!({"name": "seats", "type": "number"})),
    )
    .await;
    assert_eq!(dup.status, 400);
    let badtype = call(
        &sim,
        Method::POST,
        "/v1/contacts/properties",
        Some(json!({"name": "x", "type": "text"})),
    )
    .await;
    assert_eq!(badtype.status, 400);
    let lists = call(&sim, Method::GET, "/v1/lists", None).await;
    assert_eq!(
        lists.body,
        json!([{"id": "news", "name": "News", "description": null, "isPublic": true}])
    );
}

#[tokio::test]
async fn concurrent_duplicates_of_one_idempotency_key_apply_once() {
    let sim = sim().await;
    sim.set_faults(Faults {
        latency_ms: 100,
        ..Faults::default()
    })
    .unwrap();
    let client = client();
    let url = format!("{}/v1/events/send", sim.base_url());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth("test-key")
                    .header("Idempotency-Key", "same-key")
                    .json(&json!({"eventName": "signup", "email": "a@x.co"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(sim.events().len(), 1);
    let received = sim
        .workflows()
        .iter()
        .filter(|w| w.kind == "event_received")
        .count();
    assert_eq!(received, 1);
}

#[tokio::test]
async fn injected_server_errors_have_load_balancer_bodies() {
    let sim = sim().await;
    for (faults, status, needle) in [
        (
            Faults {
                error_500: 1.0,
                ..Faults::default()
            },
            500,
            "",
        ),
        (
            Faults {
                error_502: 1.0,
                ..Faults::default()
            },
            502,
            "<html>",
        ),
        (
            Faults {
                error_503: 1.0,
                ..Faults::default()
            },
            503,
            "Service Unavailable",
        ),
    ] {
        sim.set_faults(faults).unwrap();
        let a = call(
            &sim,
            Method::PUT,
            "/v1/contacts/update",
            Some(json!({"email": "a@x.co"})),
        )
        .await;
        assert_eq!(a.status.as_u16(), status);
        assert!(a.text.contains(needle), "{}", a.text);
        if status == 500 {
            assert!(a.text.is_empty());
        }
    }
    // Before the effect by default: nothing was written.
    assert_eq!(sim.contacts(), json!([]));
    sim.set_faults(Faults {
        rate_limit_429: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let a = call(&sim, Method::GET, "/v1/api-key", None).await;
    assert_eq!(a.status, 429);
    assert!(a.headers.contains_key("x-ratelimit-remaining"));
}

#[tokio::test]
async fn fault_after_effect_loses_the_answer_not_the_write() {
    let sim = sim().await;
    sim.set_faults(Faults {
        error_502: 1.0,
        after_effect: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let a = call(
        &sim,
        Method::PUT,
        "/v1/contacts/update",
        Some(json!({"email": "a@x.co"})),
    )
    .await;
    assert_eq!(a.status, 502);
    assert_eq!(sim.contacts().as_array().unwrap().len(), 1);
    assert_eq!(sim.stats().by_endpoint["PUT /v1/contacts/update"]["502"], 1);
}

#[tokio::test]
async fn dropped_connection_gives_no_answer() {
    let sim = sim().await;
    for after_effect in [0.0, 1.0] {
        sim.reset();
        sim.set_faults(Faults {
            drop_connection: 1.0,
            after_effect,
            ..Faults::default()
        })
        .unwrap();
        let error = client()
            .put(format!("{}/v1/contacts/update", sim.base_url()))
            .bearer_auth("test-key")
            .json(&json!({"email": "a@x.co"}))
            .send()
            .await
            .unwrap_err();
        assert!(!error.is_timeout(), "{error}");
        let written = sim.contacts().as_array().unwrap().len();
        assert_eq!(written, after_effect as usize);
        assert_eq!(
            sim.stats().by_endpoint["PUT /v1/contacts/update"]["dropped"],
            1
        );
    }
    // `{}` clears the faults.
    let r = client()
        .post(format!("{}/_sim/faults", sim.root_url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a = call(&sim, Method::GET, "/v1/api-key", None).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn inspection_endpoints() {
    let sim = sim().await;
    call(
        &sim,
        Method::POST,
        "/v1/events/send",
        Some(json!({"eventName": "signup", "email": "a@x.co", "eventProperties": {"plan": "pro"}})),
    )
    .await;
    let c = client();
    let get = |path: &str| {
        let c = c.clone();
        let url = format!("{}{}", sim.root_url(), path);
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let contacts = get("/_sim/contacts").await;
    assert_eq!(contacts[0]["email"], "a@x.co");
    let events = get("/_sim/events").await;
    assert_eq!(events[0]["eventName"], "signup");
    assert_eq!(events[0]["eventProperties"], json!({"plan": "pro"}));
    assert_eq!(events[0]["idempotencyKey"], Value::Null);
    assert!(events[0]["at"].as_str().unwrap().ends_with('Z'));
    let workflows = get("/_sim/workflows").await;
    assert_eq!(workflows[0]["kind"], "contact_added");
    assert_eq!(workflows[1]["kind"], "event_received");
    assert_eq!(workflows[1]["contactId"], contacts[0]["id"]);
    let stats = get("/_sim/stats").await;
    assert_eq!(stats["total_requests"], 1);
    assert_eq!(stats["by_endpoint"]["POST /v1/events/send"]["200"], 1);
    assert!(stats["first_request_at"].is_string());
    let bad = c
        .post(format!("{}/_sim/faults", sim.root_url()))
        .body("{\"error_500\": 2}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = c
        .post(format!("{}/_sim/faults", sim.root_url()))
        .body("{\"boom\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let list = c
        .post(format!("{}/_sim/lists", sim.root_url()))
        .body(r#"{"id": "beta", "name": "Beta"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    c.post(format!("{}/_sim/reset", sim.root_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(get("/_sim/contacts").await, json!([]));
    assert_eq!(get("/_sim/events").await, json!([]));
    assert_eq!(get("/_sim/stats").await["total_requests"], 0);
}
