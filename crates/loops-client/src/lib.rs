//! The Loops API client: the only crate in loopsync that sends HTTP to Loops.
//!
//! * Typed calls for the API-key test, contacts (create, update, find, delete), contact
//!   properties (list, create), mailing lists, and events (with an `Idempotency-Key`).
//! * Every answer is classified in one place, [`classify`]: ok, rate-limited, conflict, not
//!   found, invalid, unauthorized, server error, or (before any answer) transport error and
//!   timeout. Each [`LoopsError`] knows its [`loopsync_core::ErrorClass`].
//! * The client never retries on its own: retry policy belongs to the loader. Nor does it
//!   follow redirects (a 3xx is [`LoopsError::Redirected`]), send a `Referer`, or read more
//!   than [`loopsync_core::tuning::MAX_LOOPS_BODY_BYTES`] of an answer; Loops' messages are kept
//!   to [`loopsync_core::tuning::MAX_LOOPS_MESSAGE_CHARS`] characters.
//! * The API key never appears in `Debug` output or error messages.

mod client;
mod error;
mod rate_limit;
mod types;

pub use client::{ClientConfig, LoopsClient};
pub use error::{LoopsError, TWO_CONTACTS, answer_status, classify, names_two_contacts};
pub use rate_limit::RateLimitInfo;
pub use types::{
    ApiKey, ApiKeyInfo, Contact, ContactIdentity, ContactPayload, ContactProperty, EventPayload,
    IdempotencyKey, MailingList, PropertyKind,
};

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
