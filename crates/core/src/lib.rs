//! The vocabulary shared by every loopsync stage.
//!
//! This crate has no I/O: no NATS, no HTTP, no database. It holds the types that more than one
//! stage must agree on.

pub mod error;

pub use error::{Classified, ErrorClass};
