//! `--metrics-addr`: Prometheus metrics over HTTP/1.1. Served here with hyper, not by the
//! exporter's own listener, so that a connection gets a header read timeout: a client that
//! sends half a request and waits is closed after
//! [`loopsync_core::tuning::HEADER_READ_TIMEOUT`], instead of holding a task for ever.
//!
//! As the exporter's listener did: `/health` answers `OK`, every other path the metrics
//! (`text/plain`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::common::UsageError;

/// How often histograms are drained into their buckets (the exporter's own default).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Serves Prometheus metrics at `http://{addr}/metrics` from now on (every series of
/// docs/operations.md, Metrics). A port that cannot be bound is a usage error.
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    // Histograms with buckets (not summaries), so that several processes' can be added up.
    const SECONDS: &[f64] = &[
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ];
    let usage = |e: &dyn std::fmt::Display| UsageError(format!("--metrics-addr {addr}: {e}"));
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| usage(&e))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .map_err(|e| usage(&e))?
        .install_recorder()
        .map_err(|e| usage(&e))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(
        listener,
        handle,
        loopsync_core::tuning::HEADER_READ_TIMEOUT,
    ));
    crate::logs::info(&format!("metrics at http://{addr}/metrics"));
    Ok(())
}

/// Answers every connection on `listener` with `handle`'s metrics, closing those whose
/// request headers take over `header_read_timeout`.
async fn serve(listener: TcpListener, handle: PrometheusHandle, header_read_timeout: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            answer(handle.clone(), request)
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics: connection ended with an error");
            }
        });
    }
}

async fn answer(
    handle: PrometheusHandle,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.uri().path() {
        "/health" => "OK".to_owned(),
        // Rendering takes a lock and formats every series: off the async workers.
        _ => tokio::task::spawn_blocking(move || handle.render())
            .await
            .unwrap_or_default(),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A recorder of its own (not installed: tests share the process), served on loopback.
    async fn start(
        timeout: Duration,
    ) -> (SocketAddr, metrics_exporter_prometheus::PrometheusRecorder) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, recorder.handle(), timeout));
        (addr, recorder)
    }

    /// What one request on a fresh connection is answered.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// The endpoint answers as the exporter's listener did: the metrics as text, and `OK` at
    /// `/health`.
    #[tokio::test]
    async fn metrics_and_health() {
        let (addr, recorder) = start(Duration::from_secs(10)).await;
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("loopsync_test_total").increment(3);
        });
        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("content-type: text/plain"), "{answer}");
        assert!(answer.contains("loopsync_test_total 3"), "{answer}");
        let health = get(addr, "/health").await;
        assert!(
            health.starts_with("HTTP/1.1 200 OK") && health.ends_with("OK"),
            "{health}"
        );
    }

    /// A client that sends half a request line and waits has its connection closed once the
    /// header read timeout passes (not before); meanwhile others are answered.
    #[tokio::test]
    async fn half_a_request_is_closed_after_the_header_timeout() {
        let timeout = Duration::from_millis(300);
        let (addr, _recorder) = start(timeout).await;
        let started = std::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        assert!(
            get(addr, "/health").await.ends_with("OK"),
            "others are answered"
        );
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the connection is closed within the timeout")
            .ok();
        assert!(rest.is_empty(), "closed without an answer: {rest:?}");
        assert!(started.elapsed() >= timeout, "not before the timeout");
    }
}
