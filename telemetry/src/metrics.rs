//! Prometheus exposition for both daemons: a registry rendered as text,
//! and `GET /metrics` served on a listener of its own.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

/// A registry in Prometheus' text exposition format (both planes serve it).
pub fn render_text(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    out
}

/// Serves `GET /metrics` on its own listener (both planes: never on an API
/// port, where anyone who can call the API could read it) until the task is
/// dropped; `render` produces the exposition text for each scrape.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> Vec<u8> + Send + Sync>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    };
                    Ok::<_, Infallible>(response.expect("valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
