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
    try_call_with(sim, method, path, body, headers)
        .await
        .expect("an answer, not a dropped connection")
}

/// As `call_with`; `None` when the simulator closed the connection without an answer.
async fn try_call_with(
    sim: &SimHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let mut request = client().request(method, format!("{}{}", sim.base_url(), path));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(error) => {
            assert!(!error.is_timeout(), "{error}");
            return None;
        }
    };
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Some(Answer {
        status,
        headers,
        body,
        text,
    })
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

/// Several keys of one team: each is accepted, on the same contacts; any other is 401.
#[tokio::test]
async fn every_key_of_the_team_is_accepted() {
    let sim = spawn(SimConfig {
        other_api_keys: vec!["rotated-key".into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let as_key = |key: &'static str| [("authorization", format!("Bearer {key}"))];
    let write = json!({"email": "ann@example.com"});
    let put = call_with(
        &sim,
        Method::PUT,
        "/v1/contacts/update",
        Some(write),
        &[("authorization", "Bearer test-key")],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text);
    for (key, status, found) in [
        ("test-key", 200, 1),
        ("rotated-key", 200, 1),
        ("other-key", 401, 0),
    ] {
        let header = as_key(key);
        let headers: Vec<(&str, &str)> = header.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = call_with(
            &sim,
            Method::GET,
            "/v1/contacts/find?email=ann%40example.com",
            None,
            &headers,
        )
        .await;
        assert_eq!(a.status, status, "{key}: {}", a.text);
        assert_eq!(a.body.as_array().map_or(0, Vec::len), found, "{key}");
    }
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
        json!([{"id": "news", "name": "News", "description": "", "isPublic": true}]),
        "a list without a description has an empty one: OpenAPI 1.8.0 requires a string"
    );
}

/// `GET /v1/lists` answers each list's description as a string, as Loops' OpenAPI 1.8.0 types
/// it: the one given, or `""` when none was (never `null`).
#[tokio::test]
async fn list_descriptions_are_strings() {
    let sim = sim().await;
    for body in [
        r#"{"id": "beta", "name": "Beta", "description": "Early access"}"#,
        r#"{"id": "gamma", "name": "Gamma", "description": null}"#,
    ] {
        let (status, _) = post_sim(&sim, "lists", body).await;
        assert_eq!(status, 200, "{body}");
    }
    let lists = call(&sim, Method::GET, "/v1/lists", None).await;
    let descriptions: Vec<&Value> = lists
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["description"])
        .collect();
    assert_eq!(
        descriptions,
        [&json!(""), &json!("Early access"), &json!("")],
        "{}",
        lists.body
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

// ---- The settings of loops-api.md §9.1 ----

/// `GET /_sim/<what>` as JSON.
async fn inspect(sim: &SimHandle, what: &str) -> Value {
    client()
        .get(format!("{}/_sim/{what}", sim.root_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `POST /_sim/<what>` with a raw body: status and JSON answer.
async fn post_sim(sim: &SimHandle, what: &str, body: &str) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{}/_sim/{what}", sim.root_url()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// `POST /_sim/settings` that must be accepted.
async fn settings(sim: &SimHandle, body: Value) {
    let (status, answer) = post_sim(sim, "settings", &body.to_string()).await;
    assert_eq!(status, 200, "{body}: {answer}");
}

/// `POST /_sim/faults` that must be accepted.
async fn faults(sim: &SimHandle, body: Value) {
    let (status, answer) = post_sim(sim, "faults", &body.to_string()).await;
    assert_eq!(status, 200, "{body}: {answer}");
}

/// `POST /v1/events/send` with an `Idempotency-Key`; `None` for a dropped connection.
async fn event_with_key(sim: &SimHandle, key: &str, body: Value) -> Option<Answer> {
    try_call_with(
        sim,
        Method::POST,
        "/v1/events/send",
        Some(body),
        &[
            ("authorization", "Bearer test-key"),
            ("idempotency-key", key),
        ],
    )
    .await
}

fn good_event() -> Value {
    json!({"eventName": "signup", "email": "a@x.co"})
}

/// A 400: a userId-only event for an unknown userId creates nothing.
fn bad_event() -> Value {
    json!({"eventName": "signup", "userId": "nobody"})
}

/// Every fault path of a request with a key, in both modes: the first request meets the fault,
/// then the faults are cleared and the same key is sent again with a good body.
#[tokio::test]
async fn every_fault_path_consults_keys_consumed_on_failure() {
    let sim = sim().await;
    for consumed in [false, true] {
        for fault in ["error_500", "error_502", "error_503", "drop_connection"] {
            for after_effect in [false, true] {
                for first_body_good in [true, false] {
                    let case = format!(
                        "consumed={consumed} {fault} after_effect={after_effect} \
                         first_body_good={first_body_good}"
                    );
                    sim.reset();
                    settings(
                        &sim,
                        json!({"rate_limit": 1000, "keys_consumed_on_failure": consumed}),
                    )
                    .await;
                    faults(
                        &sim,
                        json!({fault: 1.0, "after_effect": if after_effect { 1.0 } else { 0.0 },
                               "endpoints": ["POST /v1/events/send"]}),
                    )
                    .await;
                    let body = if first_body_good {
                        good_event()
                    } else {
                        bad_event()
                    };
                    let first = event_with_key(&sim, "k1", body).await;
                    match (fault, &first) {
                        ("drop_connection", None) => {}
                        ("error_500", Some(a)) => assert_eq!(a.status, 500, "{case}"),
                        ("error_502", Some(a)) => assert_eq!(a.status, 502, "{case}"),
                        ("error_503", Some(a)) => assert_eq!(a.status, 503, "{case}"),
                        _ => panic!("{case}: unexpected answer {:?}", first.map(|a| a.status)),
                    }
                    let applied = after_effect && first_body_good;
                    let events = inspect(&sim, "events").await;
                    assert_eq!(
                        events.as_array().unwrap().len(),
                        usize::from(applied),
                        "{case}"
                    );
                    faults(&sim, json!({})).await;

                    let retry = event_with_key(&sim, "k1", good_event()).await.unwrap();
                    let key_consumed = applied || consumed;
                    let events = inspect(&sim, "events").await;
                    let contacts = inspect(&sim, "contacts").await;
                    if key_consumed {
                        assert_eq!(retry.status, 409, "{case}");
                    } else {
                        assert_eq!(retry.status, 200, "{case}");
                    }
                    // Applied by the first request, or by the retry, or (key consumed by a
                    // request that did nothing) never.
                    let applied_once = applied || !key_consumed;
                    assert_eq!(
                        events.as_array().unwrap().len(),
                        usize::from(applied_once),
                        "{case}: {events}"
                    );
                    assert_eq!(
                        contacts.as_array().unwrap().len(),
                        usize::from(applied_once),
                        "{case}: {contacts}"
                    );
                    if applied_once {
                        assert_eq!(events[0]["idempotencyKey"], "k1", "{case}");
                        assert_eq!(contacts[0]["email"], "a@x.co", "{case}");
                    }
                }
            }
        }
    }
}

/// `idempotency_ttl_seconds`: a key is refused (409) within its lifetime and taken again once
/// Loops has forgotten it — the same event then fires a second time. 24 hours by default.
#[tokio::test]
async fn a_key_is_forgotten_after_its_lifetime() {
    let sim = sim().await;
    let defaults = inspect(&sim, "settings").await;
    assert_eq!(defaults["idempotency_ttl_seconds"], 86400);
    settings(
        &sim,
        json!({"rate_limit": 1000, "idempotency_ttl_seconds": 1}),
    )
    .await;
    let first = event_with_key(&sim, "k-ttl", good_event()).await.unwrap();
    assert_eq!(first.status, 200);
    let again = event_with_key(&sim, "k-ttl", good_event()).await.unwrap();
    assert_eq!(again.status, 409, "within its lifetime");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let later = event_with_key(&sim, "k-ttl", good_event()).await.unwrap();
    assert_eq!(later.status, 200, "forgotten after it");
    let events = inspect(&sim, "events").await;
    assert_eq!(events.as_array().unwrap().len(), 2, "{events}");
}

/// The example of §9.1: a 503 before the effect, then a retry with the same key.
#[tokio::test]
async fn a_503_before_the_effect_then_a_retry() {
    for (consumed, retry_status, applied) in [(false, 200, 1), (true, 409, 0)] {
        let sim = sim().await;
        settings(
            &sim,
            json!({"rate_limit": 1000, "keys_consumed_on_failure": consumed}),
        )
        .await;
        sim.set_faults(Faults {
            error_503: 1.0,
            ..Faults::default()
        })
        .unwrap();
        let first = event_with_key(&sim, "signup-a", good_event())
            .await
            .unwrap();
        assert_eq!(first.status, 503);
        assert_eq!(first.text, "Service Unavailable");
        sim.set_faults(Faults::default()).unwrap();
        let retry = event_with_key(&sim, "signup-a", good_event())
            .await
            .unwrap();
        assert_eq!(retry.status, retry_status, "consumed={consumed}");
        assert_eq!(retry.body["success"], retry_status == 200);
        assert_eq!(
            inspect(&sim, "events").await.as_array().unwrap().len(),
            applied
        );
        assert_eq!(
            inspect(&sim, "contacts").await.as_array().unwrap().len(),
            applied
        );
        let stats = inspect(&sim, "stats").await;
        assert_eq!(stats["by_endpoint"]["POST /v1/events/send"]["503"], 1);
    }
}

/// A 400 from the handler and a 413 from the body limit: consumed only with the setting.
#[tokio::test]
async fn a_4xx_consumes_its_key_only_when_set() {
    for consumed in [false, true] {
        let sim = sim().await;
        settings(
            &sim,
            json!({"rate_limit": 1000, "keys_consumed_on_failure": consumed}),
        )
        .await;
        let huge =
            json!({"eventName": "signup", "email": "a@x.co", "planName": "x".repeat(300_000)});
        for (key, first_body, first_status) in [("k400", bad_event(), 400), ("k413", huge, 413)] {
            let first = event_with_key(&sim, key, first_body).await.unwrap();
            assert_eq!(first.status.as_u16(), first_status, "{key}");
            assert_eq!(inspect(&sim, "events").await, json!([]), "{key}");
        }
        for key in ["k400", "k413"] {
            let retry = event_with_key(&sim, key, good_event()).await.unwrap();
            let expected = if consumed { 409 } else { 200 };
            assert_eq!(retry.status, expected, "consumed={consumed} {key}");
        }
        let applied = if consumed { 0 } else { 2 };
        assert_eq!(
            inspect(&sim, "events").await.as_array().unwrap().len(),
            applied
        );
        assert_eq!(
            inspect(&sim, "contacts").await.as_array().unwrap().len(),
            usize::from(!consumed)
        );
    }
}

/// A request that was not taken (401, a real or an injected 429) consumes nothing in either
/// mode, and neither does an invalid key.
#[tokio::test]
async fn a_401_a_429_and_an_invalid_key_never_consume_a_key() {
    for consumed in [false, true] {
        let sim = sim().await;
        settings(
            &sim,
            json!({"rate_limit": 1, "keys_consumed_on_failure": consumed}),
        )
        .await;
        // 401.
        let unauthorized = try_call_with(
            &sim,
            Method::POST,
            "/v1/events/send",
            Some(good_event()),
            &[
                ("authorization", "Bearer wrong"),
                ("idempotency-key", "k401"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(unauthorized.status, 401);
        // A real 429: the one request of this second goes to api-key.
        assert_eq!(
            call(&sim, Method::GET, "/v1/api-key", None).await.status,
            200
        );
        let limited = event_with_key(&sim, "k429", good_event()).await.unwrap();
        assert_eq!(limited.status, 429);
        settings(
            &sim,
            json!({"rate_limit": 1000, "keys_consumed_on_failure": consumed}),
        )
        .await;
        // An injected 429.
        faults(&sim, json!({"rate_limit_429": 1.0})).await;
        let injected = event_with_key(&sim, "k429i", good_event()).await.unwrap();
        assert_eq!(injected.status, 429);
        faults(&sim, json!({})).await;
        // An invalid key: 400, and the same text cut to 100 characters is another key.
        let long = "k".repeat(101);
        let invalid = event_with_key(&sim, &long, good_event()).await.unwrap();
        assert_eq!(invalid.status, 400);
        assert_eq!(inspect(&sim, "events").await, json!([]));
        for key in ["k401", "k429", "k429i", &long[..100]] {
            let retry = event_with_key(&sim, key, good_event()).await.unwrap();
            assert_eq!(retry.status, 200, "consumed={consumed} {key}");
        }
        assert_eq!(inspect(&sim, "events").await.as_array().unwrap().len(), 4);
    }
}

#[tokio::test]
async fn settings_round_trip_and_refusals() {
    let sim = sim_with(Settings::default()).await;
    let defaults = inspect(&sim, "settings").await;
    assert_eq!(defaults["keys_consumed_on_failure"], false);
    assert_eq!(defaults["email_match"], "case_insensitive");
    assert_eq!(defaults["numeric_dates"], "auto");
    assert_eq!(defaults, serde_json::to_value(Settings::default()).unwrap());

    let changed = json!({"keys_consumed_on_failure": true, "email_match": "case_sensitive", "numeric_dates": "millis"});
    let (status, answer) = post_sim(&sim, "settings", &changed.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(answer["settings"]["email_match"], "case_sensitive");
    let now = inspect(&sim, "settings").await;
    for key in ["keys_consumed_on_failure", "email_match", "numeric_dates"] {
        assert_eq!(now[key], changed[key], "{key}");
    }
    // The fields not sent are at their defaults.
    assert_eq!(now["rate_limit"], 10);
    let expected = Settings {
        keys_consumed_on_failure: true,
        email_match: crate::EmailMatch::CaseSensitive,
        numeric_dates: crate::NumericDates::Millis,
        ..Settings::default()
    };
    assert_eq!(sim.settings(), expected);

    // Refused bodies change nothing.
    for bad in [
        r#"{"email_match": "CaseSensitive"}"#,
        r#"{"email_match": "exact"}"#,
        r#"{"numeric_dates": "seconds"}"#,
        r#"{"keys_consumed_on_failure": "yes"}"#,
        r#"{"keys_consumed_on_failure": true, "emailMatch": "case_sensitive"}"#,
    ] {
        let (status, answer) = post_sim(&sim, "settings", bad).await;
        assert_eq!(status, 400, "{bad}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid settings"),
            "{answer}"
        );
    }
    assert_eq!(sim.settings(), expected);

    // Two contacts that differ only in case cannot become one.
    for email in ["Ann@x.co", "ann@x.co"] {
        let a = call(
            &sim,
            Method::POST,
            "/v1/contacts/create",
            Some(json!({"email": email})),
        )
        .await;
        assert_eq!(a.status, 200, "{email}");
    }
    let (status, answer) = post_sim(&sim, "settings", "{}").await;
    assert_eq!(status, 409);
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("Ann@x.co") && message.contains("ann@x.co"),
        "{message}"
    );
    assert_eq!(sim.settings(), expected);
    assert!(sim.set_settings(Settings::default()).is_err());
    // Without the collision, `{}` is every default again.
    let deleted = call(
        &sim,
        Method::POST,
        "/v1/contacts/delete",
        Some(json!({"email": "ann@x.co"})),
    )
    .await;
    assert_eq!(deleted.status, 200);
    let (status, _) = post_sim(&sim, "settings", "{}").await;
    assert_eq!(status, 200);
    assert_eq!(inspect(&sim, "settings").await, defaults);
    let found = call(
        &sim,
        Method::GET,
        "/v1/contacts/find?email=ANN%40X.CO",
        None,
    )
    .await;
    assert_eq!(found.body[0]["email"], "Ann@x.co");
}

#[tokio::test]
async fn email_match_decides_whether_case_makes_another_contact() {
    for sensitive in [false, true] {
        let sim = sim().await;
        let matching = if sensitive {
            "case_sensitive"
        } else {
            "case_insensitive"
        };
        settings(&sim, json!({"rate_limit": 1000, "email_match": matching})).await;
        let find = |email: &'static str| {
            let sim = &sim;
            async move {
                let path = format!("/v1/contacts/find?email={}", email.replace('@', "%40"));
                call(sim, Method::GET, &path, None).await.body
            }
        };

        // Create: a second spelling is a conflict, or another contact.
        let upper = call(
            &sim,
            Method::POST,
            "/v1/contacts/create",
            Some(json!({"email": "Ann@x.co", "firstName": "Upper"})),
        )
        .await;
        assert_eq!(upper.status, 200);
        let lower = call(
            &sim,
            Method::POST,
            "/v1/contacts/create",
            Some(json!({"email": "ann@x.co", "firstName": "Lower"})),
        )
        .await;
        assert_eq!(
            lower.status,
            if sensitive { 200 } else { 409 },
            "{matching}"
        );

        // Find.
        let found = find("ann@x.co").await;
        if sensitive {
            assert_eq!(found[0]["firstName"], "Lower");
            assert_eq!(find("ANN@X.CO").await, json!([]));
        } else {
            assert_eq!(found[0]["id"], upper.body["id"]);
            assert_eq!(find("ANN@X.CO").await[0]["id"], upper.body["id"]);
        }

        // Update by the other spelling.
        let updated = call(
            &sim,
            Method::PUT,
            "/v1/contacts/update",
            Some(json!({"email": "ann@x.co", "planName": "pro"})),
        )
        .await;
        assert_eq!(updated.status, 200);
        if sensitive {
            assert_eq!(updated.body["id"], lower.body["id"]);
            assert_eq!(find("Ann@x.co").await[0]["planName"], Value::Null);
        } else {
            assert_eq!(updated.body["id"], upper.body["id"]);
            // Stored as sent: the contact now has the new spelling.
            assert_eq!(find("ANN@X.CO").await[0]["email"], "ann@x.co");
        }

        // Events: identity by email.
        let sent = call(
            &sim,
            Method::POST,
            "/v1/events/send",
            Some(json!({"eventName": "login", "email": "ANN@X.CO"})),
        )
        .await;
        assert_eq!(sent.status, 200);
        let events = inspect(&sim, "events").await;
        let contacts = inspect(&sim, "contacts").await;
        let workflows = inspect(&sim, "workflows").await;
        let received = workflows
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["kind"] == "event_received")
            .unwrap();
        // Either way the contact now has the event's spelling (stored as sent).
        assert_eq!(events[0]["email"], "ANN@X.CO");
        if sensitive {
            // A third spelling is a third contact, created by the event.
            assert_eq!(contacts.as_array().unwrap().len(), 3);
            assert_eq!(contacts[2]["email"], "ANN@X.CO");
            assert_eq!(received["contactId"], contacts[2]["id"]);
        } else {
            assert_eq!(contacts.as_array().unwrap().len(), 1);
            assert_eq!(received["contactId"], upper.body["id"]);
        }

        // Delete by one spelling.
        let deleted = call(
            &sim,
            Method::POST,
            "/v1/contacts/delete",
            Some(json!({"email": "Ann@x.co"})),
        )
        .await;
        assert_eq!(deleted.status, 200);
        let left: Vec<_> = inspect(&sim, "contacts")
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["email"].as_str().unwrap().to_owned())
            .collect();
        if sensitive {
            assert_eq!(left, ["ann@x.co", "ANN@X.CO"]);
        } else {
            assert!(left.is_empty(), "{left:?}");
        }
        let again = call(
            &sim,
            Method::POST,
            "/v1/contacts/delete",
            Some(json!({"email": "Ann@x.co"})),
        )
        .await;
        assert_eq!(again.status, 404);
    }
}

#[tokio::test]
async fn numeric_dates_decides_how_a_number_is_read() {
    for (mode, signed_up, created) in [
        (
            "auto",
            "1972-09-27T00:00:00.000Z",
            "1970-01-01T00:16:40.000Z",
        ),
        (
            "millis",
            "1970-01-02T00:00:00.000Z",
            "1970-01-01T00:00:01.000Z",
        ),
    ] {
        let sim = spawn(SimConfig {
            settings: Settings {
                rate_limit: 1000,
                ..Settings::default()
            },
            properties: vec![("signedUpAt".into(), PropertyType::Date)],
            ..SimConfig::default()
        })
        .await
        .unwrap();
        settings(&sim, json!({"rate_limit": 1000, "numeric_dates": mode})).await;
        let a = call(
            &sim,
            Method::PUT,
            "/v1/contacts/update",
            Some(json!({"email": "a@x.co", "signedUpAt": 86_400_000, "createdAt": 1000})),
        )
        .await;
        assert_eq!(a.status, 200, "{mode}: {}", a.text);
        let found = call(&sim, Method::GET, "/v1/contacts/find?email=a%40x.co", None).await;
        assert_eq!(found.body[0]["signedUpAt"], signed_up, "{mode}");
        assert_eq!(found.body[0]["createdAt"], created, "{mode}");
        // A contact property on an event is read the same way.
        let e = call(
            &sim,
            Method::POST,
            "/v1/events/send",
            Some(json!({"eventName": "e", "email": "b@x.co", "signedUpAt": 1000})),
        )
        .await;
        assert_eq!(e.status, 200);
        let contacts = inspect(&sim, "contacts").await;
        let expected = if mode == "millis" {
            "1970-01-01T00:00:01.000Z"
        } else {
            "1970-01-01T00:16:40.000Z"
        };
        assert_eq!(contacts[1]["signedUpAt"], expected, "{mode}");
        // Milliseconds from 10^11 on, and strings, read the same in both modes.
        call(
            &sim,
            Method::PUT,
            "/v1/contacts/update",
            Some(json!({"email": "c@x.co", "signedUpAt": 1_704_713_466_000u64, "createdAt": "2024-01-08"})),
        )
        .await;
        let c = &inspect(&sim, "contacts").await[2];
        assert_eq!(c["signedUpAt"], "2024-01-08T11:31:06.000Z");
        assert_eq!(c["createdAt"], "2024-01-08T00:00:00.000Z");
    }
}

/// A client that sends half a request line and waits has its connection closed once the
/// header read timeout passes (not before); meanwhile the simulator answers others.
#[tokio::test]
async fn half_a_request_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_millis(300);
    let sim = spawn(SimConfig {
        header_read_timeout: timeout,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    stream.write_all(b"GET /api/v1/api-ke").await.unwrap();
    let answer = call(&sim, Method::GET, "/v1/api-key", None).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "others are answered meanwhile"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the connection is closed within the timeout")
        .ok();
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
    assert!(started.elapsed() >= timeout, "not before the timeout");
}

/// `/_sim/stats` counts a request `in_flight` from the moment the API receives it until it is
/// answered: a test holding a request up (with latency) can wait for it to be sent.
#[tokio::test]
async fn a_request_held_up_is_in_flight_until_answered() {
    let sim = sim().await;
    sim.set_faults(Faults {
        latency_ms: 1_500,
        ..Faults::default()
    })
    .unwrap();
    assert_eq!(sim.stats().in_flight, 0);
    let url = format!("{}/v1/api-key", sim.base_url());
    let request = tokio::spawn(async move {
        client()
            .get(url)
            .bearer_auth("test-key")
            .send()
            .await
            .unwrap()
            .status()
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while sim.stats().in_flight == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.stats().total_requests, 0, "counted when answered");
    let stats: Value = client()
        .get(format!("{}/_sim/stats", sim.root_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["in_flight"], 1, "{stats}");
    assert_eq!(request.await.unwrap(), 200);
    assert_eq!(sim.stats().in_flight, 0);
    assert_eq!(sim.stats().total_requests, 1);
}
