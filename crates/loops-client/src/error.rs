//! Classification of Loops' answers: one function, [`classify`], decides what every HTTP answer
//! means, and [`LoopsError::class`] what the pipeline should do about it.

use std::time::Duration;

use loopsync_core::tuning::MAX_LOOPS_MESSAGE_CHARS;
use loopsync_core::{Classified, ErrorClass};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::rate_limit::RateLimitInfo;

/// Everything that can go wrong calling Loops.
#[derive(Debug, thiserror::Error)]
pub enum LoopsError {
    /// 429: the team's rate limit was exceeded.
    #[error("rate limited by Loops (limit {}, remaining {})", fmt_opt(.limit), fmt_opt(.remaining))]
    RateLimited {
        /// `x-ratelimit-limit`, when sent.
        limit: Option<u32>,
        /// `x-ratelimit-remaining`, when sent.
        remaining: Option<u32>,
        /// `Retry-After`, when sent (Loops does not document sending it).
        retry_after: Option<Duration>,
    },
    /// 409: the contact (email or userId) exists already, or an idempotency key was used before.
    #[error("conflict (409): {message}")]
    Conflict { message: String },
    /// 404: no such contact (delete), or no such resource.
    #[error("not found (404): {message}")]
    NotFound { message: String },
    /// 400: Loops refused the request; `message` is Loops' own words (with what they mean when
    /// they say the write found two contacts: [`names_two_contacts`]).
    #[error("invalid request (400): {message}{}", two_contacts_hint(.message))]
    Invalid { message: String },
    /// 401: the API key is missing, wrong or revoked.
    #[error("unauthorized (401): {message}")]
    Unauthorized { message: String },
    /// 5xx, with the body as text (it may be HTML or empty when a load balancer answered).
    #[error("server error {status}: {}", body_excerpt(.body))]
    Server { status: u16, body: String },
    /// 3xx: Loops does not redirect its API, and a redirect followed would send the request's
    /// body (contacts' data) and the key to wherever it points; not followed.
    #[error(
        "redirected ({status}) to {}: not followed (the request and its key stay with the \
         configured loops.base_url; point it at the final address if the move is genuine)",
        .location.as_deref().unwrap_or("nowhere said")
    )]
    Redirected {
        status: u16,
        /// The `Location` header, redacted and shortened.
        location: Option<String>,
    },
    /// The answer's body was longer than loopsync reads from Loops
    /// ([`loopsync_core::tuning::MAX_LOOPS_BODY_BYTES`]); the rest was not read.
    #[error("the answer (status {status}) is over {limit} bytes: not Loops' answer, not read")]
    TooLarge { status: u16, limit: usize },
    /// Any other non-success status (405, 408, 413, …).
    #[error("unexpected status {status}: {}", body_excerpt(.body))]
    UnexpectedStatus { status: u16, body: String },
    /// A success status whose body is not the JSON we expected.
    #[error("could not decode Loops' answer (status {status}): {source}")]
    Decode {
        status: u16,
        /// What the JSON decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// No answer: connection refused, reset or dropped.
    #[error("transport error: {0}")]
    Transport(String),
    /// No answer within the client's timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The request was never sent because it breaks a rule the client checks itself
    /// (an idempotency key over 100 characters, an update without an identifier, …).
    #[error("request not sent: {0}")]
    Usage(String),
}

impl Classified for LoopsError {
    fn class(&self) -> ErrorClass {
        match self {
            LoopsError::RateLimited { retry_after, .. } => ErrorClass::Retryable {
                after: *retry_after,
            },
            LoopsError::Server { .. } | LoopsError::Transport(_) | LoopsError::Timeout(_) => {
                ErrorClass::RETRY
            }
            // A 200 with a body we cannot read: the effect may well have happened; contact
            // writes are upserts and events carry idempotency keys, so trying again is safe.
            LoopsError::Decode { .. } => ErrorClass::RETRY,
            LoopsError::UnexpectedStatus { status, .. } if *status == 408 => ErrorClass::RETRY,
            LoopsError::Conflict { .. }
            | LoopsError::NotFound { .. }
            | LoopsError::Invalid { .. }
            | LoopsError::Unauthorized { .. }
            | LoopsError::UnexpectedStatus { .. }
            | LoopsError::Redirected { .. }
            | LoopsError::TooLarge { .. } => ErrorClass::Permanent,
            LoopsError::Usage(_) => ErrorClass::Poison,
        }
    }
}

impl LoopsError {
    /// The request went toward Loops (an answer, or none: a timeout or a dropped connection);
    /// false only for [`LoopsError::Usage`], found before anything was sent.
    pub fn was_sent(&self) -> bool {
        !matches!(self, LoopsError::Usage(_))
    }

    /// Loops answered 429.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, LoopsError::RateLimited { .. })
    }

    /// Loops' message for a 4xx answer, if this is one.
    pub fn message(&self) -> Option<&str> {
        match self {
            LoopsError::Conflict { message }
            | LoopsError::NotFound { message }
            | LoopsError::Invalid { message }
            | LoopsError::Unauthorized { message } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn from_reqwest(error: reqwest::Error, timeout: Duration) -> LoopsError {
        if error.is_timeout() {
            LoopsError::Timeout(timeout)
        } else {
            // Where it went: the origin only (`without_url` keeps query strings, which hold
            // emails, out of logs).
            let origin = error.url().map(|u| {
                let mut origin = format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default());
                if let Some(port) = u.port() {
                    origin.push_str(&format!(":{port}"));
                }
                origin
            });
            let chain = error_chain(&error.without_url());
            LoopsError::Transport(match origin {
                Some(origin) => format!("cannot reach Loops at {origin}: {chain}"),
                None => chain,
            })
        }
    }
}

/// Where each [`LoopsError`]'s text names the HTTP status of Loops' answer: the text before the
/// status, and the status when the text does not spell it. Kept beside the `#[error]`
/// attributes above, and tested against them.
const ANSWERS: &[(&str, Option<u16>)] = &[
    ("rate limited by Loops", Some(429)),
    ("conflict (", None),
    ("not found (", None),
    ("invalid request (", None),
    ("unauthorized (", None),
    ("server error ", None),
    ("redirected (", None),
    ("the answer (status ", None),
    ("unexpected status ", None),
    ("could not decode Loops' answer (status ", None),
];

/// The HTTP status of Loops' answer that a kept reason names: the text of a [`LoopsError`],
/// alone or after words of loopsync's own (`gave up after 3 attempts: server error 503: …`).
/// `None` when it names none: no answer came (a timeout, a dropped connection), the request
/// was never sent, or the reason is not Loops' answer at all.
pub fn answer_status(reason: &str) -> Option<u16> {
    reason.split(": ").find_map(|part| {
        ANSWERS.iter().find_map(|(prefix, fixed)| {
            let rest = part.strip_prefix(prefix)?;
            fixed.or_else(|| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok().filter(|s| (100..600).contains(s))
            })
        })
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Loops' words when the email and the userId of a write (or an event) match two different
/// contacts (`loops-api.md` §2.3): 400 "Multiple contacts found for the given criteria".
pub const TWO_CONTACTS: &str = "Multiple contacts found";

/// Whether a message (Loops', or a reason that keeps it) says a write found two contacts.
pub fn names_two_contacts(text: &str) -> bool {
    text.contains(TWO_CONTACTS)
}

/// What Loops' two-contacts refusal means, said after its words: it comes back on every run
/// until the cause is fixed, and the usual cause is two syncs of one team.
fn two_contacts_hint(message: &str) -> &'static str {
    if names_two_contacts(message) {
        " — the email and the userId sent belong to two different contacts in Loops: usually \
         two syncs of this team that identify contacts differently (one by email, one by \
         userId) after an email changed. See \"Combining syncs on one Loops team\" in \
         docs/operations.md"
    } else {
        ""
    }
}

fn fmt_opt(value: &Option<u32>) -> String {
    value.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
}

fn body_excerpt(body: &str) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_owned();
    }
    shorten(trimmed)
}

/// `text` cut to [`MAX_LOOPS_MESSAGE_CHARS`] characters (on a character boundary), with `…`
/// when something was cut: what of Loops' words an error, and so a record's reason, keeps.
pub(crate) fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_LOOPS_MESSAGE_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// Reads Loops' message from an error body, [`shorten`]ed. Like loops-go, `error` (a string, or
/// an object with a `message`) is preferred over `message`; a body that is not JSON gives `None`.
pub(crate) fn message_of(body: &str) -> Option<String> {
    full_message_of(body).map(|m| shorten(&m))
}

fn full_message_of(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let object = value.as_object()?;
    match object.get("error") {
        Some(serde_json::Value::String(text)) => return Some(text.clone()),
        Some(serde_json::Value::Object(inner)) => {
            for field in ["message", "reason"] {
                if let Some(serde_json::Value::String(text)) = inner.get(field) {
                    return Some(text.clone());
                }
            }
        }
        _ => {}
    }
    object
        .get("message")
        .and_then(|m| m.as_str())
        .map(str::to_owned)
}

/// Classifies one answer from Loops. `Ok` carries the body of a success; every other answer
/// becomes the [`LoopsError`] that says what happened.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> Result<(), LoopsError> {
    if status.is_success() {
        return Ok(());
    }
    let message = || message_of(body).unwrap_or_else(|| format!("unexpected status: {status}"));
    Err(match status.as_u16() {
        429 => {
            let rate = RateLimitInfo::from_headers(headers);
            LoopsError::RateLimited {
                limit: rate.limit,
                remaining: rate.remaining,
                retry_after: retry_after(headers),
            }
        }
        409 => LoopsError::Conflict { message: message() },
        404 => LoopsError::NotFound { message: message() },
        400 => LoopsError::Invalid { message: message() },
        401 => LoopsError::Unauthorized { message: message() },
        s @ 300..=399 => LoopsError::Redirected {
            status: s,
            location: headers.get(reqwest::header::LOCATION).map(|l| {
                shorten(&loopsync_core::url::redact(&String::from_utf8_lossy(
                    l.as_bytes(),
                )))
            }),
        },
        s @ 500..=599 => LoopsError::Server {
            status: s,
            body: shorten(body.trim()),
        },
        s => LoopsError::UnexpectedStatus {
            status: s,
            body: shorten(body.trim()),
        },
    })
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn classify_status(status: u16, body: &str) -> LoopsError {
        classify(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body,
        )
        .unwrap_err()
    }

    /// Loops' two-contacts refusal keeps its words and says what they mean, pointing to the
    /// docs; another 400 says only Loops' words.
    #[test]
    fn a_write_that_finds_two_contacts_says_why() {
        let two = classify_status(
            400,
            r#"{"success": false, "message": "Multiple contacts found for the given criteria"}"#,
        );
        let text = two.to_string();
        assert!(
            text.starts_with(
                "invalid request (400): Multiple contacts found for the given criteria — the \
                 email and the userId sent belong to two different contacts in Loops"
            ),
            "{text}"
        );
        assert!(
            text.contains("\"Combining syncs on one Loops team\" in docs/operations.md"),
            "{text}"
        );
        assert!(names_two_contacts(&text));
        assert_eq!(
            two.message(),
            Some("Multiple contacts found for the given criteria")
        );
        let other = classify_status(400, r#"{"success": false, "message": "Invalid email"}"#);
        assert_eq!(other.to_string(), "invalid request (400): Invalid email");
        assert!(!names_two_contacts(&other.to_string()));
    }

    #[test]
    fn success_is_ok() {
        assert!(classify(StatusCode::OK, &HeaderMap::new(), "{}").is_ok());
    }

    #[test]
    fn rate_limit_reads_headers_and_retry_after() {
        let h = headers(&[
            ("x-ratelimit-limit", "10"),
            ("x-ratelimit-remaining", "0"),
            ("retry-after", "2"),
        ]);
        let error = classify(StatusCode::TOO_MANY_REQUESTS, &h, "").unwrap_err();
        match &error {
            LoopsError::RateLimited {
                limit,
                remaining,
                retry_after,
            } => {
                assert_eq!(*limit, Some(10));
                assert_eq!(*remaining, Some(0));
                assert_eq!(*retry_after, Some(Duration::from_secs(2)));
            }
            other => panic!("not rate limited: {other:?}"),
        }
        assert_eq!(
            error.class(),
            ErrorClass::Retryable {
                after: Some(Duration::from_secs(2))
            }
        );
    }

    /// What a request count needs to know of an error: was anything sent, was it a 429.
    #[test]
    fn sent_and_rate_limited() {
        let limited = classify_status(429, "");
        assert!(limited.was_sent() && limited.is_rate_limited());
        let server = classify_status(503, "Service Unavailable");
        assert!(server.was_sent() && !server.is_rate_limited());
        assert!(LoopsError::Transport("reset".into()).was_sent());
        assert!(LoopsError::Timeout(Duration::from_secs(1)).was_sent());
        assert!(!LoopsError::Usage("no identifier".into()).was_sent());
    }

    #[test]
    fn rate_limit_without_headers_has_no_delay() {
        let error = classify_status(
            429,
            "{\"success\":false,\"message\":\"Rate limit exceeded\"}",
        );
        assert_eq!(error.class(), ErrorClass::RETRY);
    }

    #[test]
    fn retry_after_as_http_date_in_the_past_is_zero() {
        let mut h = HeaderMap::new();
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn four_hundreds_carry_loops_message_and_are_permanent() {
        let error = classify_status(400, r#"{"success":false,"message":"Invalid email"}"#);
        assert!(matches!(&error, LoopsError::Invalid { message } if message == "Invalid email"));
        assert_eq!(error.class(), ErrorClass::Permanent);
        assert!(matches!(
            classify_status(409, r#"{"success":false,"message":"exists"}"#),
            LoopsError::Conflict { .. }
        ));
        assert!(matches!(
            classify_status(404, r#"{"success":false,"message":"Contact not found."}"#),
            LoopsError::NotFound { .. }
        ));
    }

    #[test]
    fn error_field_is_preferred_over_message() {
        let error = classify_status(
            401,
            r#"{"success":false,"message":"from message","error":"Invalid API key"}"#,
        );
        assert_eq!(error.message(), Some("Invalid API key"));
        let nested = classify_status(
            400,
            r#"{"success":false,"error":{"path":"x","reason":"bad"}}"#,
        );
        assert_eq!(nested.message(), Some("bad"));
    }

    #[test]
    fn html_and_empty_server_errors_are_retryable() {
        let html = classify_status(502, "<html><body>Bad Gateway</body></html>");
        assert!(
            matches!(&html, LoopsError::Server { status: 502, body } if body.contains("Bad Gateway"))
        );
        assert_eq!(html.class(), ErrorClass::RETRY);
        let empty = classify_status(500, "");
        assert!(empty.to_string().contains("(empty body)"));
        assert_eq!(empty.class(), ErrorClass::RETRY);
    }

    /// Loops' message becomes a record's reason: at most 200 characters of it, cut on a
    /// character boundary.
    #[test]
    fn a_long_message_is_cut_on_a_character_boundary() {
        let long = "é".repeat(150) + &"x".repeat(500);
        let error = classify_status(400, &serde_json::json!({"message": long}).to_string());
        let message = error.message().unwrap();
        assert_eq!(
            message.chars().count(),
            MAX_LOOPS_MESSAGE_CHARS + 1,
            "{message}"
        );
        assert!(message.starts_with(&"é".repeat(150)) && message.ends_with("x…"));
        let short = classify_status(400, r#"{"message":"Invalid email"}"#);
        assert_eq!(short.message(), Some("Invalid email"));
        let server = classify_status(502, &"<p>".repeat(1000));
        assert!(server.to_string().chars().count() < 300, "{server}");
    }

    /// A 3xx is an answer of its own, never followed: permanent, and its target is shown
    /// without the secrets it may carry.
    #[test]
    fn a_redirect_is_permanent() {
        let h = headers(&[("location", "https://u:s3cret@elsewhere.example/x")]);
        for status in [301, 302, 307, 308] {
            let error = classify(StatusCode::from_u16(status).unwrap(), &h, "").unwrap_err();
            assert!(matches!(error, LoopsError::Redirected { .. }), "{error:?}");
            assert_eq!(error.class(), ErrorClass::Permanent);
            let text = error.to_string();
            assert!(text.contains("not followed") && text.contains("elsewhere.example"));
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn non_json_four_hundred_falls_back_to_status() {
        let error = classify_status(400, "nope");
        assert_eq!(error.message(), Some("unexpected status: 400 Bad Request"));
    }

    #[test]
    fn other_statuses() {
        assert_eq!(classify_status(405, "").class(), ErrorClass::Permanent);
        assert_eq!(classify_status(408, "").class(), ErrorClass::RETRY);
        assert_eq!(LoopsError::Usage("x".into()).class(), ErrorClass::Poison);
        assert_eq!(
            LoopsError::Timeout(Duration::from_secs(5)).class(),
            ErrorClass::RETRY
        );
    }

    /// The status a kept reason names is the one of the answer each error stands for, also
    /// after loopsync's own words; no answer, no status.
    #[test]
    fn a_reason_names_the_answers_status() {
        let message = || "Invalid email address: 400 (x@y)".to_owned();
        let answers = [
            (
                LoopsError::RateLimited {
                    limit: Some(10),
                    remaining: Some(0),
                    retry_after: None,
                },
                Some(429),
            ),
            (LoopsError::Conflict { message: message() }, Some(409)),
            (LoopsError::NotFound { message: message() }, Some(404)),
            (LoopsError::Invalid { message: message() }, Some(400)),
            (LoopsError::Unauthorized { message: message() }, Some(401)),
            (
                LoopsError::Server {
                    status: 503,
                    body: "<html>502</html>".into(),
                },
                Some(503),
            ),
            (
                LoopsError::Redirected {
                    status: 301,
                    location: None,
                },
                Some(301),
            ),
            (
                LoopsError::TooLarge {
                    status: 200,
                    limit: 10,
                },
                Some(200),
            ),
            (
                LoopsError::UnexpectedStatus {
                    status: 405,
                    body: String::new(),
                },
                Some(405),
            ),
            (
                LoopsError::Decode {
                    status: 200,
                    source: serde_json::from_str::<u8>("x").unwrap_err(),
                },
                Some(200),
            ),
            (LoopsError::Transport("connection reset (500)".into()), None),
            (LoopsError::Timeout(Duration::from_secs(5)), None),
            (LoopsError::Usage("too long: 400".into()), None),
        ];
        for (error, status) in answers {
            let text = error.to_string();
            assert_eq!(answer_status(&text), status, "{text}");
            let given_up = format!("gave up after 3 attempts: {text}");
            assert_eq!(answer_status(&given_up), status, "{given_up}");
        }
        assert_eq!(answer_status("malformed email (column email)"), None);
    }

    /// An unreadable answer keeps the JSON decoder's error as its source; the message says it.
    #[test]
    fn a_decode_error_keeps_the_decoder_error() {
        let e = LoopsError::Decode {
            status: 200,
            source: serde_json::from_str::<u8>("x").unwrap_err(),
        };
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(
            e.to_string(),
            format!("could not decode Loops' answer (status 200): {source}")
        );
        assert!(e.class().is_retryable());
    }
}
