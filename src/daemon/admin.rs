//! The admin HTTP listener (`admin.listen`): `/metrics` (Prometheus), `/healthz` (the
//! process answers) and `/ready` (device, routes and sockets up, workers running).
//! Plain HTTP/1.1 for scrapers on the node; it is off unless configured.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::control::Control;
use crate::ops::metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Binds `listen` and serves it until the daemon ends.
pub(super) async fn start(listen: SocketAddr, control: Control) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin listener {listen} (admin.listen)"))?;
    if !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "the admin listener is reachable from other hosts; it names identities and peers"
        );
    }
    tracing::info!(listen = %listener.local_addr()?, "admin listener: /metrics /healthz /ready");
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let control = control.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, control.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn answer(
    request: Request<Incoming>,
    control: Control,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n"));
    }
    // Prometheus asks for OpenMetrics; anything else gets the older text format.
    let openmetrics = request
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    Ok(match request.uri().path() {
        "/metrics" => match control.snapshot(false).await {
            Some(snapshot) if openmetrics => reply(
                StatusCode::OK,
                OPENMETRICS,
                metrics::encode(snapshot.status),
            ),
            Some(snapshot) => reply(
                StatusCode::OK,
                PROMETHEUS_TEXT,
                metrics::encode_prometheus_text(snapshot.status),
            ),
            None => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "stopping\n"),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/ready" if control.is_ready() => reply(StatusCode::OK, TEXT, "ready\n"),
        "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /metrics, /healthz, /ready\n",
        ),
    })
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}
