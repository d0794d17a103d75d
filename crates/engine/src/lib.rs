//! The engine: what each `loopsync` command does, as a library. The binary turns flags into
//! calls here and prints what comes back (ripgrep's `crates/core` shape); every rule of a
//! sync's life that is not a stage's own lives here, once.

pub mod adopt;
pub mod dlq;
pub mod history;
pub mod plan;
pub mod reset;
pub mod verify;

#[cfg(test)]
mod testing;
