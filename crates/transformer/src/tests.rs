//! The mapping, without NATS or HTTP; then the stage on the in-process bus.

use loopsync_bus::LocalBus;
use loopsync_bus::worker::{DeliveryInfo, Handler};
use loopsync_core::spec::{Behavior, EventName, MappedList, MappedProperty, OnRemove};
use loopsync_core::stage::Stage;
use serde_json::json;

use super::*;

fn spec(identify_by: IdentifyBy) -> SyncSpec {
    let p = |property: &str, column: &str, kind| MappedProperty {
        property: property.into(),
        column: column.into(),
        kind,
    };
    SyncSpec {
        name: "users".into(),
        model: "select * from users".into(),
        primary_key: "id".into(),
        identify_by,
        behavior: Behavior::Upsert,
        on_remove: OnRemove::Delete,
        trigger_workflows: false,
        event_on_create: "contactCreated".into(),
        event_on_update: "contactUpdated".into(),
        properties: vec![
            p("email", "email", PropertyKind::String),
            p("firstName", "first_name", PropertyKind::String),
            p("planName", "plan", PropertyKind::String),
            p("seats", "seats", PropertyKind::Number),
            p("signedUpAt", "signed_up_at", PropertyKind::Date),
            p("trial", "trial", PropertyKind::Boolean),
            p("userId", "id", PropertyKind::String),
        ],
        lists: vec![
            MappedList {
                list_id: "news".into(),
                column: "newsletter".into(),
            },
            MappedList {
                list_id: "beta".into(),
                column: "beta".into(),
            },
        ],
        max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
        append: None,
        incremental: None,
    }
}

fn change(kind: ChangeKind, pairs: &[(&str, Option<&str>)]) -> RowChange {
    RowChange {
        v: VERSION,
        sync: "users".into(),
        run_id: 3,
        key: "42".into(),
        fingerprint: "fp42".into(),
        kind,
        values: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect(),
        confirmed_email: None,
        confirmed_user_id: None,
        installation: String::new(),
        generation: 0,
        keep_old_contact: false,
        resubscribe: false,
        possibly_applied: Vec::new(),
    }
}

fn full_row() -> Vec<(&'static str, Option<&'static str>)> {
    vec![
        ("email", Some("  Ada@Example.COM ")),
        ("first_name", Some("Ada")),
        ("plan", None),
        ("seats", Some("12.0")),
        ("signed_up_at", Some("2024-01-08 11:31:06+00")),
        ("trial", Some("f")),
        ("id", Some("42")),
        ("newsletter", Some("t")),
        ("beta", None),
    ]
}

#[test]
fn a_row_becomes_an_upsert() {
    let op = transform(
        &spec(IdentifyBy::Email),
        &change(ChangeKind::Added, &full_row()),
    )
    .unwrap();
    assert_eq!(op.run_id, 3);
    assert_eq!(
        op.idempotency_key,
        keys::idempotency_key("", "users", "42", 0, "fp42", "upsert")
    );
    let Action::Upsert {
        email,
        user_id,
        properties,
        mailing_lists,
    } = op.action
    else {
        panic!("not an upsert")
    };
    assert_eq!(email.as_deref(), Some("ada@example.com"));
    assert_eq!(user_id.as_deref(), Some("42"));
    assert_eq!(
        Value::Object(properties),
        json!({"firstName": "Ada", "planName": null, "seats": 12,
               "signedUpAt": 1_704_713_466_000i64, "trial": false})
    );
    // NULL leaves a list alone.
    assert_eq!(mailing_lists, [("news".to_owned(), true)].into());
}

#[test]
fn subscribed_is_never_sent_unless_mapped() {
    let op = transform(
        &spec(IdentifyBy::Email),
        &change(ChangeKind::Added, &full_row()),
    )
    .unwrap();
    let Action::Upsert { properties, .. } = op.action else {
        panic!("not an upsert")
    };
    assert!(!properties.contains_key("subscribed"));
}

#[test]
fn invalid_records_say_why() {
    let s = spec(IdentifyBy::Email);
    let with = |column: &str, value: Option<&str>| {
        let mut row = full_row();
        for entry in row.iter_mut() {
            if entry.0 == column {
                entry.1 = value;
            }
        }
        transform(&s, &change(ChangeKind::Changed, &row))
            .unwrap_err()
            .0
    };
    assert_eq!(
        with("email", None),
        "no email: the contact is identified by email"
    );
    assert_eq!(
        with("email", Some("   ")),
        "no email: the contact is identified by email"
    );
    // What is wrong and in which column, never the value: a reason is kept and shown, and
    // the value is a person's data.
    assert_eq!(
        with("email", Some("ada@@x")),
        "malformed email (column email)"
    );
    assert_eq!(
        with("seats", Some("many")),
        "seats (column seats): not a number"
    );
    assert_eq!(
        with("signed_up_at", Some("someday")),
        "signedUpAt (column signed_up_at): not a date"
    );
    assert_eq!(
        with("trial", Some("perhaps")),
        "trial (column trial): not a boolean"
    );
    assert_eq!(
        with("newsletter", Some("sometimes")),
        "mailing list news (column newsletter): not a boolean"
    );
    let long = "x".repeat(501);
    assert_eq!(
        with("first_name", Some(&long)),
        "firstName (column first_name) is 501 characters long; Loops accepts at most 500"
    );
    assert!(with("newsletter", Some("sometimes")).starts_with("mailing list news"));
}

#[test]
fn user_id_identity() {
    let s = spec(IdentifyBy::UserId);
    let mut row = full_row();
    row.retain(|(c, _)| *c != "email");
    row.push(("email", None));
    assert_eq!(
        transform(&s, &change(ChangeKind::Added, &row))
            .unwrap_err()
            .0,
        "a new contact needs an email"
    );
    // A known contact can be updated without one.
    let op = transform(&s, &change(ChangeKind::Changed, &row)).unwrap();
    let Action::Upsert { email, user_id, .. } = op.action else {
        panic!("not an upsert")
    };
    assert_eq!((email, user_id.as_deref()), (None, Some("42")));
    let mut no_id = full_row();
    no_id.retain(|(c, _)| *c != "id");
    assert_eq!(
        transform(&s, &change(ChangeKind::Added, &no_id))
            .unwrap_err()
            .0,
        "no userId: the contact is identified by userId"
    );
}

#[test]
fn removals_are_not_upserts() {
    let e = transform(&spec(IdentifyBy::Email), &change(ChangeKind::Removed, &[])).unwrap_err();
    assert!(e.0.contains("does not remove"));
}

#[test]
fn mirror_removes_by_the_confirmed_identifier() {
    let mut s = spec(IdentifyBy::Email);
    s.behavior = Behavior::Mirror;
    let mut gone = change(ChangeKind::Removed, &[]);
    gone.confirmed_email = Some("ada@example.com".into());
    gone.confirmed_user_id = Some("42".into());
    let op = transform(&s, &gone).unwrap();
    assert_eq!(
        op.action,
        Action::Delete {
            email: Some("ada@example.com".into()),
            user_id: None
        }
    );
    assert!(op.action.is_removal());
    s.identify_by = IdentifyBy::UserId;
    s.on_remove = OnRemove::Unsubscribe;
    let op = transform(&s, &gone).unwrap();
    assert_eq!(
        op.action,
        Action::Unsubscribe {
            email: None,
            user_id: Some("42".into())
        }
    );
    gone.confirmed_email = None;
    gone.confirmed_user_id = None;
    assert!(transform(&s, &gone).unwrap_err().0.contains("unknown"));
}

#[tokio::test]
async fn the_stage_publishes_operations_and_invalid_outcomes() {
    let bus = Arc::new(LocalBus::default());
    let stage = TransformerStage::new(bus.clone(), [spec(IdentifyBy::Email)]);
    let info = DeliveryInfo {
        subject: "x".into(),
        attempt: 1,
        sequence: 1,
    };
    let good = Bytes::from(codec::encode(&change(ChangeKind::Added, &full_row())));
    stage.handle(&info, &good).await.unwrap();
    assert_eq!(bus.pending(Stage::Loader), 1);
    let mut bad = change(ChangeKind::Added, &full_row());
    bad.key = "43".into();
    bad.values.insert("email".into(), None);
    stage
        .handle(&info, &Bytes::from(codec::encode(&bad)))
        .await
        .unwrap();
    assert_eq!(bus.pending(Stage::Checkpointer), 1);
    // The invalid outcome says the row was an added one: the report counts it as invalid,
    // not as added.
    let mut outcomes = bus.consume(Stage::Checkpointer, 1).await.unwrap();
    let delivered = outcomes.next().await.unwrap().unwrap();
    let invalid: Outcome = codec::decode(&delivered.payload).unwrap();
    assert_eq!(
        (invalid.status, invalid.change, invalid.requests),
        (OutcomeStatus::Invalid, Some(ChangeKind::Added), 0)
    );
    let mut other = change(ChangeKind::Added, &full_row());
    other.sync = "elsewhere".into();
    let e = stage
        .handle(&info, &Bytes::from(codec::encode(&other)))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent);
    let e = stage
        .handle(&info, &Bytes::from_static(b"junk"))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Poison);
}

#[test]
fn trigger_workflows_sends_one_event_named_for_create_or_update() {
    let mut s = spec(IdentifyBy::Email);
    s.trigger_workflows = true;
    for (kind, name) in [
        (ChangeKind::Added, "contactCreated"),
        (ChangeKind::Changed, "contactUpdated"),
    ] {
        let op = transform(&s, &change(kind, &full_row())).unwrap();
        // A creation's key is the record's and its generation's, not its values': a create
        // whose answer was lost, sent again with other values, cannot fire twice.
        let key = if kind == ChangeKind::Added {
            keys::idempotency_key("", "users", "42", 0, "", "created")
        } else {
            keys::idempotency_key("", "users", "42", 0, "fp42", "event")
        };
        assert_eq!(op.idempotency_key, key);
        let mut other_values = change(kind, &full_row());
        other_values.fingerprint = "fp43".into();
        let other = transform(&s, &other_values).unwrap();
        assert_eq!(
            other.idempotency_key == op.idempotency_key,
            kind == ChangeKind::Added
        );
        let Action::Event {
            event_name,
            email,
            properties,
            mailing_lists,
            ..
        } = op.action
        else {
            panic!("not an event");
        };
        assert_eq!(event_name, name);
        assert_eq!(email.as_deref(), Some("ada@example.com"));
        assert_eq!(
            properties["firstName"], "Ada",
            "the contact's properties at top level"
        );
        assert_eq!(mailing_lists.get("news"), Some(&true));
    }
}

#[test]
fn an_email_change_under_email_identity_is_a_rekey() {
    let mut s = spec(IdentifyBy::Email);
    let mut moved = change(ChangeKind::Changed, &full_row());
    moved.confirmed_email = Some("old@example.com".into());
    let op = transform(&s, &moved).unwrap();
    let Action::Rekey {
        write,
        old_email,
        remove_old,
        old_user_id,
    } = &op.action
    else {
        panic!("{:?}", op.action)
    };
    assert_eq!(old_email, "old@example.com");
    assert_eq!(*old_user_id, None);
    assert_eq!(*remove_old, None, "upsert leaves the old contact");
    assert!(matches!(**write, Action::Upsert { .. }));
    assert_eq!(op.action.identity().0, Some("ada@example.com"));
    s.behavior = Behavior::Mirror;
    let Action::Rekey { remove_old, .. } = transform(&s, &moved).unwrap().action else {
        panic!()
    };
    assert_eq!(remove_old, Some(OnRemove::Delete));
    // Only the case changed: the same contact.
    moved.confirmed_email = Some("ADA@example.com".into());
    assert!(matches!(
        transform(&s, &moved).unwrap().action,
        Action::Upsert { .. }
    ));
    // Identified by userId, an email change is a plain update.
    s.identify_by = IdentifyBy::UserId;
    moved.confirmed_email = Some("old@example.com".into());
    assert!(matches!(
        transform(&s, &moved).unwrap().action,
        Action::Upsert { .. }
    ));
}

/// Identified by userId, a record whose userId and email both changed is a re-key: neither
/// identifier of the write finds the old contact, so Loops makes a new one and, under mirror,
/// the old one goes by its old userId. With one identifier unchanged Loops finds the old contact
/// by it and writes the other onto it: a plain update.
#[test]
fn a_user_id_and_email_change_under_user_id_identity_is_a_rekey() {
    let mut s = spec(IdentifyBy::UserId);
    s.behavior = Behavior::Mirror;
    let mut moved = change(ChangeKind::Changed, &full_row());
    moved.confirmed_email = Some("old@example.com".into());
    moved.confirmed_user_id = Some("41".into());
    let Action::Rekey {
        old_user_id,
        old_email,
        remove_old,
        ..
    } = transform(&s, &moved).unwrap().action
    else {
        panic!("not a re-key")
    };
    assert_eq!(old_user_id.as_deref(), Some("41"));
    assert_eq!(old_email, "old@example.com");
    assert_eq!(remove_old, Some(OnRemove::Delete));
    // The email kept: Loops finds the contact by it and takes the new userId.
    moved.confirmed_email = Some("ADA@example.com".into());
    assert!(matches!(
        transform(&s, &moved).unwrap().action,
        Action::Upsert { .. }
    ));
    // The userId kept: found by it.
    moved.confirmed_email = Some("old@example.com".into());
    moved.confirmed_user_id = Some("42".into());
    assert!(matches!(
        transform(&s, &moved).unwrap().action,
        Action::Upsert { .. }
    ));
}

/// The key names the change: the same change (same generation, same fingerprint) has the same
/// key on every retry; the same values at a later generation (a value that went back, a row
/// that returned) are another change with another key.
#[test]
fn the_key_names_the_change_not_the_values() {
    let s = spec(IdentifyBy::Email);
    let first = transform(&s, &change(ChangeKind::Added, &full_row())).unwrap();
    let again = transform(&s, &change(ChangeKind::Added, &full_row())).unwrap();
    assert_eq!(first.idempotency_key, again.idempotency_key);
    let mut later = change(ChangeKind::Changed, &full_row());
    later.generation = 2;
    let later = transform(&s, &later).unwrap();
    assert_ne!(first.idempotency_key, later.idempotency_key);
    let mut other_state = change(ChangeKind::Added, &full_row());
    other_state.installation = "another".into();
    assert_ne!(
        first.idempotency_key,
        transform(&s, &other_state).unwrap().idempotency_key
    );
}

fn event_spec(event: EventName) -> SyncSpec {
    use loopsync_core::spec::AppendSpec;
    let p = |property: &str, column: &str, kind| MappedProperty {
        property: property.into(),
        column: column.into(),
        kind,
    };
    SyncSpec {
        name: "events".into(),
        behavior: Behavior::Append,
        properties: vec![
            p("email", "email", PropertyKind::String),
            p("planName", "plan", PropertyKind::String),
        ],
        lists: vec![],
        append: Some(AppendSpec {
            event,
            event_properties: vec![
                p("amount", "amount", PropertyKind::Number),
                p("at", "occurred_at", PropertyKind::Date),
                p("note", "note", PropertyKind::String),
            ],
            cursor: None,
        }),
        ..spec(IdentifyBy::Email)
    }
}

fn event_row(pairs: &[(&str, Option<&str>)]) -> RowChange {
    let mut c = change(ChangeKind::Added, pairs);
    c.sync = "events".into();
    c
}

/// An event sync's row is one event: its name from the column, the contact's identity and
/// properties at the top, typed event properties (a date as ISO-8601 text, a NULL left out),
/// and a key of (sync, event id) alone — not of the values, the generation or the state.
#[test]
fn an_event_row_is_one_event_keyed_by_its_id() {
    let spec = event_spec(EventName::Column("name".into()));
    let row = [
        ("email", Some(" Ann@X.co ")),
        ("plan", Some("pro")),
        ("name", Some("invoicePaid")),
        ("amount", Some("12.50")),
        ("occurred_at", Some("2026-01-02 03:04:05+00")),
        ("note", None),
    ];
    let op = transform(&spec, &event_row(&row)).unwrap();
    assert_eq!(
        op.idempotency_key,
        loopsync_core::keys::event_key("events", "42")
    );
    let Action::Event {
        event_name,
        email,
        properties,
        event_properties,
        ..
    } = &op.action
    else {
        panic!("{:?}", op.action)
    };
    assert_eq!(event_name, "invoicePaid");
    assert_eq!(email.as_deref(), Some("ann@x.co"));
    assert_eq!(json!(properties), json!({"planName": "pro"}));
    assert_eq!(
        json!(event_properties),
        json!({"amount": 12.5, "at": "2026-01-02T03:04:05.000Z"})
    );
    let mut other = event_row(&row);
    other.generation = 5;
    other.fingerprint = "another".into();
    other.installation = "another state".into();
    assert_eq!(
        transform(&spec, &other).unwrap().idempotency_key,
        op.idempotency_key
    );
    let fixed = event_spec(EventName::Fixed("trialStarted".into()));
    let Action::Event { event_name, .. } = transform(&fixed, &event_row(&row)).unwrap().action
    else {
        panic!()
    };
    assert_eq!(event_name, "trialStarted");
}

/// What cannot be an event is invalid, with the reason.
#[test]
fn invalid_events_say_why() {
    let spec = event_spec(EventName::Column("name".into()));
    let reason =
        |pairs: &[(&str, Option<&str>)]| transform(&spec, &event_row(pairs)).unwrap_err().0;
    let ok = [("email", Some("a@x.co")), ("name", Some("paid"))];
    assert!(reason(&[("email", Some("a@x.co")), ("name", None)]).contains("no event name"));
    assert!(reason(&[("email", Some("a@x.co")), ("name", Some("  "))]).contains("no event name"));
    let colon = reason(&[("email", Some("a@x.co")), ("name", Some("a:b"))]);
    assert!(colon.contains("`:`") && !colon.contains("a:b"), "{colon}");
    assert!(reason(&[("email", None), ("name", Some("paid"))]).contains("no email"));
    let mut bad = ok.to_vec();
    bad.push(("amount", Some("lots")));
    let amount = reason(&bad);
    assert!(
        amount.contains("event property amount") && !amount.contains("lots"),
        "{amount}"
    );
    let long = "x".repeat(501);
    let mut bad = ok.to_vec();
    bad.push(("note", Some(&long)));
    assert!(reason(&bad).contains("501 characters"));
    let mut gone = event_row(&ok);
    gone.kind = ChangeKind::Removed;
    assert!(
        transform(&spec, &gone)
            .unwrap_err()
            .0
            .contains("removes nothing")
    );
}

/// Identified by userId, an event addresses a contact that may exist already: without an email
/// it is sent (Loops refuses it if the contact does not exist); without a userId it is invalid.
#[test]
fn an_event_by_user_id_needs_no_email() {
    let mut spec = event_spec(EventName::Fixed("paid".into()));
    spec.identify_by = IdentifyBy::UserId;
    spec.properties.push(MappedProperty {
        property: "userId".into(),
        column: "user_id".into(),
        kind: PropertyKind::String,
    });
    let op = transform(&spec, &event_row(&[("user_id", Some("u-7"))])).unwrap();
    assert_eq!(op.action.identity(), (None, Some("u-7")));
    let e = transform(&spec, &event_row(&[("email", Some("a@x.co"))])).unwrap_err();
    assert!(e.0.contains("no userId"), "{e:?}");
}
