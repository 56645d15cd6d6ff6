//! One trace, client → data plane → control plane → provider, exported over
//! OTLP to a receiver built from the OpenTelemetry protos in this process.

use aex_tests::Stack;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn one_trace_spans_client_data_plane_control_plane_and_provider() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let stack = Stack::start_env(&[], &[], &env).await;
    let token = stack.agent("traced", "1", "60", &[]);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let r = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let find = |spans: &[Received], service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name && s.trace_id == trace_id)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (request, admit, rpc, upstream, settle_rpc) = loop {
        let spans = receiver.0.lock().unwrap().clone();
        let found = (
            find(&spans, "aex-dataplane", "POST /v1/chat/completions"),
            find(&spans, "aex-dataplane", "aex.admit"),
            find(&spans, "aex-control", "/aex.v1.AdmissionService/Admit"),
            find(&spans, "aex-dataplane", "aex.upstream"),
            find(
                &spans,
                "aex-control",
                "/aex.v1.AdmissionService/SettleBatch",
            ),
        );
        if let (Some(a), Some(b), Some(c), Some(d), Some(e)) = found {
            break (a, b, c, d, e);
        }
        assert!(Instant::now() < deadline, "spans never arrived: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The data plane's request span continues the client's trace...
    assert_eq!(request.parent_span_id, client_span);
    assert_eq!(admit.parent_span_id, request.span_id);
    // ...and is the ancestor of the control plane's spans, across gRPC.
    assert_eq!(rpc.parent_span_id, admit.span_id);
    assert_eq!(upstream.parent_span_id, request.span_id);
    // A lone settlement is sent in its request's trace.
    let settle = find(&receiver.0.lock().unwrap(), "aex-dataplane", "aex.settle").unwrap();
    assert_eq!(settle.parent_span_id, request.span_id);
    assert_eq!(settle_rpc.parent_span_id, settle.span_id);
    // The provider got the same trace, as a child of the upstream span.
    let seen = &stack.mock.requests()[0];
    let traceparent = seen
        .header("traceparent")
        .expect("traceparent sent upstream");
    assert_eq!(
        traceparent,
        format!("00-{trace_id}-{}-01", upstream.span_id)
    );
    server.abort();
}
