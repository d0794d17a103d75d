//! Secrets. The Loops API key is wrapped the moment the config is read, so no `Debug` of a
//! config, log line or error message can carry it: only [`ApiKey::expose`] gives the text, and
//! the HTTP client is its one caller.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::keys;

/// A Loops API key. Its `Debug` and `Display` never show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

/// An API key that is empty or only blanks: refused where it is read, as the official SDKs do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the API key is empty")]
pub struct EmptyApiKey;

impl ApiKey {
    /// Wraps a key. An empty key is refused, as the official SDKs do.
    pub fn new(key: impl Into<String>) -> Result<ApiKey, EmptyApiKey> {
        let key = key.into();
        if key.trim().is_empty() {
            return Err(EmptyApiKey);
        }
        Ok(ApiKey(key))
    }

    /// The key itself. Only the request that authenticates to Loops should need it; everything
    /// else (logs, reports, errors) goes through the redacting `Debug` and `Display`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The fingerprint a sync's destination binding keeps of the key, salted by the state's
    /// `installation` ([`keys::api_key_fingerprint`]): tells a key change apart without keeping
    /// the key.
    pub fn fingerprint(&self, installation: &str) -> String {
        keys::api_key_fingerprint(installation, &self.0)
    }

    /// The name of the rate budget this key's team shares: every worker and sync with the same
    /// key draws from one budget, and the name is a digest, so the key is not readable in it.
    pub fn budget_name(&self) -> String {
        format!("team-{}", keys::record_id("loops-api-key", &self.0))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Comparing with a text does not show the key; tests and callers that hold the expected key
/// can check it without exposing it.
impl PartialEq<str> for ApiKey {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// See the `PartialEq<str>` impl.
impl PartialEq<&str> for ApiKey {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Reads a key from a config: a string, refused when empty (the error names no key text).
impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ApiKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        ApiKey::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let key = ApiKey::new("secret-key-123").unwrap();
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.to_string(), "<redacted>");
        assert!(!format!("{key:?} {key} {key:#?}").contains("secret-key-123"));
        assert_eq!(key.expose(), "secret-key-123");
    }

    #[test]
    fn an_empty_key_is_refused() {
        assert_eq!(ApiKey::new("  "), Err(EmptyApiKey));
        assert_eq!(ApiKey::new(""), Err(EmptyApiKey));
        let e = serde_json::from_str::<ApiKey>("\"\"").unwrap_err();
        assert!(e.to_string().starts_with("the API key is empty"), "{e}");
        let key: ApiKey = serde_json::from_str("\"k\"").unwrap();
        assert_eq!(key, "k");
    }

    /// The budget name is what `RateBudget::shared` derived from the raw key: replicas of
    /// different versions must keep drawing from one budget.
    #[test]
    fn the_budget_name_is_stable() {
        let key = ApiKey::new("test-key").unwrap();
        assert_eq!(
            key.budget_name(),
            format!("team-{}", keys::record_id("loops-api-key", "test-key"))
        );
        assert_eq!(key.budget_name(), "team-d09ef3f1cabc17f016735403e5df53ef");
        assert_ne!(
            key.budget_name(),
            ApiKey::new("other").unwrap().budget_name()
        );
        assert!(!key.budget_name().contains("test-key"));
    }
}
