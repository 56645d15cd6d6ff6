//! What both daemons share at their edges: logging and tracing set up once
//! (stderr logs, OTLP spans, W3C trace context across processes), and the
//! Prometheus text endpoint. A crate of its own rather than a feature of
//! `aex-core`, so that the core stays pure whatever features a build
//! unifies, and `aexctl` (which needs neither) never compiles the
//! OpenTelemetry or hyper server stacks.

pub mod metrics;
mod tracing_setup;

pub use tracing_setup::{
    HeaderExtractor, Telemetry, current_context_headers, init, set_parent_from, shutdown_signal,
};
