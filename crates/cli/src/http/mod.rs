//! `run --http-addr HOST:PORT`: the status page, served while `run` runs. Server-rendered HTML
//! with SVG charts, no script; read from the state only, never from Loops.
//!
//! It shows personal data (keys, emails, values) on its record pages, so: it listens on
//! loopback unless `--http-allow-remote` says otherwise (and then only with a token); on
//! loopback it answers only requests that name a loopback host (a web page elsewhere cannot
//! reach it through a DNS name that resolves to 127.0.0.1); records are shown only with the
//! token of `--http-token-file` ([`auth`]); every answer forbids framing, scripts, and (pages)
//! caching. As the metrics listener does, a connection whose request headers take over
//! [`loopsync_core::tuning::HEADER_READ_TIMEOUT`] is closed.

mod auth;
mod charts;
mod html;
mod pages;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, HOST, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use loopsync_config::SyncConfig;
use loopsync_engine::state::Warehouse;
use tokio::net::TcpListener;

pub use auth::Auth;

use crate::common::UsageError;

/// The status page's flags, on `loopsync run`.
#[derive(Debug, Clone, Default, Args)]
pub struct HttpArgs {
    /// Serve the status page at http://HOST:PORT/ while this runs: every sync's status and run
    /// history (docs/operations.md, The status page). Loopback only, unless
    /// --http-allow-remote. Port 0 takes a free port; the address is said on stderr.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_addr: Option<SocketAddr>,
    /// A file holding the token (16 characters or more; only loopsync's user may read it)
    /// that the status page asks for before it shows any record.
    #[arg(long, value_name = "FILE", requires = "http_addr")]
    pub http_token_file: Option<PathBuf>,
    /// Let --http-addr be an address other machines reach (0.0.0.0, a LAN address). Needs
    /// --http-token-file; the page speaks plain HTTP: put TLS in front of it.
    #[arg(long, requires = "http_addr")]
    pub http_allow_remote: bool,
}

/// What the pages read, and who may see records.
pub struct App {
    pub warehouse: Arc<dyn Warehouse>,
    pub syncs: Vec<SyncConfig>,
    pub auth: Auth,
    /// Listening on loopback: a request must name a loopback host.
    pub loopback: bool,
}

/// The status page's listener, bound, waiting for the warehouse to serve from.
pub struct Listener {
    listener: TcpListener,
    auth: Auth,
    loopback: bool,
}

impl HttpArgs {
    /// Checks the flags, reads the token and binds the address (so that a mistake stops `run`
    /// before it starts anything); says the address on stderr. `None` without --http-addr.
    pub fn bind(&self) -> anyhow::Result<Option<Listener>> {
        let Some(addr) = self.http_addr else {
            return Ok(None);
        };
        let loopback = addr.ip().is_loopback();
        if !loopback && !self.http_allow_remote {
            return Err(UsageError(format!(
                "--http-addr {addr} is not a loopback address: the status page shows personal \
                 data, so it listens on 127.0.0.1 or [::1] unless --http-allow-remote (with \
                 --http-token-file) says otherwise"
            ))
            .into());
        }
        if !loopback && self.http_token_file.is_none() {
            return Err(UsageError(format!(
                "--http-addr {addr} with --http-allow-remote needs --http-token-file: the page \
                 shows no record to anyone without the token"
            ))
            .into());
        }
        let auth = match &self.http_token_file {
            Some(path) => Auth::from_file(path)?,
            None => Auth::none(),
        };
        let usage = |e: std::io::Error| UsageError(format!("--http-addr {addr}: {e}"));
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(usage)?;
        let bound = listener.local_addr().map_err(usage)?;
        eprintln!("status page at http://{bound}/");
        Ok(Some(Listener {
            listener,
            auth,
            loopback,
        }))
    }
}

impl Listener {
    /// Serves the status page from now on (a task of its own), reading `warehouse`.
    pub fn serve(self, warehouse: Arc<dyn Warehouse>, syncs: Vec<SyncConfig>) {
        let app = Arc::new(App {
            warehouse,
            syncs,
            auth: self.auth,
            loopback: self.loopback,
        });
        tokio::spawn(serve(
            self.listener,
            router(app),
            loopsync_core::tuning::HEADER_READ_TIMEOUT,
        ));
    }
}

/// Every page, behind [`guard`].
fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/", get(pages::index))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/sync/{sync}/rejections", get(pages::rejections))
        .route("/record", get(pages::lookup))
        .route("/record/{sync}/{key}", get(pages::record))
        .route("/style.css", get(pages::style))
        .route("/health", get(|| async { "OK" }))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// What every answer says to the browser: no script, no framing, no referrer; pages are not
/// kept (they may hold records).
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Refuses a request to a loopback listener that names another host (DNS rebinding), and sets
/// the security headers on every answer.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let is_style = request.uri().path() == "/style.css";
    let mut response = if app.loopback
        && !request
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(names_loopback)
    {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this page answers only at a loopback address (127.0.0.1, [::1], localhost)\n",
        )
            .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static(if is_style { "max-age=300" } else { "no-store" }),
    );
    response
}

/// Whether a `Host` header names this machine: `localhost`, a loopback address, with or
/// without a port.
fn names_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Answers every connection on `listener`, closing those whose request headers take over
/// `header_read_timeout`.
async fn serve(listener: TcpListener, router: axum::Router, header_read_timeout: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "status page: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "status page: connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests;
