//! Error classes.
//!
//! Every library crate of loopsync returns `thiserror` errors that know their [`ErrorClass`] (see
//! [`Classified`]). Exactly one place — the bus worker loop — turns a class into an
//! acknowledgement decision: `Retryable` becomes a delayed redelivery, `Permanent` a recorded
//! rejection, `Poison` a termination of the message.

use std::time::Duration;

/// What should happen to the unit of work whose processing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later. `after` is the delay the other side asked for (a `Retry-After`), if any;
    /// without one the caller applies its own backoff.
    Retryable { after: Option<Duration> },
    /// The other side understood the request and refused it; repeating it cannot succeed.
    /// The record is kept with its reason (a *rejected* record).
    Permanent,
    /// The work item itself is unusable (cannot be decoded, violates an invariant). It must not
    /// be retried and is dead-lettered at once.
    Poison,
}

impl ErrorClass {
    /// A retryable class without a server-provided delay.
    pub const RETRY: ErrorClass = ErrorClass::Retryable { after: None };

    /// True for [`ErrorClass::Retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, ErrorClass::Retryable { .. })
    }
}

/// An error that knows its class.
pub trait Classified {
    /// The class of this error: what the one ack/nak/term place should do with it.
    fn class(&self) -> ErrorClass;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_retryable_is_retryable() {
        assert!(ErrorClass::RETRY.is_retryable());
        assert!(
            ErrorClass::Retryable {
                after: Some(Duration::from_secs(1))
            }
            .is_retryable()
        );
        assert!(!ErrorClass::Permanent.is_retryable());
        assert!(!ErrorClass::Poison.is_retryable());
    }
}
