//! The engine: what each `loopsync` command does, as a library. The binary turns flags into
//! calls here and prints what comes back (ripgrep's `crates/core` shape); every rule of a
//! sync's life that is not a stage's own lives here, once.

pub mod adopt;
pub mod budget;
pub mod bulk;
pub mod check;
pub mod demo;
pub mod destination;
pub mod dlq;
pub mod error;
pub mod forget;
pub mod pipeline;
pub mod plan;
pub mod properties;
pub mod record;
pub mod rejections;
pub mod reset;
pub mod retry;
pub mod runs;
pub mod selection;
pub mod settings;
pub mod slots;
pub mod state;
pub mod status;
pub mod verify;

#[cfg(test)]
mod testing;

pub use error::EngineError;
/// The Loops team's rate budget, which the binary hands to the calls it makes itself.
pub use loopsync_bus::RateBudget;
