//! Which Loops a sync's state belongs to.
//!
//! A sync's state says what *one* Loops has confirmed. A destination is identified by the team
//! the API key belongs to (`teamName` of `GET /v1/api-key`) **and** the API's base URL: two
//! Loops (say, two simulators, or a simulator and production) can carry the same team name, and
//! one URL serves many teams. The URL is compared normalised: no surrounding blanks, no trailing
//! slash, scheme and host in lower case, no default port.

use std::fmt;

use serde::Serialize;

/// A Loops destination: a team at a base URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    /// `teamName` of `GET /v1/api-key`; `None` when Loops did not say.
    pub team: Option<String>,
    /// The API root (`https://app.loops.so/api`), normalised by [`normalize_base_url`].
    pub base_url: String,
}

impl Destination {
    /// The destination of a team at a base URL (normalised).
    pub fn new(team: Option<String>, base_url: &str) -> Destination {
        Destination {
            team,
            base_url: normalize_base_url(base_url),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.team {
            Some(team) => write!(f, "team \"{team}\" at {}", self.base_url),
            None => write!(f, "an unnamed team at {}", self.base_url),
        }
    }
}

/// `base_url` as destinations compare it: trimmed, without trailing slashes, the scheme and
/// the host in lower case (they are case-insensitive), without the scheme's default port, a
/// password in it [`crate::url::redact`]ed (a destination is shown and kept in the state). The
/// path keeps its case.
pub fn normalize_base_url(base_url: &str) -> String {
    crate::url::redact(&normalize(base_url))
}

fn normalize(base_url: &str) -> String {
    let url = base_url.trim().trim_end_matches('/');
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let mut authority = authority.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => Some(":443"),
        "http" => Some(":80"),
        _ => None,
    };
    if let Some(port) = default_port
        && let Some(host) = authority.strip_suffix(port)
    {
        authority = host.to_owned();
    }
    format!("{scheme}://{authority}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        for (given, normal) in [
            ("https://app.loops.so/api", "https://app.loops.so/api"),
            ("https://app.loops.so/api/", "https://app.loops.so/api"),
            ("  https://app.loops.so/api//  ", "https://app.loops.so/api"),
            ("HTTPS://App.Loops.so/api", "https://app.loops.so/api"),
            ("https://app.loops.so:443/api", "https://app.loops.so/api"),
            ("http://127.0.0.1:80/api", "http://127.0.0.1/api"),
            ("http://127.0.0.1:8788/api/", "http://127.0.0.1:8788/api"),
            (
                "https://app.loops.so:8443/api",
                "https://app.loops.so:8443/api",
            ),
            ("http://LOCALHOST:8788", "http://localhost:8788"),
            // The path is case-sensitive: left as written.
            (
                "https://proxy.example/Loops/API/",
                "https://proxy.example/Loops/API",
            ),
            ("not a url/", "not a url"),
            (
                "https://proxy:S3cret@Loops.example/api",
                "https://proxy:***@loops.example/api",
            ),
        ] {
            assert_eq!(normalize_base_url(given), normal, "{given:?}");
        }
    }

    #[test]
    fn a_destination_is_its_team_and_its_url() {
        let sim_a = Destination::new(Some("Simulated Team".into()), "http://127.0.0.1:4001/api");
        let sim_a_again =
            Destination::new(Some("Simulated Team".into()), "http://127.0.0.1:4001/api/");
        let sim_b = Destination::new(Some("Simulated Team".into()), "http://127.0.0.1:4002/api");
        let other_team = Destination::new(Some("Acme".into()), "http://127.0.0.1:4001/api");
        let unnamed = Destination::new(None, "http://127.0.0.1:4001/api");
        assert_eq!(sim_a, sim_a_again, "a trailing slash is the same URL");
        assert_ne!(
            sim_a, sim_b,
            "the same team name at another URL is another Loops"
        );
        assert_ne!(sim_a, other_team, "another team at the same URL");
        assert_ne!(
            sim_a, unnamed,
            "a team Loops did not name is not a named one"
        );
        assert_eq!(
            sim_a.to_string(),
            "team \"Simulated Team\" at http://127.0.0.1:4001/api"
        );
        assert_eq!(
            unnamed.to_string(),
            "an unnamed team at http://127.0.0.1:4001/api"
        );
    }
}
