//! AEX data plane: the OpenAI-compatible gateway agents talk to. Stateless:
//! every policy and ledger decision is the control plane's; this process
//! parses, asks, forwards, meters and settles. Runs fine as a sidecar.

pub mod control;
pub mod metrics;
pub mod openai;
pub mod server;
pub mod simulated;
pub mod sse;

use pingora_core::apps::ServerApp;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits (up to `drain`) for calls in flight and their settlements.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<server::Gateway>,
    control: Arc<control::ControlPlane>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                let gateway = gateway.clone();
                let stop = stop_rx.clone();
                tokio::spawn(async move {
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
