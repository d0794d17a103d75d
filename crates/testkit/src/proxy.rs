//! A TCP proxy a test puts between loopsync and a service (PostgreSQL), to cut it off: an
//! outage closes every proxied connection, then accepts new ones and forwards nothing (a
//! blackhole, as a dead network path or a hung load balancer behaves) until it ends; at its end
//! the blackholed connections are closed and service resumes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A proxy on a free loopback port; stops (closing every connection) on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    down: AtomicBool,
    /// Every connection's task: aborting one closes both its sockets.
    connections: Mutex<JoinSet<()>>,
}

impl TcpProxy {
    /// Forwards `127.0.0.1:PORT` to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            down: AtomicBool::new(false),
            connections: Mutex::new(JoinSet::new()),
        });
        let upstream = upstream.to_owned();
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let down = shared.down.load(Ordering::SeqCst);
                    let upstream = upstream.clone();
                    let mut connections = shared.connections.lock().expect("connections");
                    while connections.try_join_next().is_some() {}
                    connections.spawn(async move {
                        if down {
                            // Accepted, and nothing forwarded either way until aborted.
                            std::future::pending::<()>().await;
                        }
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        TcpProxy {
            addr,
            shared,
            accept,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection closed; new ones blackholed until [`TcpProxy::end_outage`].
    pub fn start_outage(&self) {
        self.shared.down.store(true, Ordering::SeqCst);
        self.close_all();
    }

    /// The blackholed connections closed; new ones forwarded again.
    pub fn end_outage(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
        self.close_all();
    }

    fn close_all(&self) {
        self.shared
            .connections
            .lock()
            .expect("connections")
            .abort_all();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.close_all();
    }
}

/// `url` (`postgres://user@host:port/db`) with its `host:port` replaced by `addr`; and the
/// `host:port` it had.
pub fn through(url: &str, addr: SocketAddr) -> (String, String) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("//").unwrap_or(0) + 2, |i| i + 1);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let upstream = url[start..end].to_owned();
    (format!("{}{addr}{}", &url[..start], &url[end..]), upstream)
}
