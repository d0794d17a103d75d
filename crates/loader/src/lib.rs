//! The loader: applies operations to Loops.
//!
//! * One rate budget per Loops team, shared by every loader process through the bus (a GCRA
//!   slot in a JetStream key-value entry; governor in process), paced evenly at
//!   `requests_per_second` with no burst: Loops' window may be a sliding second, and a burst at a
//!   window's edge would cost 429s.
//! * Loops' answer is classified once, by the client ([`loopsync_loops_client::classify`]); the
//!   worker loop turns the class into ack, nak(delay) or term. A 429's `Retry-After` becomes the
//!   nak delay.
//! * A ledger on the bus holds the last version Loops confirmed per record: an operation older
//!   than it is acked without a request (a *skipped* outcome), and a redelivery of an operation
//!   already confirmed is answered from the ledger.
//! * Retries reuse the operation's idempotency key; the operation is the same bytes every time.
//!   An event answered 409 carried a key we sent before: an earlier attempt was applied (its
//!   answer lost), so it counts as confirmed.
//! * Every request is counted where it is sent, by kind ([`AttemptRequests`]). The outcome
//!   that settles a record carries the requests of its own attempt; an attempt that fails
//!   after sending publishes its requests first, as an `attempted` outcome, so the run report
//!   counts them although the message is naked and tried again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_bus::worker::{DeliveryInfo, Fate, Handler};
use loopsync_bus::{BusError, Coordination, Messaging, RateBudget, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    Action, ChangeKind, Operation, Outcome, OutcomeStatus, POSSIBLY_CREATED, RequestCounts,
    RequestKind,
};
use loopsync_core::spec::OnRemove;
use loopsync_core::{Classified, ErrorClass, keys};
use loopsync_loops_client::{
    ContactIdentity, ContactPayload, EventPayload, IdempotencyKey, LoopsClient, LoopsError,
};
use serde::{Deserialize, Serialize};

/// What can go wrong applying an operation.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Loops(#[from] LoopsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The record's claim would end before the next request could (its answer within the
    /// client's timeout): not sent, tried again with a new claim.
    #[error("the record's claim would lapse before a request could end: not sent")]
    ClaimTooShort,
}

impl Classified for LoadError {
    fn class(&self) -> ErrorClass {
        match self {
            LoadError::Decode(e) => e.class(),
            LoadError::Loops(e) => e.class(),
            LoadError::Bus(e) => e.class(),
            LoadError::ClaimTooShort => ErrorClass::RETRY,
        }
    }
}

impl LoadError {
    /// What the attempt sent may still reach Loops: no answer came within the timeout, so the
    /// request may be in flight yet. (A 5xx or a dropped connection is an end: Loops applied it
    /// or not, but nothing lands later.)
    fn may_land_late(&self) -> bool {
        matches!(self, LoadError::Loops(LoopsError::Timeout(_)))
    }
}

/// How long a loader may hold a record's claim ([`loopsync_core::tuning::CLAIM`]). A request
/// starts only while the claim still covers its whole timeout ([`LoadError::ClaimTooShort`]), so
/// no request of a claim can end after it; a claim whose request timed out (it may still be in
/// flight) is kept, so another version waits it out and cannot land before it.
pub use loopsync_core::tuning::CLAIM;

/// Per record: the last version Loops confirmed, and the version being sent now, if any.
/// Written only by compare-and-set on its revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The run of the confirmed version; 0 when none is confirmed yet.
    pub run_id: i64,
    pub fingerprint: String,
    #[serde(default)]
    pub contact_id: Option<String>,
    /// A loader sending a version of the record (until `until_ms`, Unix milliseconds).
    #[serde(default)]
    pub claim: Option<Claim>,
    /// The idempotency key of the confirmed change. A key names one change of the record (its
    /// generation and fingerprint), whatever run sends it: a later run that sends the same
    /// change again — it extracted the record before the confirmation reached the state, as
    /// after an interrupted run whose queue NATS still held — finds it here and sends nothing.
    /// The ledger keeps it for as long as the entry lives, beyond Loops' 24 hours of keys.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A version of a record in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub run_id: i64,
    pub fingerprint: String,
    pub until_ms: i64,
}

impl Claim {
    fn is_of(&self, op: &Operation) -> bool {
        self.run_id == op.run_id && self.fingerprint == op.fingerprint
    }
}

/// What a claim on the record means for an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// Nobody else is sending: claim it.
    Free,
    /// A newer version is being sent: this one is stale.
    Newer,
    /// An older version is in flight: wait until it lands (or its claim lapses).
    Older,
}

/// The removal of one contact, as the sync removes them.
fn removal(mode: OnRemove, email: Option<String>, user_id: Option<String>) -> Action {
    match mode {
        OnRemove::Delete => Action::Delete { email, user_id },
        OnRemove::Unsubscribe => Action::Unsubscribe { email, user_id },
    }
}

/// Compares an operation with the record's claim, which this loader has seen unchanged (the
/// same ledger revision) for `watched`. A claim lasts at most [`CLAIM`] from its write, and
/// whether it lapsed is judged by the reader's own clock alone: the writer's `until_ms` is in
/// the writer's clock, and a reader whose clock is ahead would see every claim as lapsed (and
/// send an older version over a newer one). The price: a claim left by a loader that died is
/// waited out for a whole [`CLAIM`] from when it is first seen.
pub fn claim_verdict(
    op: &Operation,
    entry: Option<&LedgerEntry>,
    watched: Duration,
) -> ClaimVerdict {
    match entry.and_then(|e| e.claim.as_ref()) {
        Some(c) if watched < CLAIM && !c.is_of(op) => {
            if c.run_id > op.run_id {
                ClaimVerdict::Newer
            } else {
                ClaimVerdict::Older
            }
        }
        _ => ClaimVerdict::Free,
    }
}

/// What the ledger says about an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerVerdict {
    /// Send it.
    Send,
    /// Loops already confirmed exactly this: report it confirmed, send nothing.
    AlreadyConfirmed(Option<String>),
    /// Loops confirmed a newer version: send nothing.
    Stale,
}

/// Compares an operation with the ledger entry of its record: a newer run's confirmation makes
/// it stale; the same version confirmed in its own run, or the same change (its idempotency
/// key) confirmed in an earlier run, is already confirmed.
pub fn verdict(op: &Operation, entry: Option<&LedgerEntry>) -> LedgerVerdict {
    match entry {
        None => LedgerVerdict::Send,
        Some(e) if e.run_id > op.run_id => LedgerVerdict::Stale,
        Some(e) if e.run_id == op.run_id && e.fingerprint == op.fingerprint => {
            LedgerVerdict::AlreadyConfirmed(e.contact_id.clone())
        }
        // (Not an event sync's event: its key is the same after a `reset`, which sends it again
        // on purpose. Nor a change that has contacts to take out: a later version, whose answer
        // was lost, may have been applied since, and Loops may hold what it wrote.)
        Some(e)
            if e.fingerprint == op.fingerprint
                && e.idempotency_key.as_deref() == Some(op.idempotency_key.as_str())
                && !keys::is_event_key(&op.idempotency_key)
                && op.also_remove.is_none() =>
        {
            LedgerVerdict::AlreadyConfirmed(e.contact_id.clone())
        }
        Some(_) => LedgerVerdict::Send,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The loader on the bus.
pub struct LoaderStage {
    bus: Arc<dyn Messaging>,
    ledger: Arc<dyn Coordination>,
    client: LoopsClient,
    budget: RateBudget,
}

impl LoaderStage {
    /// `bus` carries the outcomes, `ledger` holds the last confirmed version per record (the
    /// two halves of one bus in a deployment). `budget` is the team's rate budget: share it
    /// with every other request to Loops.
    pub fn new(
        bus: Arc<dyn Messaging>,
        ledger: Arc<dyn Coordination>,
        client: LoopsClient,
        budget: RateBudget,
    ) -> LoaderStage {
        LoaderStage {
            bus,
            ledger,
            client,
            budget,
        }
    }

    /// The record's ledger entry and its revision.
    async fn ledger(&self, key: &str) -> Result<(Option<LedgerEntry>, Option<u64>), LoadError> {
        Ok(match self.ledger.ledger_get(key).await? {
            Some(v) => (
                codec::decode::<LedgerEntry>(&v.value).ok(),
                Some(v.revision),
            ),
            None => (None, None),
        })
    }

    /// Sends the operation; the contact id when Loops says it. Every request waits for the
    /// team's rate budget and is counted in `attempt` as it goes.
    async fn send(
        &self,
        op: &Operation,
        attempt: &mut AttemptRequests,
        claim_ends: tokio::time::Instant,
    ) -> Result<Option<String>, LoadError> {
        let contact_id = match &op.action {
            Action::Rekey {
                write,
                old_email,
                remove_old,
                old_user_id,
            } => {
                let contact_id = self
                    .send_one(write, &op.idempotency_key, attempt, claim_ends)
                    .await?;
                if let Some(mode) = remove_old {
                    // One identifier: the old userId finds the old contact when there is one.
                    let (email, user_id) = match old_user_id {
                        Some(u) => (None, Some(u.clone())),
                        None => (Some(old_email.clone()), None),
                    };
                    self.send_one(
                        &removal(*mode, email, user_id),
                        &op.idempotency_key,
                        attempt,
                        claim_ends,
                    )
                    .await?;
                }
                contact_id
            }
            // The removal of a contact a lost create may never have made, or whose identifier
            // a version whose answer was lost may have changed (the versions `also_remove`
            // names): unsubscribing it must not make it (nor fail on a userId Loops no longer
            // knows).
            Action::Unsubscribe { email, user_id }
                if op.fingerprint == POSSIBLY_CREATED || op.also_remove.is_some() =>
            {
                if self
                    .exists(email.as_ref(), user_id.as_ref(), attempt, claim_ends)
                    .await?
                {
                    self.send_one(&op.action, &op.idempotency_key, attempt, claim_ends)
                        .await?;
                }
                None
            }
            action => {
                self.send_one(action, &op.idempotency_key, attempt, claim_ends)
                    .await?
            }
        };
        self.remove_also(op, attempt, claim_ends).await?;
        Ok(contact_id)
    }

    /// Whether Loops has the contact of one identifier (the userId when there is one): one read,
    /// counted among the writes.
    async fn exists(
        &self,
        email: Option<&String>,
        user_id: Option<&String>,
        attempt: &mut AttemptRequests,
        claim_ends: tokio::time::Instant,
    ) -> Result<bool, LoadError> {
        let identity = match (user_id, email) {
            (Some(u), _) => ContactIdentity::UserId(u.clone()),
            (None, Some(e)) => ContactIdentity::Email(e.clone()),
            (None, None) => return Ok(false),
        };
        self.ready_within(claim_ends).await?;
        let found = self.client.find_contact(&identity).await;
        attempt.note(RequestKind::Write, &found);
        Ok(found?.is_some())
    }

    /// Takes out of Loops, after the operation's action, the contacts a version whose answer
    /// was lost may have left ([`Operation::also_remove`]), each by its one identifier: deleted
    /// (a 404 is done), or unsubscribed once read — a contact that was never made is not made
    /// by unsubscribing it. (The read counts among the writes.)
    async fn remove_also(
        &self,
        op: &Operation,
        attempt: &mut AttemptRequests,
        claim_ends: tokio::time::Instant,
    ) -> Result<(), LoadError> {
        let Some(also) = &op.also_remove else {
            return Ok(());
        };
        for contact in &also.contacts {
            if also.mode == OnRemove::Unsubscribe
                && !self
                    .exists(
                        contact.email.as_ref(),
                        contact.user_id.as_ref(),
                        attempt,
                        claim_ends,
                    )
                    .await?
            {
                continue;
            }
            let removal = removal(also.mode, contact.email.clone(), contact.user_id.clone());
            self.send_one(&removal, &op.idempotency_key, attempt, claim_ends)
                .await?;
        }
        Ok(())
    }

    /// One request for one action.
    async fn send_one(
        &self,
        action: &Action,
        idempotency_key: &str,
        attempt: &mut AttemptRequests,
        claim_ends: tokio::time::Instant,
    ) -> Result<Option<String>, LoadError> {
        self.ready_within(claim_ends).await?;
        match action {
            Action::Upsert {
                email,
                user_id,
                properties,
                mailing_lists,
            } => {
                let contact = ContactPayload {
                    email: email.clone(),
                    user_id: user_id.clone(),
                    properties: properties.clone(),
                    mailing_lists: mailing_lists.clone(),
                };
                let result = self.client.update_contact(&contact).await;
                attempt.note(RequestKind::Write, &result);
                Ok(Some(result?))
            }
            Action::Event {
                event_name,
                email,
                user_id,
                properties,
                mailing_lists,
                event_properties,
            } => {
                let event = EventPayload {
                    event_name: event_name.clone(),
                    contact: ContactPayload {
                        email: email.clone(),
                        user_id: user_id.clone(),
                        properties: properties.clone(),
                        mailing_lists: mailing_lists.clone(),
                    },
                    event_properties: event_properties.clone(),
                };
                let key = IdempotencyKey::new(idempotency_key)?;
                let result = self.client.send_event(&event, Some(&key)).await;
                attempt.note(RequestKind::Event, &result);
                match result {
                    Ok(()) => Ok(None),
                    // An event sync's event was taken before, with the contact values it
                    // carried then: writing them again could put an older event's values over
                    // a newer one's (each event is a record of its own, sent in no order).
                    Err(LoopsError::Conflict { .. }) if keys::is_event_key(idempotency_key) => {
                        Ok(None)
                    }
                    // Our key was used before: the event of this change was taken (an earlier
                    // attempt's answer was lost — or, where Loops consumes keys of failed
                    // requests, an attempt that applied nothing). Either way the 409 applied
                    // nothing now, so the contact write is made sure of by itself.
                    Err(LoopsError::Conflict { .. }) => {
                        self.ready_within(claim_ends).await?;
                        let result = self.client.update_contact(&event.contact).await;
                        attempt.note(RequestKind::Write, &result);
                        Ok(Some(result?))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Action::Delete { email, user_id } => {
                let identity = match (email, user_id) {
                    (Some(e), _) => ContactIdentity::Email(e.clone()),
                    (None, Some(u)) => ContactIdentity::UserId(u.clone()),
                    (None, None) => {
                        return Err(LoopsError::Usage("a delete needs an identifier".into()).into());
                    }
                };
                let result = self.client.delete_contact(&identity).await;
                attempt.note(RequestKind::Delete, &result);
                match result {
                    // Already gone (an earlier attempt, or someone else): the goal is met.
                    Ok(()) | Err(LoopsError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Action::Rekey { .. } => {
                Err(LoopsError::Usage("a re-key inside a re-key".into()).into())
            }
            Action::Unsubscribe { email, user_id } => {
                let mut properties = serde_json::Map::new();
                properties.insert("subscribed".into(), serde_json::Value::Bool(false));
                let contact = ContactPayload {
                    email: email.clone(),
                    user_id: user_id.clone(),
                    properties,
                    mailing_lists: Default::default(),
                };
                let result = self.client.update_contact(&contact).await;
                attempt.note(RequestKind::Write, &result);
                match result {
                    // Loops refuses a write by a userId it does not know ("A new contact needs
                    // an email"): when no contact holds that userId, none is subscribed by it
                    // (someone deleted it, or changed its userId), and the goal is met.
                    Err(LoopsError::Invalid { .. })
                        if email.is_none()
                            && !self
                                .exists(None, user_id.as_ref(), attempt, claim_ends)
                                .await? =>
                    {
                        Ok(None)
                    }
                    result => Ok(Some(result?)),
                }
            }
        }
    }

    /// Takes a slot of the rate budget, then checks that the claim still covers a whole
    /// request (see [`CLAIM`]).
    async fn ready_within(&self, claim_ends: tokio::time::Instant) -> Result<(), LoadError> {
        self.budget.ready().await?;
        if tokio::time::Instant::now() + self.client.timeout() > claim_ends {
            return Err(LoadError::ClaimTooShort);
        }
        Ok(())
    }

    /// The ledger check, the claim, the requests, the ledger write: the record's outcome,
    /// without the attempt's requests. One version of a record is sent at a time: an operation
    /// waits while an older version is in flight, and is skipped when a newer one is (or has
    /// been confirmed). Every ledger write is a compare-and-set.
    async fn apply(
        &self,
        op: &Operation,
        attempt: &mut AttemptRequests,
    ) -> Result<Outcome, LoadError> {
        let key = keys::ledger_key(&op.installation, &op.sync, &op.key);
        // The ledger revision in view, and since when (this loader's clock): how long a claim
        // has been seen unchanged.
        let mut in_view: Option<(Option<u64>, tokio::time::Instant)> = None;
        // A record new to the sync most likely has no entry: its claim is tried at once, as
        // if the read had found none (the claim is written only where there is none; where
        // there is one, it fails and the entry is read). One round trip to the bus fewer.
        let mut unread = op.change == ChangeKind::Added;
        loop {
            let (entry, revision) = if std::mem::take(&mut unread) {
                (None, None)
            } else {
                self.ledger(&key).await?
            };
            let watched = match in_view {
                Some((seen, since)) if seen == revision => since.elapsed(),
                _ => {
                    in_view = Some((revision, tokio::time::Instant::now()));
                    Duration::ZERO
                }
            };
            match verdict(op, entry.as_ref()) {
                LedgerVerdict::Stale => return Ok(self.skipped(op, "confirmed")),
                LedgerVerdict::AlreadyConfirmed(contact_id) => {
                    return Ok(self.confirmed(op, contact_id));
                }
                LedgerVerdict::Send => {}
            }
            match claim_verdict(op, entry.as_ref(), watched) {
                ClaimVerdict::Newer => return Ok(self.skipped(op, "being sent")),
                ClaimVerdict::Older => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                ClaimVerdict::Free => {}
            }
            let now = now_ms();
            let mut claimed = entry.unwrap_or_default();
            claimed.claim = Some(Claim {
                run_id: op.run_id,
                fingerprint: op.fingerprint.clone(),
                until_ms: now + CLAIM.as_millis() as i64,
            });
            // Counted from before the write: no loader can have seen the claim earlier, so
            // none takes it for lapsed before its requests must end.
            let claim_ends = tokio::time::Instant::now() + CLAIM;
            let Some(claim_revision) = self
                .ledger
                .ledger_swap(&key, Bytes::from(codec::encode(&claimed)), revision)
                .await?
            else {
                continue; // someone wrote first: read again
            };
            let contact_id = match self.send(op, attempt, claim_ends).await {
                Ok(contact_id) => contact_id,
                Err(error) => {
                    // Let the retry, or another version, go at once — unless the request may
                    // still land: then the claim is written again as it is (a new revision), so
                    // that another version waits a whole claim from now and cannot land before
                    // this one.
                    if !error.may_land_late() {
                        claimed.claim = None;
                    }
                    let _ = self
                        .ledger
                        .ledger_swap(
                            &key,
                            Bytes::from(codec::encode(&claimed)),
                            Some(claim_revision),
                        )
                        .await;
                    return Err(error);
                }
            };
            let confirmed = LedgerEntry {
                run_id: op.run_id,
                fingerprint: op.fingerprint.clone(),
                contact_id: contact_id.clone(),
                claim: None,
                idempotency_key: Some(op.idempotency_key.clone()),
            };
            if self
                .ledger
                .ledger_swap(
                    &key,
                    Bytes::from(codec::encode(&confirmed)),
                    Some(claim_revision),
                )
                .await?
                .is_none()
            {
                tracing::warn!(
                    sync = %op.sync,
                    record = %keys::log_key(&op.sync, &op.key),
                    "the record's claim lapsed while its requests were in flight; Loops confirmed them"
                );
            }
            return Ok(self.confirmed(op, contact_id));
        }
    }

    fn skipped(&self, op: &Operation, newer: &str) -> Outcome {
        Outcome::for_operation(op, OutcomeStatus::Skipped)
            .with_reason(format!("a newer version of this record was {newer}"))
    }

    fn confirmed(&self, op: &Operation, contact_id: Option<String>) -> Outcome {
        let mut o = Outcome::for_operation(op, OutcomeStatus::Confirmed);
        o.contact_id = contact_id;
        let (email, user_id) = op.action.identity();
        o.email = email.map(str::to_owned);
        o.user_id = user_id.map(str::to_owned);
        o
    }

    /// A failed attempt that sent requests: its counts go to the checkpointer now, as an
    /// `attempted` outcome, because its message is naked (or given up) and the outcome that
    /// settles the record will carry only the requests of its own attempt. Best effort: if the
    /// bus refuses it, the requests go uncounted (and the warning says so).
    async fn report_attempt(
        &self,
        op: &Operation,
        info: &DeliveryInfo,
        attempt: &AttemptRequests,
        error: &LoadError,
    ) {
        if attempt.counts.is_empty() {
            return;
        }
        let mut o = Outcome::for_operation(op, OutcomeStatus::Attempted)
            .with_counts(attempt.counts)
            .with_reason(error.to_string());
        o.attempt = Some(format!("{}.{}", info.sequence, info.attempt));
        if let Err(publish_error) = publish::outcome(&*self.bus, &o).await {
            tracing::warn!(
                sync = %op.sync,
                record = %keys::log_key(&op.sync, &op.key),
                requests = attempt.counts.total(),
                error = %publish_error,
                "the requests of a failed attempt could not be reported; the run report misses them"
            );
        }
    }
}

/// The requests of one attempt (one delivery of an operation), counted as they are sent.
#[derive(Debug, Default)]
pub struct AttemptRequests {
    /// A second or later delivery: every request it sends repeats an earlier attempt.
    retry: bool,
    pub counts: RequestCounts,
}

impl AttemptRequests {
    pub fn new(delivery: u32) -> AttemptRequests {
        AttemptRequests {
            retry: delivery > 1,
            counts: RequestCounts::default(),
        }
    }

    /// Counts a request of `kind` by its result: anything but an error found before sending.
    pub fn note<T>(&mut self, kind: RequestKind, result: &Result<T, LoopsError>) {
        match result {
            Err(e) if !e.was_sent() => {}
            Err(e) => self.counts.count(kind, self.retry, e.is_rate_limited()),
            Ok(_) => self.counts.count(kind, self.retry, false),
        }
    }
}

#[async_trait]
impl Handler for LoaderStage {
    type Error = LoadError;

    async fn handle(&self, info: &DeliveryInfo, payload: &Bytes) -> Result<(), LoadError> {
        let op: Operation = codec::decode(payload)?;
        let mut attempt = AttemptRequests::new(info.attempt);
        match self.apply(&op, &mut attempt).await {
            Ok(outcome) => {
                let outcome = outcome.with_counts(attempt.counts);
                publish::outcome(&*self.bus, &outcome).await?;
                Ok(())
            }
            Err(error) => {
                self.report_attempt(&op, info, &attempt, &error).await;
                Err(error)
            }
        }
    }

    /// The record's fate, with no requests: the attempt that failed last reported its own
    /// (`handle` does, before it returns the error).
    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        payload: &Bytes,
        fate: Fate,
        reason: &str,
    ) -> Result<(), LoadError> {
        let op: Operation = codec::decode(payload)?;
        let outcome = Outcome::for_operation(&op, fate.status()).with_reason(reason);
        publish::outcome(&*self.bus, &outcome).await?;
        Ok(())
    }

    fn record(&self, payload: &Bytes) -> Option<String> {
        let op: Operation = codec::decode(payload).ok()?;
        Some(loopsync_core::keys::log_key(&op.sync, &op.key))
    }
}

#[cfg(test)]
mod tests;
