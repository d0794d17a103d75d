//! The rate-limit headers of Loops' answers: read by the client after every answer, and by
//! the classification of a 429.

use reqwest::header::HeaderMap;

/// The rate-limit headers Loops puts on every answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// `x-ratelimit-limit`: requests per second for the team.
    pub limit: Option<u32>,
    /// `x-ratelimit-remaining`: requests left in the current window (a hint).
    pub remaining: Option<u32>,
}

impl RateLimitInfo {
    pub(crate) fn from_headers(headers: &HeaderMap) -> RateLimitInfo {
        let read = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        RateLimitInfo {
            limit: read("x-ratelimit-limit"),
            remaining: read("x-ratelimit-remaining"),
        }
    }
}
