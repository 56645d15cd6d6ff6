//! Prometheus metrics of the data plane. Labels are low-cardinality only:
//! endpoint, configured model, status and the rule that decided, never the
//! agent (fleets run thousands).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub added_latency: HistogramVec,
    pub duration: HistogramVec,
    pub spent_micro: IntCounterVec,
    /// Provider-reported usage beyond reservations: never charged, so it
    /// is counted here (and in the ledger) instead.
    pub overrun_micro: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub open_reservations: IntGauge,
    /// path = local (from a grant) | central (an Admit round trip).
    pub admissions: IntCounterVec,
    /// event = installed | refused | returned | revoked (docs/GRANTS.md).
    pub grants: IntCounterVec,
    /// Every RPC to the control plane (watch streams counted once).
    pub control_rpcs: IntCounter,
    pub report_items: Histogram,
    /// From the oldest item of a report being queued to its answer.
    pub report_lag: Histogram,
    /// Calls and settlements queued for the control plane and not yet
    /// acknowledged (`control/report.rs`, [`crate::control::MAX_BACKLOG`]).
    pub report_backlog: IntGauge,
    /// Calls that could have been admitted from a grant and went to the
    /// control plane because the report backlog was full.
    pub held_back: IntCounter,
    /// Client connections by what became of them (`connections.rs`):
    /// served, refused (503), silent (closed before their first byte).
    pub connections: IntCounterVec,
}

/// Sub-millisecond buckets: AEX's own overhead is measured in µs.
const ADDED_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("aex_requests_total", "Requests by endpoint, model, status and the rule that decided (ok, upstream, or x-aex-denied-by)"),
            &["endpoint", "model", "status", "reason"],
        )
        .expect("valid metric");
        let added_latency = HistogramVec::new(
            HistogramOpts::new("aex_added_latency_seconds", "Time spent in AEX itself: parsing, admission, connecting, relaying; not the provider's time")
                .buckets(ADDED_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "aex_request_duration_seconds",
                "Total time from request to the end of the response",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        let spent_micro = IntCounterVec::new(
            Opts::new(
                "aex_spent_micro_total",
                "Micro-USD charged for calls through this data plane",
            ),
            &["model"],
        )
        .expect("valid metric");
        let overrun_micro = IntCounterVec::new(
            Opts::new(
                "aex_overrun_micro_total",
                "Micro-USD of provider-reported usage beyond the reservation (not charged; recorded apart)",
            ),
            &["model"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "aex_upstream_errors_total",
                "Provider failures: rate_limited, error, timeout",
            ),
            &["provider", "kind"],
        )
        .expect("valid metric");
        let open_reservations = IntGauge::new(
            "aex_open_reservations",
            "Calls admitted and not yet settled",
        )
        .expect("valid metric");
        let admissions = IntCounterVec::new(
            Opts::new(
                "aex_dataplane_admissions_total",
                "Calls admitted, by where: local (from a grant) or central (one Admit round trip)",
            ),
            &["path"],
        )
        .expect("valid metric");
        let grants = IntCounterVec::new(
            Opts::new(
                "aex_dataplane_grants_total",
                "Grants installed, refused, returned and revoked",
            ),
            &["event"],
        )
        .expect("valid metric");
        let control_rpcs = IntCounter::new(
            "aex_dataplane_control_rpcs_total",
            "RPCs sent to the control plane",
        )
        .expect("valid metric");
        let report_items = Histogram::with_opts(
            HistogramOpts::new(
                "aex_dataplane_report_items",
                "Calls, settlements, closes and asks per report",
            )
            .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )
        .expect("valid metric");
        let report_lag = Histogram::with_opts(
            HistogramOpts::new(
                "aex_dataplane_report_lag_seconds",
                "From the oldest item of a report being queued to the control plane's answer",
            )
            .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0]),
        )
        .expect("valid metric");
        let report_backlog = IntGauge::new(
            "aex_dataplane_report_backlog",
            "Calls and settlements admitted from grants, queued for the control plane and not yet acknowledged",
        )
        .expect("valid metric");
        let held_back = IntCounter::new(
            "aex_dataplane_held_back_total",
            "Calls sent to the control plane instead of a grant because the report backlog was full (the ledger could not keep up)",
        )
        .expect("valid metric");
        let connections = IntCounterVec::new(
            Opts::new(
                "aex_dataplane_connections_total",
                "Client connections: served, refused (503 past --max-connections or an address's share), silent (no byte within 5 s, closed)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections.clone()),
            Box::new(report_backlog.clone()),
            Box::new(held_back.clone()),
            Box::new(admissions.clone()),
            Box::new(grants.clone()),
            Box::new(control_rpcs.clone()),
            Box::new(report_items.clone()),
            Box::new(report_lag.clone()),
            Box::new(added_latency.clone()),
            Box::new(duration.clone()),
            Box::new(spent_micro.clone()),
            Box::new(overrun_micro.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(open_reservations.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            requests,
            added_latency,
            duration,
            spent_micro,
            overrun_micro,
            upstream_errors,
            open_reservations,
            admissions,
            grants,
            control_rpcs,
            report_items,
            report_lag,
            report_backlog,
            held_back,
            connections,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        aex_telemetry::metrics::render_text(&self.registry)
    }
}
