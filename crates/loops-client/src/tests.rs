//! The client against the simulator on loopback: every typed call and every class of answer.

use std::time::Duration;

use loopsync_core::{Classified, ErrorClass};
use loopsync_simulator::{Faults, MailingList, Settings, SimConfig, SimHandle, spawn};
use serde_json::{Map, Value, json};

use crate::{
    ApiKey, ClientConfig, ContactIdentity, ContactPayload, EventPayload, IdempotencyKey,
    LoopsClient, LoopsError, PropertyKind,
};

async fn sim(rate_limit: u32) -> SimHandle {
    spawn(SimConfig {
        settings: Settings {
            rate_limit,
            ..Settings::default()
        },
        lists: vec![MailingList {
            id: "news".into(),
            name: "News".into(),
            description: Some("Monthly".into()),
            is_public: false,
        }],
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn client_for(sim: &SimHandle, key: &str) -> LoopsClient {
    let mut config = ClientConfig::new(sim.base_url(), ApiKey::new(key).unwrap());
    config.timeout = Duration::from_secs(2);
    LoopsClient::new(config).unwrap()
}

fn props(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test]
async fn api_key_test_and_unauthorized() {
    let sim = sim(100).await;
    let info = client_for(&sim, "test-key").test_api_key().await.unwrap();
    assert!(info.success);
    assert_eq!(info.team_name.as_deref(), Some("Simulated Team"));
    let error = client_for(&sim, "wrong").test_api_key().await.unwrap_err();
    assert!(matches!(&error, LoopsError::Unauthorized { message } if message == "Invalid API key"));
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(
        !format!("{error:?} {error}").contains("wrong"),
        "the key leaks"
    );
}

#[tokio::test]
async fn contacts_create_update_find_delete() {
    let sim = sim(100).await;
    let client = client_for(&sim, "test-key");
    client
        .create_property("planName", PropertyKind::String)
        .await
        .unwrap();
    let mut contact = ContactPayload {
        email: Some("ann@x.co".into()),
        user_id: Some("u1".into()),
        properties: props(json!({"firstName": "Ann", "planName": "free"})),
        mailing_lists: [("news".to_owned(), true)].into(),
    };
    let id = client.create_contact(&contact).await.unwrap();
    let conflict = client.create_contact(&contact).await.unwrap_err();
    assert!(matches!(conflict, LoopsError::Conflict { .. }));

    contact.properties = props(json!({"planName": "pro", "firstName": null}));
    assert_eq!(client.update_contact(&contact).await.unwrap(), id);
    let found = client
        .find_contact(&ContactIdentity::Email("ANN@x.co".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, id);
    assert_eq!(found.first_name, None);
    assert_eq!(found.properties["planName"], "pro");
    assert_eq!(found.mailing_lists.get("news"), Some(&true));
    assert_eq!(found.user_id.as_deref(), Some("u1"));

    let none = client
        .find_contact(&ContactIdentity::UserId("nobody".into()))
        .await
        .unwrap();
    assert!(none.is_none());

    let unknown_user = ContactPayload {
        user_id: Some("nobody".into()),
        ..Default::default()
    };
    let invalid = client.update_contact(&unknown_user).await.unwrap_err();
    assert!(matches!(invalid, LoopsError::Invalid { .. }), "{invalid:?}");
    assert_eq!(invalid.class(), ErrorClass::Permanent);

    client
        .delete_contact(&ContactIdentity::UserId("u1".into()))
        .await
        .unwrap();
    let missing = client
        .delete_contact(&ContactIdentity::UserId("u1".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, LoopsError::NotFound { message } if message == "Contact not found.")
    );
}

#[tokio::test]
async fn properties_and_lists() {
    let sim = sim(100).await;
    let client = client_for(&sim, "test-key");
    client
        .create_property("seats", PropertyKind::Number)
        .await
        .unwrap();
    let custom = client.list_properties(true).await.unwrap();
    assert_eq!(custom.len(), 1);
    assert_eq!(custom[0].key, "seats");
    assert_eq!(custom[0].kind, PropertyKind::Number);
    let all = client.list_properties(false).await.unwrap();
    assert!(
        all.iter()
            .any(|p| p.key == "createdAt" && p.kind == PropertyKind::Date)
    );
    let again = client
        .create_property("seats", PropertyKind::Number)
        .await
        .unwrap_err();
    assert!(matches!(again, LoopsError::Invalid { .. }));
    let lists = client.list_mailing_lists().await.unwrap();
    assert_eq!(lists[0].id, "news");
    assert_eq!(lists[0].description.as_deref(), Some("Monthly"));
    assert!(!lists[0].is_public);
}

#[tokio::test]
async fn events_with_idempotency_key() {
    let sim = sim(100).await;
    let client = client_for(&sim, "test-key");
    let event = EventPayload {
        event_name: "contactUpdated".into(),
        contact: ContactPayload {
            email: Some("a@x.co".into()),
            properties: props(json!({"firstName": "Ann"})),
            ..Default::default()
        },
        event_properties: props(json!({"plan": "pro"})),
    };
    let key = IdempotencyKey::new("sync:users:1:abc").unwrap();
    client.send_event(&event, Some(&key)).await.unwrap();
    let repeat = client.send_event(&event, Some(&key)).await.unwrap_err();
    assert!(matches!(repeat, LoopsError::Conflict { .. }));
    let events = sim.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].idempotency_key.as_deref(),
        Some("sync:users:1:abc")
    );
    assert_eq!(sim.contacts()[0]["firstName"], "Ann");
}

#[tokio::test]
async fn rate_limited_answers_carry_the_headers() {
    let sim = sim(2).await;
    let client = client_for(&sim, "test-key");
    client.test_api_key().await.unwrap();
    assert_eq!(client.last_rate_limit().limit, Some(2));
    assert_eq!(client.last_rate_limit().remaining, Some(1));
    client.test_api_key().await.unwrap();
    let error = client.test_api_key().await.unwrap_err();
    match error {
        LoopsError::RateLimited {
            limit,
            remaining,
            retry_after,
        } => {
            assert_eq!((limit, remaining, retry_after), (Some(2), Some(0), None));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_errors_drops_and_timeouts_are_retryable() {
    let sim = sim(1000).await;
    let client = client_for(&sim, "test-key");
    let contact = ContactPayload {
        email: Some("a@x.co".into()),
        ..Default::default()
    };
    for (faults, check) in [
        (
            Faults {
                error_502: 1.0,
                ..Faults::default()
            },
            (|e: &LoopsError| matches!(e, LoopsError::Server { status: 502, body } if body.contains("<html>")))
                as fn(&LoopsError) -> bool,
        ),
        (
            Faults {
                error_500: 1.0,
                ..Faults::default()
            },
            |e| matches!(e, LoopsError::Server { status: 500, body } if body.is_empty()),
        ),
        (
            Faults {
                drop_connection: 1.0,
                ..Faults::default()
            },
            |e| matches!(e, LoopsError::Transport(_)),
        ),
        (
            Faults {
                latency_ms: 3_000,
                ..Faults::default()
            },
            |e| matches!(e, LoopsError::Timeout(_)),
        ),
    ] {
        sim.set_faults(faults).unwrap();
        let error = client.update_contact(&contact).await.unwrap_err();
        assert!(check(&error), "{error:?}");
        assert_eq!(error.class(), ErrorClass::RETRY);
    }
}

#[tokio::test]
async fn usage_errors_are_caught_before_sending() {
    let sim = sim(100).await;
    let client = client_for(&sim, "test-key");
    let nothing = client
        .update_contact(&ContactPayload::default())
        .await
        .unwrap_err();
    assert!(matches!(nothing, LoopsError::Usage(_)));
    assert_eq!(nothing.class(), ErrorClass::Poison);
    let no_email = client
        .create_contact(&ContactPayload {
            user_id: Some("u".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(no_email, LoopsError::Usage(_)));
    assert_eq!(sim.stats().total_requests, 0);
}

#[tokio::test]
async fn unreachable_server_is_a_transport_error() {
    let sim = sim(100).await;
    let url = sim.base_url();
    sim.shutdown().await;
    let client = LoopsClient::new(ClientConfig::new(url, ApiKey::new("k").unwrap())).unwrap();
    let error = client.test_api_key().await.unwrap_err();
    assert!(matches!(error, LoopsError::Transport(_)), "{error:?}");
}
