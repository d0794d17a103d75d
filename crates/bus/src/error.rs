use loopsync_core::{Classified, ErrorClass};

/// The error under a [`BusError`]: async-nats has one type per request kind, and the
/// in-process bus an I/O error, so it is carried boxed, with its own chain.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong on the bus.
///
/// Each message also shows its source's: what the worker records as a dead letter's reason is
/// the message alone.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server's URL, redacted (`loopsync_core::url::redact`).
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("nats-server {version} is too old: loopsync needs 2.9.0 or newer")]
    ServerTooOld { version: String },
    #[error("cannot set up {what}: {source}")]
    Provision {
        what: String,
        #[source]
        source: Source,
    },
    #[error("publish to {subject} failed: {source}")]
    Publish {
        subject: String,
        #[source]
        source: Source,
    },
    /// A message larger than the server takes (its `max_payload`): sending it again cannot
    /// help, so it is permanent.
    #[error("publish to {subject} failed: the message is larger than NATS accepts: {source}")]
    TooLarge {
        subject: String,
        #[source]
        source: Source,
    },
    #[error("consuming {stage} failed: {source}")]
    Consume {
        stage: String,
        #[source]
        source: Source,
    },
    #[error("{what} failed: {source}")]
    Ack {
        /// What was being settled: "acknowledging", or the removal of a message.
        what: String,
        #[source]
        source: Source,
    },
    /// Erasing a person's messages (`loopsync forget`) failed.
    #[error("{what}: {source}")]
    Erase {
        what: String,
        #[source]
        source: Source,
    },
    #[error("{what}: {source}")]
    Ledger {
        /// "ledger", or "ledger: rate budget".
        what: &'static str,
        #[source]
        source: Source,
    },
}

impl BusError {
    /// Settling a message (ack, nak, term, in progress) failed.
    pub(crate) fn ack(source: impl Into<Source>) -> BusError {
        BusError::Ack {
            what: "acknowledging".into(),
            source: source.into(),
        }
    }

    /// Reading or writing the ledger failed.
    pub(crate) fn ledger(source: impl Into<Source>) -> BusError {
        BusError::Ledger {
            what: "ledger",
            source: source.into(),
        }
    }
}

impl Classified for BusError {
    fn class(&self) -> ErrorClass {
        match self {
            BusError::ServerTooOld { .. }
            | BusError::Provision { .. }
            | BusError::TooLarge { .. } => ErrorClass::Permanent,
            _ => ErrorClass::RETRY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_error_is_the_source() {
        let e = BusError::ledger(std::io::Error::other("down"));
        assert_eq!(e.to_string(), "ledger: down");
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "down");
    }
}
