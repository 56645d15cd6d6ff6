//! Logging and tracing for both daemons: logs to stderr (`AEX_LOG` filter),
//! and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP
//! with W3C trace context propagated across processes.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; `shutdown` flushes spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("could not flush traces: {e}");
        }
    }
}

/// Must run inside the tokio runtime (the OTLP exporter's channel lives on it).
pub fn init(service: &'static str) -> Telemetry {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("AEX_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    if endpoint.trim().is_empty() {
        tracing_subscriber::registry().with(filter).with(fmt).init();
        return Telemetry { provider: None };
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing_subscriber::registry().with(filter).with(fmt).init();
            tracing::error!(error = %e, %endpoint, "OTLP export disabled: cannot build the exporter");
            return Telemetry { provider: None };
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Telemetry {
        provider: Some(provider),
    }
}

/// Resolves on SIGTERM or Ctrl-C: both daemons stop gracefully on either.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Reads W3C trace context from HTTP headers or gRPC metadata.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

struct Collect(Vec<(String, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

/// The current span's trace context as headers (`traceparent`, …); empty
/// when tracing is off.
pub fn current_context_headers() -> Vec<(String, String)> {
    let cx = tracing::Span::current().context();
    let mut out = Collect(Vec::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut out));
    out.0
}
