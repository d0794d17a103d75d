//! TLS to a warehouse server, as the URL's `sslmode` says ([`loopsync_core::warehouse_tls`]):
//! the rustls client configuration for PostgreSQL, and the same choices in mysql_async's terms.
//! The roots are the `sslrootcert` file when one is named, else Mozilla's (webpki-roots).

use std::sync::Arc;

use loopsync_core::warehouse_tls::{Tls, TlsMode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::WarehouseError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots a server's certificate must chain to.
fn roots(tls: &Tls) -> Result<RootCertStore, WarehouseError> {
    let mut roots = RootCertStore::empty();
    let Some(path) = &tls.root_cert else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let unreadable = |why: String| {
        WarehouseError::BadUrl(format!(
            "sslrootcert {}: {why} (a PEM file of the certificates to trust)",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(unreadable("no certificate in it".into()));
    }
    Ok(roots)
}

/// The rustls client configuration for `tls` (its mode is not `disable`).
pub(crate) fn client_config(tls: &Tls) -> Result<rustls::ClientConfig, WarehouseError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| WarehouseError::Connect(format!("TLS: {e}")))?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(tls)?), provider())
        .build()
        .map_err(|e| WarehouseError::Connect(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        TlsMode::VerifyFull => webpki,
        TlsMode::VerifyCa => Arc::new(Relaxed {
            webpki,
            chain: true,
        }),
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => Arc::new(Relaxed {
            webpki,
            chain: false,
        }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// mysql_async's TLS options for `tls`; `None` connects without TLS (`disable`, and `prefer`:
/// the driver cannot fall back). `verify-ca` is refused: mysql_async's way of skipping only the
/// name check no longer recognises rustls' error, so it would check the name all the same.
pub(crate) fn mysql_ssl_opts(tls: &Tls) -> Result<Option<mysql_async::SslOpts>, WarehouseError> {
    let opts = mysql_async::SslOpts::default();
    let opts = match tls.mode {
        TlsMode::Disable | TlsMode::Prefer => return Ok(None),
        TlsMode::Require => opts
            .with_danger_accept_invalid_certs(true)
            .with_danger_skip_domain_validation(true),
        TlsMode::VerifyCa => {
            return Err(WarehouseError::BadUrl(
                "sslmode=verify-ca (or require with sslrootcert) is not available for MySQL: \
                 say sslmode=verify-full with sslrootcert, which checks the server's name too"
                    .into(),
            ));
        }
        TlsMode::VerifyFull => opts,
    };
    Ok(Some(match &tls.root_cert {
        Some(path) => opts
            .with_root_certs(vec![path.clone().into()])
            .with_disable_built_in_roots(true),
        None => opts,
    }))
}

/// What `require` and `verify-ca` check of a certificate, where `verify-full` checks all:
/// `require` (as libpq) nothing, so the connection is encrypted and the server not
/// authenticated; `verify-ca` the chain, not the name. The handshake's signatures are checked
/// in both, so the session is with whoever holds the certificate's key.
#[derive(Debug)]
struct Relaxed {
    webpki: Arc<WebPkiServerVerifier>,
    /// The chain is checked (`verify-ca`).
    chain: bool,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if !self.chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Against a PostgreSQL and a MariaDB that take TLS connections only, with a certificate for
/// 127.0.0.1 and localhost (not 127.0.0.2, the same server) signed by a CA made for the test
/// (scripts/services.sh).
#[cfg(test)]
mod tests {
    use loopsync_testkit::service;

    use crate::mysql::MySqlSource;
    use crate::postgres::{open, server};

    /// The CA that signed the servers' certificate, or one that did not.
    fn ca(right: bool) -> String {
        let var = if right {
            "LOOPSYNC_TEST_TLS_CA"
        } else {
            "LOOPSYNC_TEST_TLS_WRONG_CA"
        };
        service(var).unwrap_or_default()
    }

    /// What connecting to `host` with `params` says: `Ok` (PostgreSQL: the session is
    /// encrypted, read from `pg_stat_ssl`), or the error.
    async fn connect(postgres: bool, url: &str, host: &str, params: &str) -> Result<(), String> {
        let url = format!("{}?{params}", url.replace("127.0.0.1", host));
        if !postgres {
            return MySqlSource::connect(&url)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
        }
        let client = open(&server(&url).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("read pg_stat_ssl");
        assert!(row.get::<_, bool>(0), "{url}: the session is not encrypted");
        Ok(())
    }

    /// Each case: host, parameters, and `None` to connect or the words of the refusal.
    async fn check(postgres: bool, var: &str, cases: &[(&str, String, Option<&str>)]) {
        let Some(url) = service(var) else { return };
        for (host, params, refusal) in cases {
            let result = connect(postgres, &url, host, params).await;
            match (refusal, result) {
                (None, Ok(())) => {}
                (Some(said), Err(error)) if error.contains(said) => {}
                (expected, got) => panic!("{host} {params}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    fn verify(mode: &str, right_ca: bool) -> String {
        format!("sslmode={mode}&sslrootcert={}", ca(right_ca))
    }

    #[tokio::test]
    async fn postgres_over_tls_as_sslmode_says() {
        check(
            true,
            "LOOPSYNC_TEST_PG_TLS_URL",
            &[
                ("127.0.0.1", verify("verify-full", true), None),
                // Without sslmode, on loopback: TLS when the server offers it.
                ("127.0.0.1", String::new(), None),
                // require: encrypted, the certificate not checked.
                ("127.0.0.1", "sslmode=require".into(), None),
                (
                    "127.0.0.1",
                    verify("verify-full", false),
                    Some("UnknownIssuer"),
                ),
                (
                    "127.0.0.2",
                    verify("verify-full", true),
                    Some("not valid for name"),
                ),
                ("127.0.0.2", verify("verify-ca", true), None),
                ("127.0.0.1", "sslmode=disable".into(), Some("no encryption")),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn mysql_over_tls_as_sslmode_says() {
        check(
            false,
            "LOOPSYNC_TEST_MYSQL_TLS_URL",
            &[
                ("127.0.0.1", verify("verify-full", true), None),
                ("127.0.0.1", "sslmode=require".into(), None),
                (
                    "127.0.0.1",
                    verify("verify-full", false),
                    Some("UnknownIssuer"),
                ),
                (
                    "127.0.0.2",
                    verify("verify-full", true),
                    Some("not valid for name"),
                ),
                (
                    "127.0.0.2",
                    verify("verify-ca", true),
                    Some("not available for MySQL"),
                ),
                // The server requires TLS of this user; loopback without sslmode connects without.
                ("127.0.0.1", String::new(), Some("Access denied")),
            ],
        )
        .await;
    }
}
