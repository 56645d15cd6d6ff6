//! AEX data plane: the OpenAI-compatible gateway agents talk to. Stateless:
//! every policy and ledger decision is the control plane's; this process
//! parses, asks, forwards, meters and settles. Runs fine as a sidecar.

pub mod control;
pub mod generated;
pub mod http;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod simulated;
pub mod sse;

use pingora_core::apps::ServerApp;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits (up to `drain`) for calls in flight and their settlements. At most
/// `max_connections` are served at once; the next ones get a 503.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<http::Gateway>,
    control: Arc<control::ControlPlane>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let served = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // Answering a refused connection costs a task too: bounded as well.
    let refusing = Arc::new(tokio::sync::Semaphore::new(256));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of descriptors, say: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let Ok(permit) = served.clone().try_acquire_owned() else {
                    if let Ok(permit) = refusing.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            let _permit = permit;
                            refuse_busy(tcp).await;
                        });
                    }
                    continue;
                };
                let gateway = gateway.clone();
                let stop = stop_rx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream: pingora_core::protocols::Stream =
                        Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
                    gateway.process_new(stream, &stop).await;
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

/// A 503 for a connection past `--max-connections`, then a graceful close
/// (reading what the client sent, so it sees the answer, not a reset).
async fn refuse_busy(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = http::GatewayError::overloaded().body();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut scratch = [0u8; 4096];
    // The request head usually arrives at once; do not wait long for it.
    let _ = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut scratch)).await;
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(&body).await;
    let _ = tcp.shutdown().await;
    let drain = async { while matches!(tcp.read(&mut scratch).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
