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

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use loopsync_bus::worker::{DeliveryInfo, Fate, Handler};
use loopsync_bus::{Bus, BusError, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    Action, Operation, Outcome, OutcomeStatus, RequestCounts, RequestKind,
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
}

impl Classified for LoadError {
    fn class(&self) -> ErrorClass {
        match self {
            LoadError::Decode(e) => e.class(),
            LoadError::Loops(e) => e.class(),
            LoadError::Bus(e) => e.class(),
        }
    }
}

/// The last version of a record Loops confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub run_id: i64,
    pub fingerprint: String,
    #[serde(default)]
    pub contact_id: Option<String>,
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

/// Compares an operation with the ledger entry of its record.
pub fn verdict(op: &Operation, entry: Option<&LedgerEntry>) -> LedgerVerdict {
    match entry {
        None => LedgerVerdict::Send,
        Some(e) if e.run_id > op.run_id => LedgerVerdict::Stale,
        Some(e) if e.run_id == op.run_id && e.fingerprint == op.fingerprint => {
            LedgerVerdict::AlreadyConfirmed(e.contact_id.clone())
        }
        Some(_) => LedgerVerdict::Send,
    }
}

/// The interval between two requests of a budget of `per_second`: 1/`per_second`, plus 2 % (at
/// least 1 ms) so that network jitter between processes cannot put `per_second` + 1 requests
/// into one second of a sliding window.
pub fn slot_period(per_second: u32) -> Duration {
    let base = Duration::from_secs(1) / per_second.max(1);
    base + (base / 50).max(Duration::from_millis(1))
}

/// The rate budget of one Loops team, shared by every request to it.
#[derive(Clone)]
pub enum RateBudget {
    /// Shared through the bus by every process of the deployment (the loader's).
    Shared {
        bus: Arc<dyn Bus>,
        name: String,
        period: Duration,
    },
    /// This process only (commands that run without a bus, such as `check`).
    Local(Arc<DefaultDirectRateLimiter>),
}

impl RateBudget {
    /// The team's budget on `bus`: one per API key, whatever the number of syncs and workers.
    pub fn shared(bus: Arc<dyn Bus>, api_key: &str, requests_per_second: u32) -> RateBudget {
        RateBudget::Shared {
            bus,
            name: format!("team-{}", keys::record_id("loops-api-key", api_key)),
            period: slot_period(requests_per_second),
        }
    }

    pub fn local(requests_per_second: u32) -> RateBudget {
        RateBudget::Local(Arc::new(pacer(requests_per_second)))
    }

    /// Waits for, and takes, the next request slot.
    pub async fn ready(&self) -> Result<(), BusError> {
        match self {
            RateBudget::Shared { bus, name, period } => bus.rate_slot(name, *period).await,
            RateBudget::Local(pacer) => {
                pacer.until_ready().await;
                Ok(())
            }
        }
    }
}

/// An even pace of `per_second` requests in this process: one every [`slot_period`], no burst.
pub fn pacer(per_second: u32) -> DefaultDirectRateLimiter {
    let quota = Quota::with_period(slot_period(per_second))
        .expect("a positive period")
        .allow_burst(NonZeroU32::MIN);
    RateLimiter::direct(quota)
}

/// The loader on the bus.
pub struct LoaderStage {
    bus: Arc<dyn Bus>,
    client: LoopsClient,
    budget: RateBudget,
}

impl LoaderStage {
    /// `budget` is the team's rate budget: share it with every other request to Loops.
    pub fn new(bus: Arc<dyn Bus>, client: LoopsClient, budget: RateBudget) -> LoaderStage {
        LoaderStage {
            bus,
            client,
            budget,
        }
    }

    async fn ledger(&self, op: &Operation) -> Result<Option<LedgerEntry>, LoadError> {
        let key = keys::record_id(&op.sync, &op.key);
        Ok(self
            .bus
            .ledger_get(&key)
            .await?
            .and_then(|bytes| codec::decode::<LedgerEntry>(&bytes).ok()))
    }

    /// Sends the operation; the contact id when Loops says it. Every request waits for the
    /// team's rate budget and is counted in `attempt` as it goes.
    async fn send(
        &self,
        op: &Operation,
        attempt: &mut AttemptRequests,
    ) -> Result<Option<String>, LoadError> {
        match &op.action {
            Action::Rekey {
                write,
                old_email,
                remove_old,
            } => {
                let contact_id = self.send_one(write, &op.idempotency_key, attempt).await?;
                if let Some(mode) = remove_old {
                    let old = Some(old_email.clone());
                    let removal = match mode {
                        OnRemove::Delete => Action::Delete {
                            email: old,
                            user_id: None,
                        },
                        OnRemove::Unsubscribe => Action::Unsubscribe {
                            email: old,
                            user_id: None,
                        },
                    };
                    self.send_one(&removal, &op.idempotency_key, attempt)
                        .await?;
                }
                Ok(contact_id)
            }
            action => self.send_one(action, &op.idempotency_key, attempt).await,
        }
    }

    /// One request for one action.
    async fn send_one(
        &self,
        action: &Action,
        idempotency_key: &str,
        attempt: &mut AttemptRequests,
    ) -> Result<Option<String>, LoadError> {
        self.budget.ready().await?;
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
            } => {
                let event = EventPayload {
                    event_name: event_name.clone(),
                    contact: ContactPayload {
                        email: email.clone(),
                        user_id: user_id.clone(),
                        properties: properties.clone(),
                        mailing_lists: mailing_lists.clone(),
                    },
                    event_properties: Default::default(),
                };
                let key = IdempotencyKey::new(idempotency_key)?;
                let result = self.client.send_event(&event, Some(&key)).await;
                attempt.note(RequestKind::Event, &result);
                match result {
                    Ok(()) => Ok(None),
                    // Our key, used before: an earlier attempt was applied and its answer lost.
                    Err(LoopsError::Conflict { .. }) => Ok(None),
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
                Ok(Some(result?))
            }
        }
    }

    /// An outcome of `op` (no requests yet: the caller adds the attempt's).
    fn outcome(&self, op: &Operation, status: OutcomeStatus) -> Outcome {
        let mut o = Outcome::new(
            &op.sync,
            op.run_id,
            &op.key,
            &op.fingerprint,
            status,
            op.action.name(),
        );
        o.change = Some(op.change);
        o
    }

    /// The ledger check, the requests, the ledger write: the record's outcome, without the
    /// attempt's requests.
    async fn apply(
        &self,
        op: &Operation,
        attempt: &mut AttemptRequests,
    ) -> Result<Outcome, LoadError> {
        Ok(match verdict(op, self.ledger(op).await?.as_ref()) {
            LedgerVerdict::Stale => self
                .outcome(op, OutcomeStatus::Skipped)
                .with_reason("Loops already confirmed a newer version of this record"),
            LedgerVerdict::AlreadyConfirmed(contact_id) => {
                let mut o = self.outcome(op, OutcomeStatus::Confirmed);
                o.contact_id = contact_id;
                let (email, user_id) = op.action.identity();
                o.email = email.map(str::to_owned);
                o.user_id = user_id.map(str::to_owned);
                o
            }
            LedgerVerdict::Send => {
                let contact_id = self.send(op, attempt).await?;
                let entry = LedgerEntry {
                    run_id: op.run_id,
                    fingerprint: op.fingerprint.clone(),
                    contact_id: contact_id.clone(),
                };
                self.bus
                    .ledger_put(
                        &keys::record_id(&op.sync, &op.key),
                        Bytes::from(codec::encode(&entry)),
                    )
                    .await?;
                let mut o = self.outcome(op, OutcomeStatus::Confirmed);
                o.contact_id = contact_id;
                let (email, user_id) = op.action.identity();
                o.email = email.map(str::to_owned);
                o.user_id = user_id.map(str::to_owned);
                o
            }
        })
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
        let mut o = self
            .outcome(op, OutcomeStatus::Attempted)
            .with_counts(attempt.counts)
            .with_reason(error.to_string());
        o.attempt = Some(format!("{}.{}", info.sequence, info.attempt));
        if let Err(publish_error) = publish::outcome(&*self.bus, &o).await {
            tracing::warn!(
                sync = %op.sync,
                key = %op.key,
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
        let outcome = self.outcome(&op, fate.status()).with_reason(reason);
        publish::outcome(&*self.bus, &outcome).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
