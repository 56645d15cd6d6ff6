//! AEX data plane: the OpenAI-compatible gateway agents talk to. Every
//! ledger decision is the control plane's: this process parses, admits
//! (by asking, or from a grant it holds: docs/GRANTS.md), forwards, meters,
//! settles and reports. What it holds — the watched policy and models, its
//! grants, calls not yet reported — is rebuilt from the control plane at
//! start. Runs fine as a sidecar.

pub mod alias;
pub mod anthropic;
pub mod api;
pub mod blocks;
pub mod connections;
pub mod control;
pub mod generated;
pub mod http;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod request;
pub mod simulated;
pub mod sse;
pub mod tokens;
pub mod translate;

use pingora_core::apps::ServerApp;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits (up to `drain`) for calls in flight and their settlements. At most
/// `max_connections` are served at once, counted from a connection's first
/// byte (`connections.rs`); the next ones get a 503.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<http::Gateway>,
    control: Arc<control::ControlPlane>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let book = connections::ConnectionBook::new(max_connections);
    let counted = gateway.metrics().connections.clone();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let Some(waiting) = book.wait() else {
                    // More sockets waiting than the book allows: answered
                    // now, without a task, whatever it sent.
                    counted.with_label_values(&["refused"]).inc();
                    refuse_now(&tcp);
                    continue;
                };
                let (gateway, stop, book, counted) =
                    (gateway.clone(), stop_rx.clone(), book.clone(), counted.clone());
                tokio::spawn(async move {
                    if !first_byte(&tcp, connections::FIRST_BYTE).await {
                        counted.with_label_values(&["silent"]).inc();
                        return;
                    }
                    let served = match book.serve(peer.ip()) {
                        Ok(served) => served,
                        Err(_) => {
                            counted.with_label_values(&["refused"]).inc();
                            refuse_busy(tcp).await;
                            return;
                        }
                    };
                    drop(waiting);
                    counted.with_label_values(&["served"]).inc();
                    let stream: pingora_core::protocols::Stream =
                        Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
                    gateway.process_new(stream, &stop).await;
                    drop(served);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Calls still running were admitted already; nothing more is admitted
    // from the grants, and what they did not use goes back.
    control.return_grants();
    let in_flight = control.inflight.current();
    if in_flight > 0 {
        tracing::info!(in_flight, "draining");
    }
    if !control.inflight.drained(drain).await {
        tracing::warn!(
            left = control.inflight.current(),
            "drain deadline passed; stopping anyway"
        );
    }
}

/// Whether the client sent a byte within `wait` (not just closed).
async fn first_byte(tcp: &tokio::net::TcpStream, wait: Duration) -> bool {
    let mut one = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, tcp.peek(&mut one)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// The 503 for a connection past the limit, built once: it is sent most
/// when AEX is flooded.
fn busy_response() -> &'static [u8] {
    static BUSY: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let body = http::GatewayError::overloaded().body();
        let mut out = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    });
    &BUSY
}

/// A 503 for a connection past `--max-connections`, then a graceful close
/// (reading what the client sent, so it sees the answer, not a reset).
/// Its request has begun to arrive: it waited for its first byte.
async fn refuse_busy(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.write_all(busy_response()).await;
    let _ = tcp.shutdown().await;
    let mut scratch = [0u8; 4096];
    let drain = async { while matches!(tcp.read(&mut scratch).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The 503 written without waiting (a fresh socket's send buffer takes
/// it whole), for when even waiting connections are at their bound.
fn refuse_now(tcp: &tokio::net::TcpStream) {
    let _ = tcp.try_write(busy_response());
}
