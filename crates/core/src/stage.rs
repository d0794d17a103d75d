//! The stages of the pipeline: its vocabulary, whatever carries the messages between them. The
//! names the bus gives their streams and subjects are the bus's own (`loopsync_bus::Names`).

/// A pipeline stage that consumes a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Consumes run requests, publishes changes.
    Extractor,
    /// Consumes changes, publishes operations (and invalid outcomes).
    Transformer,
    /// Consumes operations, calls Loops, publishes outcomes.
    Loader,
    /// Consumes outcomes, advances the sync's state in the warehouse.
    Checkpointer,
}

impl Stage {
    /// Every stage, in the order a record goes through them.
    pub const ALL: [Stage; 4] = [
        Stage::Extractor,
        Stage::Transformer,
        Stage::Loader,
        Stage::Checkpointer,
    ];

    /// The durable consumer's name, and the stage's name in messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Extractor => "extractor",
            Stage::Transformer => "transformer",
            Stage::Loader => "loader",
            Stage::Checkpointer => "checkpointer",
        }
    }
}
