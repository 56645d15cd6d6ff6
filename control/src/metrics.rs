//! Prometheus metrics of the control plane, served on their own HTTP port
//! (`--metrics-listen`). Low-cardinality labels only: decisions by rule,
//! settlements by outcome; never the agent.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
    /// event = issued | renewed | returned | expired | revoked |
    /// refused_<why> (docs/GRANTS.md).
    pub grants: IntCounterVec,
    /// Items per `Report` from data planes.
    pub report_items: Histogram,
    /// Agents paused by AEX itself, by reason (`overruns`).
    pub agents_stopped: IntCounterVec,
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
        let grants = IntCounterVec::new(
            Opts::new("aex_grants_total", "Grants by what happened to them"),
            &["event"],
        )
        .expect("valid metric");
        let report_items = Histogram::with_opts(
            HistogramOpts::new(
                "aex_report_items",
                "Calls and settlements per data-plane report",
            )
            .buckets(vec![0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )
        .expect("valid metric");
        let agents_stopped = IntCounterVec::new(
            Opts::new(
                "aex_agents_stopped_total",
                "Agents AEX paused itself, by reason (overruns: provider-reported usage past the allowance)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [
            Box::new(admissions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(agents_stopped.clone()),
            Box::new(admit_seconds.clone()),
            Box::new(settlements.clone()),
            Box::new(charged_micro.clone()),
            Box::new(expired.clone()),
            Box::new(open_reservations.clone()),
            Box::new(agents.clone()),
            Box::new(grants.clone()),
            Box::new(report_items.clone()),
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
            grants,
            report_items,
            agents_stopped,
        }
    }
}

impl ControlMetrics {
    pub fn render(&self) -> Vec<u8> {
        aex_telemetry::metrics::render_text(&self.registry)
    }
}
