//! How loopsync talks TLS to a PostgreSQL or MySQL/MariaDB server, decided once from the
//! warehouse URL for both drivers: the URL's `sslmode` (libpq's names) and `sslrootcert`
//! parameters, taken out of the URL before a driver reads it. Without `sslmode`, a server on
//! loopback is asked for TLS if it offers it (`prefer`) and any other host must speak TLS
//! (`require`): a warehouse across a network never carries rows, emails or a login in
//! cleartext unless the URL says `sslmode=disable`.

use std::path::PathBuf;

/// libpq's `sslmode`, as loopsync honours it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, else cleartext; the server is not authenticated. MySQL's
    /// driver cannot fall back: there `prefer` connects without TLS.
    Prefer,
    /// TLS or no connection; the certificate is not checked (as libpq), unless a root
    /// certificate is given, which makes it `verify-ca` (as libpq).
    Require,
    /// TLS, with a certificate that a trusted root signed; its name is not checked.
    VerifyCa,
    /// TLS, with a certificate that a trusted root signed, for the host the URL names.
    VerifyFull,
}

impl TlsMode {
    /// The mode as `sslmode` names it.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<TlsMode> {
        // MySQL's own spelling (`ssl-mode=VERIFY_IDENTITY`) is accepted too.
        match value.to_ascii_lowercase().replace('_', "-").as_str() {
            "disable" | "disabled" => Some(TlsMode::Disable),
            "prefer" | "preferred" | "allow" => Some(TlsMode::Prefer),
            "require" | "required" => Some(TlsMode::Require),
            "verify-ca" => Some(TlsMode::VerifyCa),
            "verify-full" | "verify-identity" => Some(TlsMode::VerifyFull),
            _ => None,
        }
    }
}

/// The TLS settings of one warehouse URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: TlsMode,
    /// PEM file of the roots to trust (`sslrootcert`); without it, the roots that Mozilla
    /// trusts (webpki-roots).
    pub root_cert: Option<PathBuf>,
}

impl Tls {
    /// The server's certificate is checked against trusted roots.
    pub fn verifies(&self) -> bool {
        matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// A warehouse URL split into what its driver reads and the TLS settings loopsync applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The URL without `sslmode` and `sslrootcert`.
    pub url: String,
    pub tls: Tls,
}

/// The drivers' own TLS parameters, refused so that one rule decides.
const DRIVERS_OWN: &[&str] = &[
    "require_ssl",
    "verify_ca",
    "verify_identity",
    "built_in_roots",
    "sslcert",
    "sslkey",
    "sslnegotiation",
];

/// `url`'s TLS settings, and the URL its driver is given. A URL that does not parse is left for
/// the driver to refuse with its own words.
pub fn split(url: &str) -> Result<Split, String> {
    let Ok(mut parsed) = ::url::Url::parse(url) else {
        return Ok(Split {
            url: url.to_owned(),
            tls: Tls {
                mode: TlsMode::Prefer,
                root_cert: None,
            },
        });
    };
    let (mut mode, mut root_cert) = (None, None);
    let (mut kept, mut ours) = (Vec::new(), false);
    for (key, value) in parsed.query_pairs() {
        let key = key.to_ascii_lowercase();
        if DRIVERS_OWN.contains(&key.as_str()) {
            return Err(format!(
                "the warehouse URL's `{key}` is not supported: say `sslmode` (disable, prefer, \
                 require, verify-ca, verify-full) and `sslrootcert` (a PEM file of trusted roots)"
            ));
        }
        match key.as_str() {
            "sslmode" | "ssl-mode" => {
                ours = true;
                mode = Some(TlsMode::parse(&value).ok_or_else(|| {
                    format!(
                        "the warehouse URL's sslmode `{value}` is not one of disable, prefer, \
                         require, verify-ca, verify-full"
                    )
                })?)
            }
            "sslrootcert" | "ssl-ca" => {
                ours = true;
                root_cert = Some(PathBuf::from(value.into_owned()))
            }
            _ => kept.push((key, value.into_owned())),
        }
    }
    let mode = match mode {
        // libpq: `require` with a root certificate checks the chain.
        Some(TlsMode::Require) if root_cert.is_some() => TlsMode::VerifyCa,
        Some(mode) => mode,
        None if is_loopback(parsed.host_str().unwrap_or("localhost")) => TlsMode::Prefer,
        None => TlsMode::Require,
    };
    if root_cert.is_some() && matches!(mode, TlsMode::Disable | TlsMode::Prefer) {
        return Err(format!(
            "the warehouse URL names `sslrootcert` with sslmode={}: say sslmode=verify-full \
             (or verify-ca) for the certificate to be checked",
            mode.name()
        ));
    }
    if !ours {
        // The URL as written: nothing to take out.
    } else if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(Split {
        url: if ours { parsed.into() } else { url.to_owned() },
        tls: Tls { mode, root_cert },
    })
}

/// `host` is this machine: a loopback name or address, or a Unix socket's folder (none, or
/// one written as a path).
fn is_loopback(host: &str) -> bool {
    host.is_empty()
        || host.starts_with('/')
        || host.to_ascii_lowercase().starts_with("%2f")
        || crate::url::is_loopback_host(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> TlsMode {
        split(url).unwrap().tls.mode
    }

    #[test]
    fn a_host_across_a_network_requires_tls_unless_the_url_says_otherwise() {
        assert_eq!(mode("postgres://u@db.example.com/app"), TlsMode::Require);
        assert_eq!(mode("mysql://u@10.0.0.5:3306/app"), TlsMode::Require);
        assert_eq!(mode("postgres://u@127.0.0.1:5432/app"), TlsMode::Prefer);
        assert_eq!(mode("postgres://u@localhost/app"), TlsMode::Prefer);
        assert_eq!(mode("postgres://u@[::1]:5432/app"), TlsMode::Prefer);
        assert_eq!(
            mode("postgres://u@db.example.com/app?sslmode=disable"),
            TlsMode::Disable
        );
        assert_eq!(
            mode("mysql://u@db/app?ssl-mode=VERIFY_IDENTITY"),
            TlsMode::VerifyFull
        );
    }

    #[test]
    fn the_driver_gets_the_url_without_loopsyncs_parameters() {
        let split = split(
            "postgres://u:p%40ss@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=ca.pem",
        )
        .unwrap();
        assert_eq!(
            split.url,
            "postgres://u:p%40ss@db:5432/app?application_name=x"
        );
        assert_eq!(split.tls.mode, TlsMode::VerifyFull);
        assert_eq!(split.tls.root_cert, Some(PathBuf::from("ca.pem")));
        let bare = super::split("postgres://u@db/app?sslmode=require").unwrap();
        assert_eq!(bare.url, "postgres://u@db/app");
    }

    #[test]
    fn require_with_a_root_certificate_checks_the_chain() {
        assert_eq!(
            mode("postgres://u@db/app?sslmode=require&sslrootcert=ca.pem"),
            TlsMode::VerifyCa
        );
    }

    #[test]
    fn unknown_modes_and_the_drivers_own_switches_are_refused() {
        assert!(split("postgres://u@db/app?sslmode=maybe").is_err());
        assert!(split("mysql://u@db/app?require_ssl=true").is_err());
        assert!(split("postgres://u@db/app?sslrootcert=ca.pem&sslmode=disable").is_err());
    }
}
