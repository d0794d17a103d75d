//! The vocabulary shared by every loopsync stage.
//!
//! This crate has no I/O: no NATS, no HTTP, no database. It holds what more than one stage must
//! agree on: the messages on the subjects and their codec, the deterministic keys, the pipeline's
//! stages, the resolved sync definition with its fingerprint, the Loops destination a
//! sync's state belongs to, the error classes, the secrets (the API key) that must not leak, and the URLs shown with
//! their own secrets redacted.

pub mod codec;
pub mod destination;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod reason;
pub mod secret;
pub mod spec;
pub mod stage;
pub mod time;
pub mod tuning;
pub mod url;
pub mod value;
pub mod warehouse_tls;
pub mod warehouse_url;

pub use error::{Classified, ErrorClass};
