//! The wire codec: MessagePack with named fields (`rmp_serde::to_vec_named`), so fields can be
//! added with defaults during a rolling deploy. Positional encoding would break on that.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Classified, ErrorClass};

/// A message that cannot be read. Retrying cannot help: it is poison.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a {kind} message: {source}")]
pub struct DecodeError {
    /// The message type that was expected (`RunRequest`, `Operation`, …).
    pub kind: &'static str,
    /// What the MessagePack decoder said.
    #[source]
    pub source: rmp_serde::decode::Error,
}

impl Classified for DecodeError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Poison
    }
}

/// Encodes a message. Our envelopes always encode.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(message).expect("envelopes are always encodable")
}

/// Decodes a message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|e| DecodeError {
        kind: std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("message"),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RunRequest;

    #[test]
    fn garbage_is_poison() {
        let e = decode::<RunRequest>(b"\xc1not msgpack").unwrap_err();
        assert_eq!(e.class(), ErrorClass::Poison);
        assert_eq!(e.kind, "RunRequest");
    }

    /// The decoder's error is kept as the source, and the message still says it.
    #[test]
    fn the_decoder_error_is_the_source() {
        let e = decode::<RunRequest>(b"\xc1not msgpack").unwrap_err();
        let source = std::error::Error::source(&e).expect("a source");
        assert!(e.to_string().ends_with(&format!(": {source}")), "{e}");
    }
}
