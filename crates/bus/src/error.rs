use loopsync_core::{Classified, ErrorClass};

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("nats-server {version} is too old: loopsync needs 2.9.0 or newer")]
    ServerTooOld { version: String },
    #[error("cannot set up {what}: {detail}")]
    Provision { what: String, detail: String },
    #[error("publish to {subject} failed: {detail}")]
    Publish { subject: String, detail: String },
    #[error("consuming {stage} failed: {detail}")]
    Consume { stage: String, detail: String },
    #[error("acknowledging failed: {0}")]
    Ack(String),
    #[error("ledger: {0}")]
    Ledger(String),
}

impl Classified for BusError {
    fn class(&self) -> ErrorClass {
        match self {
            BusError::ServerTooOld { .. } | BusError::Provision { .. } => ErrorClass::Permanent,
            _ => ErrorClass::RETRY,
        }
    }
}
