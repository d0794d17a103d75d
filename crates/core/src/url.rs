//! URLs as loopsync shows and trusts them: [`redact`] hides the secrets a URL may carry
//! (a password, a NATS token, a `password=` parameter) wherever one is printed or logged, and
//! [`is_loopback`] says whether a URL's host is this machine (where plain `http://` is fine).
//!
//! Written by hand, not with a URL parser: a parser prints the URL it parsed re-serialised
//! (a trailing slash added, the host folded, characters encoded), and what a message should
//! show is the URL as the user wrote it, less its secrets.

use std::borrow::Cow;
use std::net::IpAddr;

/// What a secret is replaced by.
pub const REDACTED: &str = "***";

/// Query parameters whose value is a secret (`postgres://h/db?password=…`).
const SECRET_PARAMETERS: &[&str] = &[
    "password",
    "sslpassword",
    "pass",
    "token",
    "auth_token",
    "api_key",
    "apikey",
    "secret",
];

/// Schemes where a user name alone (`nats://TOKEN@host`) is a secret: NATS reads it as a
/// token. (A PostgreSQL or MySQL user name alone is a name, and is shown.)
const TOKEN_SCHEMES: &[&str] = &["nats", "tls", "ws", "wss"];

/// `url` as it may be shown: the password of `user:password@` replaced by `***`, a NATS token
/// (`nats://TOKEN@host`) too, and the values of secret query parameters (`password=`,
/// `token=`, …). A comma-separated list of servers (`nats://a:4222,nats://b:4222`) is
/// redacted server by server. Anything else is kept as written.
pub fn redact(url: &str) -> String {
    let token_scheme = match url.split_once("://") {
        Some((scheme, _)) => TOKEN_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()),
        // `user:pass@host:4222`: async-nats reads a URL without a scheme as nats://.
        None => true,
    };
    url.split(',')
        .map(|part| redact_one(part, token_scheme))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str, token_scheme: bool) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let authority: Cow<str> = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}").into(),
            None if token_scheme => format!("{REDACTED}@{host}").into(),
            None => authority.into(),
        },
        None => authority.into(),
    };
    let tail = redact_query(tail);
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// The path, query and fragment, the values of secret query parameters replaced.
fn redact_query(tail: &str) -> Cow<'_, str> {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.into();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let pairs: Vec<Cow<str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if SECRET_PARAMETERS.contains(&name.to_ascii_lowercase().as_str()) => {
                format!("{name}={REDACTED}").into()
            }
            _ => pair.into(),
        })
        .collect();
    let mut text = format!("{path}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        text.push('#');
        text.push_str(fragment);
    }
    text.into()
}

/// The host of `url` (`https://user:pw@[::1]:8788/api` → `::1`), if it has one.
pub fn host(url: &str) -> Option<&str> {
    let (_, rest) = url.trim().split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']')?.0,
        None => host_port.split(':').next().unwrap_or_default(),
    };
    (!host.is_empty()).then_some(host)
}

/// The host of `url` is this machine: `localhost`, an address of 127.0.0.0/8, or `::1`.
pub fn is_loopback(url: &str) -> bool {
    host(url).is_some_and(is_loopback_host)
}

/// `host` is this machine: `localhost`, an address of 127.0.0.0/8, or `::1` (brackets allowed).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_kept_as_written() {
        for (given, shown) in [
            (
                "nats://user:s3cret@127.0.0.1:4222",
                "nats://user:***@127.0.0.1:4222",
            ),
            ("nats://s3cret@nats:4222", "nats://***@nats:4222"),
            ("tls://s3cret@nats:4222", "tls://***@nats:4222"),
            ("user:s3cret@nats:4222", "user:***@nats:4222"),
            (
                "nats://a:s3cret@h1:4222,nats://b:s3cret@h2:4222",
                "nats://a:***@h1:4222,nats://b:***@h2:4222",
            ),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            (
                "postgres://root:s3cret@db:5432/test?sslmode=require",
                "postgres://root:***@db:5432/test?sslmode=require",
            ),
            // A PostgreSQL user alone is a name, not a secret.
            (
                "postgres://root@db:5432/test",
                "postgres://root@db:5432/test",
            ),
            (
                "postgres://db/test?user=me&password=s3cret#x",
                "postgres://db/test?user=me&password=***#x",
            ),
            (
                "mysql://root:s3cret@db:3306/test",
                "mysql://root:***@db:3306/test",
            ),
            // A password holding `@` is hidden whole.
            ("mysql://root:s3@cret@db/test", "mysql://root:***@db/test"),
            ("sqlite:///var/lib/state.db", "sqlite:///var/lib/state.db"),
            (
                "https://proxy:s3cret@Loops.Example/API",
                "https://proxy:***@Loops.Example/API",
            ),
            // An email in the query is no userinfo.
            (
                "https://app.loops.so/api/v1/contacts/find?email=ann@x.co",
                "https://app.loops.so/api/v1/contacts/find?email=ann@x.co",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact(given), shown, "{given}");
            assert!(!redact(given).contains("s3cret"), "{given}");
        }
    }

    #[test]
    fn loopback_hosts() {
        for url in [
            "http://127.0.0.1:8788/api",
            "http://127.1.2.3/api",
            "http://localhost:8788/api",
            "http://LOCALHOST/api",
            "http://[::1]:8788/api",
            "http://user:pw@127.0.0.1:8788",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "http://sim:8788/api",
            "http://10.0.0.1/api",
            "http://[::2]/api",
            "http://localhost.example.com/api",
            "http://127.0.0.1.example.com/api",
            "http://127.0.0.1@evil.example/api",
            "app.loops.so/api",
            "http:///api",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
        assert_eq!(host("https://u:p@[::1]:1/x"), Some("::1"));
        assert_eq!(host("https://app.loops.so/api"), Some("app.loops.so"));
    }
}
