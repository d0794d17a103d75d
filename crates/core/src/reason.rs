//! The kind of a failed record's reason: what may be shown or logged where no record may be.
//! One rule for the status page without its token, the status summary and the workers' log
//! lines: loopsync's own words, never Loops' message (which may repeat an email or a value).

use crate::envelope::OutcomeStatus;

/// The longest kind of reason kept, in characters.
const MAX_CLASS_CHARS: usize = 100;

/// The kind of a failed record's reason, shown where no record may be (the status page without
/// its token, the status summary): loopsync's own reasons for an invalid record name the
/// column, never a value, and are kept whole; a refusal or a failure from Loops keeps only what
/// loopsync says of Loops' answer (`invalid request (400)`, `gave up after 3 attempts: server
/// error 503`), not Loops' message, which may repeat an email or a value.
pub fn reason_class(outcome: &str, reason: Option<&str>) -> String {
    let Some(reason) = reason.map(str::trim).filter(|r| !r.is_empty()) else {
        return "(no reason given)".into();
    };
    let kept = if outcome == OutcomeStatus::Invalid.as_str() {
        reason.to_owned()
    } else {
        let mut parts = reason.splitn(3, ": ");
        let first = parts.next().unwrap_or_default();
        // A dead letter's reason is `gave up after N attempts: <the last answer>`: keep what
        // loopsync says of that answer too.
        match parts.next() {
            Some(answer) if first.starts_with("gave up after") => format!("{first}: {answer}"),
            _ => first.to_owned(),
        }
    };
    let mut chars = kept.chars();
    let mut cut: String = chars.by_ref().take(MAX_CLASS_CHARS).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_class_keeps_loopsyncs_words_and_not_loops_message() {
        assert_eq!(
            reason_class("invalid", Some("malformed email (column email)")),
            "malformed email (column email)"
        );
        assert_eq!(
            reason_class(
                "rejected",
                Some("invalid request (400): Invalid email address: a@b")
            ),
            "invalid request (400)"
        );
        assert_eq!(
            reason_class(
                "dead_lettered",
                Some("gave up after 3 attempts: server error 503: <html>a@b</html>")
            ),
            "gave up after 3 attempts: server error 503"
        );
        assert_eq!(
            reason_class("dead_lettered", Some("transport error: reset by a@b")),
            "transport error"
        );
        assert_eq!(reason_class("rejected", None), "(no reason given)");
        let long = "x".repeat(300);
        assert_eq!(
            reason_class("invalid", Some(&long)).chars().count(),
            MAX_CLASS_CHARS + 1
        );
    }
}
