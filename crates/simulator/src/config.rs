//! Simulator configuration: what is fixed at start (key, address, body cap, seed data) and the
//! settings that can change while it runs (`POST /_sim/settings`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{MailingList, PropertyType};

/// How the per-team rate limit counts requests (`loops-api.md` §9: Loops does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateWindow {
    /// At most `rate_limit` requests accepted in any one second: the strictest reading.
    #[default]
    Sliding,
    /// A counter reset at each whole second since start.
    Fixed,
    /// A bucket of `rate_limit` tokens refilled at `rate_limit` per second (`"token_bucket"`,
    /// or `"token-bucket"` as `loopsync sim --window` spells it).
    #[serde(alias = "token-bucket")]
    TokenBucket,
}

/// What a contact write does with a property the team has not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownProperties {
    /// 400 with a message naming the property.
    #[default]
    Reject,
    /// Create it as a string property and store the value.
    Create,
}

/// What a contact write does with a mailing-list id the team does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownLists {
    /// 400 with a message naming the list.
    #[default]
    Reject,
    /// Accept and record the subscription as sent.
    Accept,
}

/// How contacts are matched by email (`loops-api.md` §9.1: Loops does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmailMatch {
    /// `A@x.co` and `a@x.co` are one contact: unique, found and conflicting case-insensitively.
    #[default]
    CaseInsensitive,
    /// `A@x.co` and `a@x.co` are two contacts: unique and found by the exact email.
    CaseSensitive,
}

/// How a number sent for a date property is read (`loops-api.md` §9.1: Loops does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NumericDates {
    /// Below 10^11 (in absolute value) Unix seconds, otherwise Unix milliseconds. Misreads
    /// millisecond dates between 1966 and 1973.
    #[default]
    Auto,
    /// Always Unix milliseconds: 86400000 is 1970-01-02.
    Millis,
}

/// How long Loops remembers an `Idempotency-Key`: 24 hours (`loops-api.md` §5).
pub const DEFAULT_IDEMPOTENCY_TTL_SECONDS: u64 = 24 * 3600;

/// Settings that may change at run time. Every field has a default, so `{}` is valid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Requests per second for the team (Loops' baseline is 10).
    pub rate_limit: u32,
    pub window: RateWindow,
    /// Send `Retry-After` (whole seconds) on 429. Loops does not document sending it.
    pub retry_after: bool,
    pub unknown_properties: UnknownProperties,
    pub unknown_lists: UnknownLists,
    /// `teamName` of `GET /v1/api-key`.
    pub team_name: String,
    /// Whether a request that carried an `Idempotency-Key` and failed (4xx, or 5xx or a dropped
    /// connection before or after the effect) consumes its key, so that a retry gets 409.
    pub keys_consumed_on_failure: bool,
    pub email_match: EmailMatch,
    pub numeric_dates: NumericDates,
    /// How long an `Idempotency-Key` is remembered, in seconds (Loops: 24 hours). Shorter in
    /// tests, so that what happens once Loops has forgotten a key can be seen.
    pub idempotency_ttl_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rate_limit: 10,
            window: RateWindow::Sliding,
            retry_after: false,
            unknown_properties: UnknownProperties::Reject,
            unknown_lists: UnknownLists::Reject,
            team_name: "Simulated Team".into(),
            keys_consumed_on_failure: false,
            email_match: EmailMatch::CaseInsensitive,
            numeric_dates: NumericDates::Auto,
            idempotency_ttl_seconds: DEFAULT_IDEMPOTENCY_TTL_SECONDS,
        }
    }
}

/// Why a change of settings was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Case-insensitive matching would make two contacts one.
    #[error(
        "email_match cannot become case_insensitive: the contacts {first} and {second} differ \
         only in case (delete one of them, or POST /_sim/reset first)"
    )]
    EmailsCollide { first: String, second: String },
}

/// Everything the simulator starts with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub bind: SocketAddr,
    /// A valid API key (`Authorization: Bearer <key>`).
    pub api_key: String,
    /// More valid keys of the same team (Loops allows several keys per team): a key rotated
    /// with the team's contacts kept.
    pub other_api_keys: Vec<String>,
    /// Larger request bodies are answered 413.
    pub max_body_bytes: usize,
    pub settings: Settings,
    /// Mailing lists the team has from the start (lists cannot be created through the API).
    pub lists: Vec<MailingList>,
    /// Custom contact properties the team has from the start.
    pub properties: Vec<(String, PropertyType)>,
    /// A connection whose request headers take longer is closed (a client that sends half a
    /// request holds nothing).
    pub header_read_timeout: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: "test-key".into(),
            other_api_keys: Vec::new(),
            max_body_bytes: 256 * 1024,
            settings: Settings::default(),
            lists: Vec::new(),
            properties: Vec::new(),
            header_read_timeout: loopsync_core::tuning::HEADER_READ_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod window_names {
    use super::*;

    #[test]
    fn a_token_bucket_is_named_either_way() {
        for name in ["token_bucket", "token-bucket"] {
            let settings: Settings =
                serde_json::from_str(&format!(r#"{{"window": "{name}"}}"#)).unwrap();
            assert_eq!(settings.window, RateWindow::TokenBucket);
        }
        assert!(serde_json::from_str::<Settings>(r#"{"window": "bucket"}"#).is_err());
    }
}
