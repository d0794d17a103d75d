//! Whether `[nats]` would send its credentials in cleartext: the one rule for it.
//!
//! NATS sends a user's password or token in its `CONNECT`, and every message after it carries
//! the mapped personal data. Over plain TCP to another host both cross the network readable, so
//! a config with credentials must ask for TLS (`tls://`, or `nats.tls_ca`), or say that it
//! knows (`nats.allow_plaintext_credentials = true`: a private network, a sidecar proxy that
//! encrypts). Loopback never leaves the machine, as the Loops client's `http://` on loopback.

use crate::NatsConfig;

/// Why `nats` would send credentials in cleartext, if it would; `None` when it has none, asks
/// for TLS, talks to loopback only, or is allowed to. `url` is a server or several, separated
/// by commas, with or without a scheme, as the NATS client reads it.
pub(crate) fn plaintext_credentials(nats: &NatsConfig) -> Option<String> {
    if nats.allow_plaintext_credentials || nats.tls_ca.is_some() {
        return None;
    }
    let servers: Vec<Server> = nats.url.split(',').map(Server::parse).collect();
    let what = if nats.user.is_some() {
        "nats.user and nats.password"
    } else if nats.token.is_some() {
        "nats.token"
    } else if nats.credentials.is_some() {
        "nats.credentials"
    } else if servers.iter().any(|s| s.credentials) {
        "the credentials in nats.url"
    } else {
        return None;
    };
    let exposed: Vec<&str> = servers
        .iter()
        .filter(|s| !s.tls && !s.loopback)
        .map(|s| s.host.as_str())
        .collect();
    if exposed.is_empty() {
        return None;
    }
    Some(format!(
        "{what} would cross the network in cleartext to {}: use a tls:// url (or nats.tls_ca), \
         or set nats.allow_plaintext_credentials = true if the network is trusted",
        exposed.join(", ")
    ))
}

/// What the rule needs of one server of `nats.url`.
struct Server {
    /// The host as written, for the message (never the credentials).
    host: String,
    tls: bool,
    loopback: bool,
    /// A user, password or token written in the url.
    credentials: bool,
}

impl Server {
    /// One server address; without a scheme it is `nats://`, as the client reads it. An
    /// address the client could not read either is left to the connection to refuse, taken as
    /// neither TLS nor loopback.
    fn parse(address: &str) -> Server {
        let address = address.trim();
        let address = if address.contains("://") {
            address.to_owned()
        } else {
            format!("nats://{address}")
        };
        let Ok(url) = url::Url::parse(&address) else {
            return Server {
                host: "(an address that is not a url)".to_owned(),
                tls: false,
                loopback: false,
                credentials: false,
            };
        };
        let host = url.host_str().unwrap_or_default().to_owned();
        Server {
            loopback: loopsync_core::url::is_loopback_host(&host),
            tls: url.scheme() == "tls",
            credentials: !url.username().is_empty() || url.password().is_some(),
            host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats(url: &str) -> NatsConfig {
        let text = format!("url = \"{url}\"");
        toml::from_str(&text).expect("a [nats] section")
    }

    /// Credentials in every form go only over TLS or loopback, unless the switch allows it;
    /// the message names the host and the way out, never the secret.
    #[test]
    fn credentials_over_plain_tcp_to_another_host_are_refused() {
        let with_password = NatsConfig {
            user: Some("loopsync".into()),
            password: Some("s3cret".into()),
            ..nats("nats://nats.internal:4222")
        };
        assert_eq!(
            plaintext_credentials(&with_password).as_deref(),
            Some(
                "nats.user and nats.password would cross the network in cleartext to \
                 nats.internal: use a tls:// url (or nats.tls_ca), or set \
                 nats.allow_plaintext_credentials = true if the network is trusted"
            )
        );
        let token = NatsConfig {
            token: Some("s3cret".into()),
            ..nats("nats.internal:4222")
        };
        assert!(
            plaintext_credentials(&token)
                .unwrap()
                .starts_with("nats.token ")
        );
        let creds = NatsConfig {
            credentials: Some("user.creds".into()),
            ..nats("nats://10.0.0.7:4222")
        };
        assert!(
            plaintext_credentials(&creds)
                .unwrap()
                .contains("to 10.0.0.7:")
        );
        let in_url = plaintext_credentials(&nats("nats://loopsync:s3cret@nats.internal:4222"))
            .expect("refused");
        assert!(
            in_url.starts_with("the credentials in nats.url "),
            "{in_url}"
        );
        assert!(!in_url.contains("s3cret"), "{in_url}");
        // One server of several in cleartext is enough.
        let mixed = nats("tls://a.internal:4222,nats://t0ken@b.internal:4222");
        assert!(
            plaintext_credentials(&mixed)
                .unwrap()
                .contains("to b.internal:")
        );

        // Allowed: the switch, TLS, loopback, or no credentials at all.
        let allowed = NatsConfig {
            allow_plaintext_credentials: true,
            ..with_password.clone()
        };
        assert_eq!(plaintext_credentials(&allowed), None);
        let ca = NatsConfig {
            tls_ca: Some("ca.pem".into()),
            ..with_password.clone()
        };
        assert_eq!(plaintext_credentials(&ca), None);
        for url in [
            "tls://loopsync:s3cret@nats.internal:4222",
            "nats://loopsync:s3cret@127.0.0.1:4222",
            "nats://t0ken@localhost:4222",
            "nats://t0ken@[::1]:4222",
            "t0ken@127.0.0.2:4222",
            "nats://nats.internal:4222",
        ] {
            assert_eq!(plaintext_credentials(&nats(url)), None, "{url}");
        }
    }
}
