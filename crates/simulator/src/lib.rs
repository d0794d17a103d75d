//! A local Loops API that answers as `loops-api.md` says Loops does, with the decisions of its
//! §9 where Loops is silent (each a [`Settings`] field, so a test can run both ways).
//!
//! Beside the API it serves `/_sim/*`: every contact, every accepted event, every workflow
//! trigger that would have fired, request statistics, fault injection and reset.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let sim = loopsync_simulator::spawn(loopsync_simulator::SimConfig::default()).await?;
//! println!("Loops API at {}", sim.base_url());
//! # Ok(()) }
//! ```

mod bulk;
mod config;
mod faults;
mod http;
mod limiter;
mod model;
mod state;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tower::ServiceExt;

pub use bulk::{CSV_SOURCE, FailedRow, ImportReport};
pub use config::{
    DEFAULT_IDEMPOTENCY_TTL_SECONDS, EmailMatch, NumericDates, RateWindow, Settings, SettingsError,
    SimConfig, UnknownLists, UnknownProperties,
};
pub use faults::Faults;
pub use model::{MailingList, PropertyType};
pub use state::{EventRecord, Stats, WorkflowTrigger};

use http::{ConnectionDropper, Shared};

/// A running simulator. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API root to give a client: `http://127.0.0.1:PORT/api`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// `http://127.0.0.1:PORT`, under which `/_sim/*` lives.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What `/_sim/contacts` answers.
    pub fn contacts(&self) -> Value {
        self.shared.lock().contacts_json()
    }

    /// What `/_sim/events` answers.
    pub fn events(&self) -> Vec<EventRecord> {
        self.shared.lock().events.clone()
    }

    /// What `/_sim/workflows` answers.
    pub fn workflows(&self) -> Vec<WorkflowTrigger> {
        self.shared.lock().workflows.clone()
    }

    /// What `/_sim/stats` answers.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// As `POST /_sim/faults`.
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        self.shared.lock().dice = faults::FaultDice::new(faults);
        Ok(())
    }

    /// As `POST /_sim/settings`: replaces every setting, or changes nothing and says why.
    pub fn set_settings(&self, settings: Settings) -> Result<(), SettingsError> {
        self.shared.lock().set_settings(settings)
    }

    /// What `GET /_sim/settings` answers.
    pub fn settings(&self) -> Settings {
        self.shared.lock().settings.clone()
    }

    /// As `POST /_sim/reset`.
    pub fn reset(&self) {
        self.shared.lock().reset();
    }

    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn build(config: &SimConfig) -> (Arc<Shared>, Router) {
    let shared = Arc::new(Shared {
        state: Mutex::new(state::SimState::new(config)),
        api_keys: std::iter::once(&config.api_key)
            .chain(&config.other_api_keys)
            .cloned()
            .collect(),
        in_flight: Default::default(),
    });
    let app = http::router(shared.clone(), config.max_body_bytes);
    (shared, app)
}

/// Binds `config.bind` and serves in a background task.
pub async fn spawn(config: SimConfig) -> io::Result<SimHandle> {
    let listener = TcpListener::bind(config.bind).await?;
    let addr = listener.local_addr()?;
    let (shared, app) = build(&config);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(accept_loop(
        listener,
        app,
        config.header_read_timeout,
        async {
            let _ = rx.await;
        },
    ));
    Ok(SimHandle {
        addr,
        shared,
        shutdown: Some(tx),
        task,
    })
}

/// Serves on an already bound listener until `shutdown` completes (used by `loopsync sim`).
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (_, app) = build(&config);
    accept_loop(listener, app, config.header_read_timeout, shutdown).await;
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, app.clone(), header_read_timeout));
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// One HTTP/1.1 connection. A fault "dropped connection" notifies `dropper`, and the connection
/// is closed without an answer; so is one whose request headers take over
/// `header_read_timeout`.
async fn serve_connection(stream: TcpStream, app: Router, header_read_timeout: Duration) {
    let dropper = Arc::new(Notify::new());
    let signal = dropper.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request
            .extensions_mut()
            .insert(ConnectionDropper(signal.clone()));
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        () = dropper.notified() => {}
    }
}

#[cfg(test)]
mod tests;
