use std::collections::BTreeMap;

use loopsync_bus::LocalBus;
use loopsync_bus::worker::{self, Backoff, WorkerOptions};
use loopsync_core::envelope::{ChangeKind, VERSION};
use loopsync_core::stage::Stage;
use loopsync_loops_client::{ApiKey, ClientConfig};
use loopsync_simulator::{Faults, Settings, SimConfig, SimHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;

fn op(
    run_id: i64,
    key: &str,
    fingerprint: &str,
    email: Option<&str>,
    user_id: Option<&str>,
) -> Operation {
    Operation {
        v: VERSION,
        sync: "users".into(),
        run_id,
        key: key.into(),
        fingerprint: fingerprint.into(),
        change: ChangeKind::Added,
        idempotency_key: keys::idempotency_key("i", "users", key, 0, fingerprint, "upsert"),
        action: Action::Upsert {
            email: email.map(str::to_owned),
            user_id: user_id.map(str::to_owned),
            properties: json!({"firstName": format!("F{key}")})
                .as_object()
                .unwrap()
                .clone(),
            mailing_lists: BTreeMap::new(),
        },
        installation: "i".into(),
        also_remove: None,
    }
}

#[test]
fn ledger_verdicts() {
    let o = op(5, "1", "fpB", Some("a@x.co"), None);
    let entry = |run_id, fp: &str| LedgerEntry {
        run_id,
        fingerprint: fp.into(),
        contact_id: Some("c".into()),
        claim: None,
        idempotency_key: None,
    };
    assert_eq!(verdict(&o, None), LedgerVerdict::Send);
    assert_eq!(verdict(&o, Some(&entry(4, "fpA"))), LedgerVerdict::Send);
    assert_eq!(verdict(&o, Some(&entry(6, "fpC"))), LedgerVerdict::Stale);
    assert_eq!(
        verdict(&o, Some(&entry(5, "fpB"))),
        LedgerVerdict::AlreadyConfirmed(Some("c".into()))
    );
    // The same run with another fingerprint cannot be confirmed yet: send.
    assert_eq!(verdict(&o, Some(&entry(5, "fpX"))), LedgerVerdict::Send);
    // The same change (its idempotency key) confirmed by an earlier run: an interrupted run's
    // queue was sent after the next run extracted the record again. Nothing to send.
    let same_change = LedgerEntry {
        idempotency_key: Some(o.idempotency_key.clone()),
        ..entry(4, "fpB")
    };
    assert_eq!(
        verdict(&o, Some(&same_change)),
        LedgerVerdict::AlreadyConfirmed(Some("c".into()))
    );
    // Another change that happens to have the same fingerprint (a value that went back: a
    // later generation, another key) is sent.
    let earlier_generation = LedgerEntry {
        idempotency_key: Some(keys::idempotency_key("i", "users", "1", 7, "fpB", "upsert")),
        ..entry(4, "fpB")
    };
    assert_eq!(verdict(&o, Some(&earlier_generation)), LedgerVerdict::Send);
}

async fn sim(rate_limit: u32) -> SimHandle {
    loopsync_simulator::spawn(SimConfig {
        settings: Settings {
            rate_limit,
            ..Settings::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn stage(bus: Arc<LocalBus>, sim: &SimHandle, rps: u32) -> Arc<LoaderStage> {
    let client = LoopsClient::new(ClientConfig::new(
        sim.base_url(),
        ApiKey::new("test-key").unwrap(),
    ))
    .unwrap();
    let budget = RateBudget::shared(
        bus.clone(),
        ApiKey::new("test-key").unwrap().budget_name(),
        rps,
    );
    Arc::new(LoaderStage::new(bus.clone(), bus, client, budget))
}

fn info(attempt: u32) -> DeliveryInfo {
    DeliveryInfo {
        subject: "loopsync.ops.users".into(),
        attempt,
        sequence: 1,
    }
}

async fn outcomes(bus: &LocalBus, n: usize) -> Vec<Outcome> {
    let mut consumer = bus.consume(Stage::Checkpointer, 1).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push(codec::decode::<Outcome>(&d.payload).unwrap());
        d.acker.ack().await.unwrap();
    }
    out
}

#[tokio::test]
async fn confirmed_then_redelivered_then_stale() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let first = Bytes::from(codec::encode(&op(5, "1", "fpA", Some("ann@x.co"), None)));
    loader.handle(&info(1), &first).await.unwrap();
    // The same message again (its ack was lost): no second request.
    loader.handle(&info(2), &first).await.unwrap();
    // An older run's operation for the same record: no request.
    let older = Bytes::from(codec::encode(&op(4, "1", "fpOld", Some("ann@x.co"), None)));
    loader.handle(&info(1), &older).await.unwrap();
    assert_eq!(sim.stats().total_requests, 1);
    // The redelivery's outcome repeats the first one's message id: the bus keeps one.
    let out = outcomes(&bus, 2).await;
    assert_eq!(out[0].status, OutcomeStatus::Confirmed);
    assert_eq!(out[0].requests, 1);
    let contact_id = sim.contacts()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(out[0].contact_id.as_deref(), Some(contact_id.as_str()));
    assert_eq!(out[1].status, OutcomeStatus::Skipped);
    assert_eq!(bus.pending(Stage::Checkpointer), 0);
    assert_eq!(sim.contacts()[0]["firstName"], "F1");
}

#[tokio::test]
async fn loops_refusal_is_permanent_and_rejection_is_recorded() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let unknown = Bytes::from(codec::encode(&op(1, "9", "fp", None, Some("nobody"))));
    let error = loader.handle(&info(1), &unknown).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent);
    loader
        .give_up(&info(1), &unknown, Fate::Rejected, &error.to_string())
        .await
        .unwrap();
    // The attempt reported its request before the error went to the worker loop; the
    // rejection itself carries none.
    let out = outcomes(&bus, 2).await;
    assert_eq!(
        (out[0].status, out[0].requests, out[0].counts.writes),
        (OutcomeStatus::Attempted, 1, 1)
    );
    assert_eq!(out[1].status, OutcomeStatus::Rejected);
    assert!(
        out[1]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("invalid request (400)")
    );
    assert_eq!(out[1].requests, 0);
}

/// Reads outcomes until `n` of them are final; returns them all, `attempted` ones included.
async fn outcomes_until_final(bus: &LocalBus, n: usize) -> Vec<Outcome> {
    let mut consumer = bus.consume(Stage::Checkpointer, 1).await.unwrap();
    let mut out = Vec::new();
    while out
        .iter()
        .filter(|o: &&Outcome| o.status.is_final())
        .count()
        < n
    {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push(codec::decode::<Outcome>(&d.payload).unwrap());
        d.acker.ack().await.unwrap();
    }
    out
}

/// The requests of every outcome, `attempted` ones included.
fn total(out: &[Outcome]) -> RequestCounts {
    let mut sum = RequestCounts::default();
    for o in out {
        sum.add(&o.counts);
        assert_eq!(o.requests, o.counts.total(), "{o:?}");
    }
    sum
}

/// A failed attempt's requests reach the outcomes before its error reaches the worker loop:
/// a re-key whose removal fails (503) after its write went through, then a 429; the attempt
/// that succeeds counts its requests as retries.
#[tokio::test]
async fn a_failed_attempts_requests_reach_the_outcomes() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let mut o = op(1, "5", "fp2", Some("new@x.co"), None);
    o.change = ChangeKind::Changed;
    o.action = Action::Rekey {
        write: Box::new(o.action.clone()),
        old_email: "old@x.co".into(),
        remove_old: Some(OnRemove::Delete),
        old_user_id: None,
    };
    let payload = Bytes::from(codec::encode(&o));
    sim.set_faults(Faults {
        error_503: 1.0,
        endpoints: vec!["POST /v1/contacts/delete".into()],
        ..Faults::default()
    })
    .unwrap();
    let first = loader
        .handle(
            &DeliveryInfo {
                sequence: 7,
                ..info(1)
            },
            &payload,
        )
        .await
        .unwrap_err();
    assert_eq!(first.class(), ErrorClass::RETRY);
    sim.set_faults(Faults {
        rate_limit_429: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let second = loader
        .handle(
            &DeliveryInfo {
                sequence: 7,
                ..info(2)
            },
            &payload,
        )
        .await
        .unwrap_err();
    assert!(second.class().is_retryable());
    sim.set_faults(Faults::default()).unwrap();
    loader
        .handle(
            &DeliveryInfo {
                sequence: 7,
                ..info(3)
            },
            &payload,
        )
        .await
        .unwrap();

    let out = outcomes_until_final(&bus, 1).await;
    let statuses: Vec<_> = out.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [
            OutcomeStatus::Attempted,
            OutcomeStatus::Attempted,
            OutcomeStatus::Confirmed
        ]
    );
    let attempts: Vec<_> = out.iter().map(|o| o.attempt.as_deref()).collect();
    assert_eq!(attempts, [Some("7.1"), Some("7.2"), None]);
    assert!(out.iter().all(|o| o.change == Some(ChangeKind::Changed)));
    let c = |writes, deletes, retries, rate_limited| RequestCounts {
        writes,
        deletes,
        retries,
        rate_limited,
        ..RequestCounts::default()
    };
    // The write, then the removal that failed.
    assert_eq!(out[0].counts, c(1, 1, 0, 0));
    assert!(out[0].reason.as_deref().unwrap().contains("503"));
    // The write again, refused 429: the removal was never sent.
    assert_eq!(out[1].counts, c(1, 0, 1, 1));
    // Both again, both retries.
    assert_eq!(out[2].counts, c(1, 1, 2, 0));
    let sum = total(&out);
    let stats = sim.stats();
    assert_eq!(u64::from(sum.total()), stats.total_requests);
    assert_eq!(u64::from(sum.rate_limited), stats.rate_limited);
    assert_eq!(u64::from(sum.writes), 3);
    assert_eq!(stats.by_endpoint["PUT /v1/contacts/update"]["429"], 1);
    assert_eq!(stats.by_endpoint["POST /v1/contacts/delete"]["503"], 1);
}

/// An operation the worker loop gives up on: each attempt counted once, the dead letter
/// carries none, and the sum is what the simulator saw.
#[tokio::test]
async fn given_up_attempts_are_each_counted_once() {
    let sim = sim(1000).await;
    sim.set_faults(Faults {
        drop_connection: 0.5,
        error_500: 0.5,
        seed: Some(2),
        ..Faults::default()
    })
    .unwrap();
    let bus = Arc::new(LocalBus::default());
    publish::operation(&*bus, &op(1, "1", "fp", Some("d@x.co"), None))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(worker::run(
        bus.clone(),
        Stage::Loader,
        stage(bus.clone(), &sim, 1000),
        WorkerOptions {
            concurrency: 1,
            max_attempts: 3,
            backoff: Backoff {
                base: Duration::from_millis(5),
                cap: Duration::from_millis(20),
            },
            progress_every: None,
            shutdown_grace: worker::SHUTDOWN_GRACE,
        },
        stop.clone(),
    ));
    let out = outcomes_until_final(&bus, 1).await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    let statuses: Vec<_> = out.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [
            OutcomeStatus::Attempted,
            OutcomeStatus::Attempted,
            OutcomeStatus::Attempted,
            OutcomeStatus::DeadLettered
        ]
    );
    assert_eq!(out[3].requests, 0);
    let sum = total(&out);
    assert_eq!((sum.writes, sum.retries), (3, 2));
    assert_eq!(u64::from(sum.total()), sim.stats().total_requests);
}

/// Through the worker loop, against a Loops that fails half the time (before or after the
/// effect): every operation ends confirmed, and the sim holds each contact once.
#[tokio::test]
async fn flaky_loops_still_converges() {
    let sim = sim(1000).await;
    sim.set_faults(Faults {
        error_503: 0.2,
        error_502: 0.1,
        drop_connection: 0.1,
        rate_limit_429: 0.1,
        after_effect: 0.5,
        seed: Some(11),
        ..Faults::default()
    })
    .unwrap();
    let bus = Arc::new(LocalBus::default());
    let n = 40;
    for i in 0..n {
        let o = op(1, &i.to_string(), "fp", Some(&format!("u{i}@x.co")), None);
        publish::operation(&*bus, &o).await.unwrap();
    }
    let stop = CancellationToken::new();
    let worker = tokio::spawn(worker::run(
        bus.clone(),
        Stage::Loader,
        stage(bus.clone(), &sim, 1000),
        WorkerOptions {
            concurrency: 4,
            max_attempts: 30,
            backoff: Backoff {
                base: Duration::from_millis(5),
                cap: Duration::from_millis(50),
            },
            progress_every: None,
            shutdown_grace: worker::SHUTDOWN_GRACE,
        },
        stop.clone(),
    ));
    let out = outcomes_until_final(&bus, n).await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    assert!(
        out.iter()
            .filter(|o| o.status.is_final())
            .all(|o| o.status == OutcomeStatus::Confirmed),
        "{out:?}"
    );
    let sum = total(&out);
    assert!(sum.total() > n as u32, "faults cost retries: {sum:?}");
    assert_eq!(sim.contacts().as_array().unwrap().len(), n);
    let stats = sim.stats();
    assert_eq!(
        stats.total_requests,
        u64::from(sum.total()),
        "every request is counted once"
    );
    assert_eq!(stats.rate_limited, u64::from(sum.rate_limited));
    assert!(sum.rate_limited > 0 && sum.retries > 0, "{sum:?}");
}

/// The pacer keeps a burst of work under a sliding-window limit equal to the budget.
#[tokio::test]
async fn pacing_never_trips_the_rate_limit() {
    let sim = sim(20).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 20);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let loader = loader.clone();
        tasks.push(tokio::spawn(async move {
            let o = op(1, &i.to_string(), "fp", Some(&format!("p{i}@x.co")), None);
            loader
                .handle(&info(1), &Bytes::from(codec::encode(&o)))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = sim.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(stats.max_accepted_in_one_second <= 20);
    assert_eq!(stats.total_requests, 30);
}

/// An event whose first answer was lost (502 after the effect) is retried with the same key;
/// Loops answers 409; the record is confirmed and the event fired once.
#[tokio::test]
async fn event_retried_after_a_lost_answer_fires_once() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let mut o = op(1, "7", "fp", Some("e@x.co"), None);
    o.idempotency_key = keys::idempotency_key("i", "users", "7", 0, "fp", "event");
    o.action = Action::Event {
        event_name: "contactCreated".into(),
        email: Some("e@x.co".into()),
        user_id: None,
        properties: json!({"firstName": "Eve"}).as_object().unwrap().clone(),
        mailing_lists: BTreeMap::new(),
        event_properties: Default::default(),
    };
    let payload = Bytes::from(codec::encode(&o));
    sim.set_faults(Faults {
        error_502: 1.0,
        after_effect: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let lost = loader.handle(&info(1), &payload).await.unwrap_err();
    assert_eq!(lost.class(), ErrorClass::RETRY);
    sim.set_faults(Faults::default()).unwrap();
    loader.handle(&info(2), &payload).await.unwrap();
    let out = outcomes_until_final(&bus, 1).await;
    assert_eq!(out[1].status, OutcomeStatus::Confirmed);
    let sum = total(&out);
    // The 409 applied nothing: the contact write is made sure of by an update.
    assert_eq!((sum.events, sum.writes, sum.retries), (2, 1, 2));
    let events = sim.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].idempotency_key.as_deref(),
        Some(o.idempotency_key.as_str())
    );
    assert_eq!(sim.contacts()[0]["firstName"], "Eve");
    let fired = sim
        .workflows()
        .iter()
        .filter(|w| w.kind == "event_received")
        .count();
    assert_eq!(fired, 1);
    assert_eq!(sim.stats().by_endpoint["POST /v1/events/send"]["409"], 1);
}

/// An event sync's event that Loops took before (409) is done: its contact values are not
/// written again, since they may be older than a later event's.
#[tokio::test]
async fn an_event_syncs_409_writes_no_contact() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let event = |run: i64, key: &str, id: &str, plan: &str| {
        let mut o = op(run, key, "fp", Some("e@x.co"), None);
        o.idempotency_key = keys::event_key("events", id);
        o.action = Action::Event {
            event_name: "paid".into(),
            email: Some("e@x.co".into()),
            user_id: None,
            properties: json!({"userGroup": plan}).as_object().unwrap().clone(),
            mailing_lists: BTreeMap::new(),
            event_properties: Default::default(),
        };
        Bytes::from(codec::encode(&o))
    };
    loader
        .handle(&info(1), &event(1, "1", "1", "free"))
        .await
        .unwrap();
    loader
        .handle(&info(1), &event(1, "2", "2", "gold"))
        .await
        .unwrap();
    // The older event again (a `dlq replay`, run 2): Loops answers 409, and the contact keeps
    // "gold".
    loader
        .handle(&info(1), &event(2, "1", "1", "free"))
        .await
        .unwrap();
    let out = outcomes_until_final(&bus, 3).await;
    assert!(out.iter().all(|o| o.status == OutcomeStatus::Confirmed));
    assert_eq!(sim.stats().by_endpoint["POST /v1/events/send"]["409"], 1);
    assert_eq!(sim.contacts()[0]["userGroup"], "gold");
    assert!(
        !sim.stats()
            .by_endpoint
            .contains_key("PUT /v1/contacts/update")
    );
}

/// A claim is judged by how long this loader has seen it unchanged, never by the writer's
/// clock: a claim whose `until_ms` is long past (the reader's clock an hour ahead) still holds
/// until it has been watched for a whole claim (case 6).
/// A later run's copy of a change the ledger confirmed is answered from the ledger — unless it
/// has contacts to take out (a later version, its answer lost, may have been applied since).
#[test]
fn a_change_with_contacts_to_take_out_is_sent_again() {
    let confirmed = op(1, "1", "fp", Some("a@x.co"), None);
    let entry = LedgerEntry {
        run_id: 1,
        fingerprint: "fp".into(),
        contact_id: None,
        claim: None,
        idempotency_key: Some(confirmed.idempotency_key.clone()),
    };
    let mut again = confirmed.clone();
    again.run_id = 3;
    assert_eq!(
        verdict(&again, Some(&entry)),
        LedgerVerdict::AlreadyConfirmed(None)
    );
    again.also_remove = Some(loopsync_core::envelope::AlsoRemove {
        mode: OnRemove::Delete,
        contacts: vec![loopsync_core::envelope::OldContact {
            email: Some("c@x.co".into()),
            user_id: None,
        }],
    });
    assert_eq!(verdict(&again, Some(&entry)), LedgerVerdict::Send);
}

#[test]
fn claim_verdicts() {
    let o = op(5, "1", "fpB", Some("a@x.co"), None);
    let claimed = |run_id, fp: &str, until_ms| LedgerEntry {
        claim: Some(Claim {
            run_id,
            fingerprint: fp.into(),
            until_ms,
        }),
        ..LedgerEntry::default()
    };
    let now = Duration::ZERO;
    assert_eq!(claim_verdict(&o, None, now), ClaimVerdict::Free);
    assert_eq!(
        claim_verdict(&o, Some(&claimed(6, "fpC", 200)), now),
        ClaimVerdict::Newer
    );
    assert_eq!(
        claim_verdict(&o, Some(&claimed(4, "fpA", 200)), now),
        ClaimVerdict::Older
    );
    // Written by a clock an hour behind this one: "lapsed" by this clock, but just written.
    let an_hour_ago = now_ms() - 3_600_000;
    assert_eq!(
        claim_verdict(&o, Some(&claimed(6, "fpC", an_hour_ago)), now),
        ClaimVerdict::Newer,
        "a claim is not judged by the writer's clock"
    );
    assert_eq!(
        claim_verdict(
            &o,
            Some(&claimed(4, "fpA", an_hour_ago)),
            CLAIM - Duration::from_millis(1)
        ),
        ClaimVerdict::Older
    );
    assert_eq!(
        claim_verdict(&o, Some(&claimed(4, "fpA", i64::MAX)), CLAIM),
        ClaimVerdict::Free,
        "a claim watched unchanged for a whole claim has lapsed, whatever it says"
    );
    assert_eq!(
        claim_verdict(&o, Some(&claimed(5, "fpB", i64::MAX)), now),
        ClaimVerdict::Free,
        "its own claim, from an attempt that died"
    );
}

/// Where Loops consumes the key of a request that failed before its effect, the retry meets
/// 409 although nothing was applied: the contact write still lands (the event of that change
/// is lost — Loops holds its key — and never fires twice).
#[tokio::test]
async fn a_409_is_not_taken_as_proof_of_the_contact_write() {
    let sim = sim(100).await;
    sim.set_settings(Settings {
        rate_limit: 100,
        keys_consumed_on_failure: true,
        ..Settings::default()
    })
    .unwrap();
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let mut o = op(1, "8", "fp", Some("f@x.co"), None);
    o.idempotency_key = keys::idempotency_key("i", "users", "8", 0, "fp", "event");
    o.action = Action::Event {
        event_name: "contactCreated".into(),
        email: Some("f@x.co".into()),
        user_id: None,
        properties: json!({"firstName": "Fay"}).as_object().unwrap().clone(),
        mailing_lists: BTreeMap::new(),
        event_properties: Default::default(),
    };
    let payload = Bytes::from(codec::encode(&o));
    sim.set_faults(Faults {
        error_503: 1.0,
        after_effect: 0.0,
        ..Faults::default()
    })
    .unwrap();
    loader.handle(&info(1), &payload).await.unwrap_err();
    sim.set_faults(Faults::default()).unwrap();
    assert_eq!(sim.contacts(), json!([]), "nothing applied by the 503");
    loader.handle(&info(2), &payload).await.unwrap();
    assert_eq!(sim.stats().by_endpoint["POST /v1/events/send"]["409"], 1);
    let contacts = sim.contacts();
    assert_eq!(
        contacts.as_array().unwrap().len(),
        1,
        "the contact write landed after the 409"
    );
    assert_eq!(contacts[0]["firstName"], "Fay");
    assert!(
        sim.events().is_empty(),
        "at most once: the consumed key never fires"
    );
}

/// Two versions of one record in flight at once (a run restarted while its operations were
/// queued): the older waits while the newer is sent, or is skipped once the newer is; Loops
/// ends with the newer, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_in_flight_land_in_order() {
    for older_first in [true, false] {
        let sim = sim(1000).await;
        sim.set_faults(Faults {
            latency_ms: 150,
            ..Faults::default()
        })
        .unwrap();
        let bus = Arc::new(LocalBus::default());
        let loader = stage(bus.clone(), &sim, 1000);
        let older = {
            let mut o = op(5, "9", "fp-old", Some("g@x.co"), None);
            o.action = Action::Upsert {
                email: Some("g@x.co".into()),
                user_id: None,
                properties: json!({"firstName": "Old"}).as_object().unwrap().clone(),
                mailing_lists: BTreeMap::new(),
            };
            o
        };
        let newer = {
            let mut o = op(6, "9", "fp-new", Some("g@x.co"), None);
            o.action = Action::Upsert {
                email: Some("g@x.co".into()),
                user_id: None,
                properties: json!({"firstName": "New"}).as_object().unwrap().clone(),
                mailing_lists: BTreeMap::new(),
            };
            o
        };
        let (first, second) = if older_first {
            (older.clone(), newer.clone())
        } else {
            (newer.clone(), older.clone())
        };
        let (a, b) = (loader.clone(), loader.clone());
        let first_task = tokio::spawn(async move {
            a.handle(&info(1), &Bytes::from(codec::encode(&first)))
                .await
                .unwrap()
        });
        // The second starts while the first's request is in flight.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let second_task = tokio::spawn(async move {
            b.handle(&info(1), &Bytes::from(codec::encode(&second)))
                .await
                .unwrap()
        });
        first_task.await.unwrap();
        second_task.await.unwrap();
        assert_eq!(
            sim.contacts()[0]["firstName"],
            "New",
            "older first: {older_first}"
        );
        let out = outcomes_until_final(&bus, 2).await;
        let older_outcome = out
            .iter()
            .find(|o| o.run_id == 5 && o.status.is_final())
            .unwrap();
        if older_first {
            assert_eq!(older_outcome.status, OutcomeStatus::Confirmed);
        } else {
            assert_eq!(older_outcome.status, OutcomeStatus::Skipped);
        }
        let entry = bus
            .ledger_get(&keys::ledger_key("i", "users", "9"))
            .await
            .unwrap()
            .unwrap();
        let entry: LedgerEntry = codec::decode(&entry.value).unwrap();
        assert_eq!((entry.run_id, entry.claim), (6, None));
    }
}

/// Case 6 of "Adversarial histories": a request starts only while the record's claim covers its
/// whole timeout, so no request of a claim can end after the claim.
#[tokio::test]
async fn no_request_starts_that_the_claim_cannot_cover() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let loader = stage(bus.clone(), &sim, 100);
    let soon = tokio::time::Instant::now() + Duration::from_secs(1);
    let error = loader.ready_within(soon).await.unwrap_err();
    assert!(matches!(error, LoadError::ClaimTooShort), "{error}");
    assert!(matches!(error.class(), ErrorClass::Retryable { .. }));
    let later = tokio::time::Instant::now() + CLAIM;
    loader.ready_within(later).await.unwrap();
    assert_eq!(sim.stats().total_requests, 0);
}

/// Case 6: a request that timed out may still land at Loops: its claim is kept (another version
/// waits it out, and cannot overtake it); a 5xx releases it at once (nothing lands later).
#[tokio::test]
async fn a_timed_out_request_keeps_its_claim() {
    let sim = sim(100).await;
    let bus = Arc::new(LocalBus::default());
    let client = LoopsClient::new({
        let mut c = ClientConfig::new(sim.base_url(), ApiKey::new("test-key").unwrap());
        c.timeout = Duration::from_millis(300);
        c
    })
    .unwrap();
    let budget = RateBudget::shared(bus.clone(), "team".into(), 100);
    let loader = LoaderStage::new(bus.clone(), bus.clone(), client, budget);
    sim.set_faults(Faults {
        latency_ms: 1_000,
        ..Faults::default()
    })
    .unwrap();
    let o = op(1, "1", "fpA", Some("ann@x.co"), None);
    let payload = Bytes::from(codec::encode(&o));
    let error = loader.handle(&info(1), &payload).await.unwrap_err();
    assert!(
        matches!(error, LoadError::Loops(LoopsError::Timeout(_))),
        "{error}"
    );
    let key = keys::ledger_key(&o.installation, &o.sync, &o.key);
    let (entry, _) = loader.ledger(&key).await.unwrap();
    assert!(entry.as_ref().unwrap().claim.is_some(), "the claim is kept");
    // Written again (a new revision): another loader watches it a whole claim from now.
    let (_, revision) = loader.ledger(&key).await.unwrap();
    assert_eq!(revision, Some(2), "claimed, then the claim written again");
    // A newer version waits for it.
    let newer = op(2, "1", "fpB", Some("ann@x.co"), None);
    assert_eq!(
        claim_verdict(&newer, entry.as_ref(), Duration::ZERO),
        ClaimVerdict::Older
    );
    // A 5xx releases it.
    sim.set_faults(Faults {
        error_503: 1.0,
        ..Faults::default()
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    loader.handle(&info(2), &payload).await.unwrap_err();
    let (entry, _) = loader.ledger(&key).await.unwrap();
    assert_eq!(entry.unwrap().claim, None);
}

/// The real ledger, its reads counted.
struct CountedReads {
    ledger: Arc<LocalBus>,
    reads: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Coordination for CountedReads {
    async fn ledger_get(&self, key: &str) -> Result<Option<loopsync_bus::Versioned>, BusError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.ledger.ledger_get(key).await
    }

    async fn ledger_swap(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        self.ledger.ledger_swap(key, value, expected).await
    }

    async fn ledger_forget(&self, key: &str) -> Result<bool, BusError> {
        self.ledger.ledger_forget(key).await
    }

    async fn rate_slot(
        &self,
        budget: &str,
        period: Duration,
        slack: Duration,
        count: u32,
        taker: &loopsync_bus::budget::Taker,
    ) -> Result<(u64, u32), BusError> {
        self.ledger
            .rate_slot(budget, period, slack, count, taker)
            .await
    }
}

/// A record new to the sync is claimed without reading its ledger entry first (one round trip
/// to the bus fewer); where it has an entry after all, the claim fails, the entry is read, and
/// the ledger decides as ever. A change of a record sent before reads first.
#[tokio::test]
async fn a_new_record_is_claimed_without_a_read() {
    let sim = sim(1000).await;
    let bus = Arc::new(LocalBus::default());
    let counted = Arc::new(CountedReads {
        ledger: bus.clone(),
        reads: Default::default(),
    });
    let client = LoopsClient::new(ClientConfig::new(
        sim.base_url(),
        ApiKey::new("test-key").unwrap(),
    ))
    .unwrap();
    let budget = RateBudget::shared(bus.clone(), "team".into(), 1000);
    let loader = LoaderStage::new(bus.clone(), counted.clone(), client, budget);
    let reads = || counted.reads.load(std::sync::atomic::Ordering::SeqCst);

    let new = op(5, "1", "fpA", Some("ann@x.co"), None);
    loader
        .handle(&info(1), &Bytes::from(codec::encode(&new)))
        .await
        .unwrap();
    assert_eq!(reads(), 0, "a new record's entry is not read");
    assert_eq!(sim.stats().total_requests, 1);

    // Its redelivery (the ack was lost) has an entry: the claim fails, the entry is read, and
    // it is answered from the ledger.
    loader
        .handle(&info(2), &Bytes::from(codec::encode(&new)))
        .await
        .unwrap();
    assert_eq!(reads(), 1);
    // An older run's version of it, new to that run: skipped, still without a request.
    let older = op(4, "1", "fpOld", Some("ann@x.co"), None);
    loader
        .handle(&info(1), &Bytes::from(codec::encode(&older)))
        .await
        .unwrap();
    assert_eq!(reads(), 2);
    assert_eq!(sim.stats().total_requests, 1);

    // A change of a record Loops confirmed reads its entry first.
    let mut changed = op(6, "1", "fpB", Some("ann@x.co"), None);
    changed.change = ChangeKind::Changed;
    loader
        .handle(&info(1), &Bytes::from(codec::encode(&changed)))
        .await
        .unwrap();
    assert_eq!(reads(), 3);
    assert_eq!(sim.stats().total_requests, 2);

    let statuses: Vec<OutcomeStatus> = outcomes(&bus, 3).await.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [
            OutcomeStatus::Confirmed,
            OutcomeStatus::Skipped,
            OutcomeStatus::Confirmed
        ]
    );
}
