//! Prometheus metrics of the control plane, served on their own HTTP port
//! (`--metrics-listen`). Low-cardinality labels only: decisions by rule,
//! settlements by outcome; never the agent.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct ControlMetrics {
    registry: Registry,
    /// decision = admitted | denied; reason = the rule (empty when admitted).
    pub admissions: IntCounterVec,
    pub admit_seconds: Histogram,
    pub settlements: IntCounterVec,
    pub charged_micro: IntCounter,
    pub expired: IntCounter,
    pub open_reservations: IntGauge,
    pub agents: IntGauge,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let admissions = IntCounterVec::new(
            Opts::new(
                "aex_admissions_total",
                "Admission decisions by outcome and rule",
            ),
            &["decision", "reason"],
        )
        .expect("valid metric");
        let admit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aex_admit_duration_seconds",
                "Time to decide and durably reserve",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1,
            ]),
        )
        .expect("valid metric");
        let settlements = IntCounterVec::new(
            Opts::new("aex_settlements_total", "Settlements by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let charged_micro =
            IntCounter::new("aex_charged_micro_total", "Micro-USD charged to agents")
                .expect("valid metric");
        let expired = IntCounter::new(
            "aex_expired_reservations_total",
            "Reservations settled by the expiry sweeper",
        )
        .expect("valid metric");
        let open_reservations =
            IntGauge::new("aex_open_reservations", "Reservations not yet settled")
                .expect("valid metric");
        let agents = IntGauge::new("aex_agents", "Live agents").expect("valid metric");
        for c in [
            Box::new(admissions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(admit_seconds.clone()),
            Box::new(settlements.clone()),
            Box::new(charged_micro.clone()),
            Box::new(expired.clone()),
            Box::new(open_reservations.clone()),
            Box::new(agents.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            admissions,
            admit_seconds,
            settlements,
            charged_micro,
            expired,
            open_reservations,
            agents,
        }
    }
}

impl ControlMetrics {
    pub fn render(&self) -> Vec<u8> {
        render_text(&self.registry)
    }
}

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
