//! The one way loopsync writes a time for people (log and progress lines): RFC 3339, to the
//! second, UTC.

/// `t` as RFC 3339 to the second, UTC: `2023-11-14T22:13:20Z`.
pub fn utc_seconds(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The time in the checkpointer's and the progress lines: RFC 3339 to the second, UTC.
    #[test]
    fn times_are_rfc3339_utc_to_the_second() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        assert_eq!(utc_seconds(t), "2023-11-14T22:13:20Z");
    }
}
