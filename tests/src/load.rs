//! Load for the grants tests: calls whose charge is exactly their
//! reservation, sent over several data planes at a bounded concurrency.

use crate::DataPlane;
use serde_json::{Value, json};
use std::sync::Arc;

/// A call whose charge is exactly its reservation: the mock reports the
/// input bound and the cap as usage, so no settlement gives anything back
/// and how many calls fit a budget does not depend on timing.
pub struct CostlyCall {
    pub body: Value,
    /// The `x-mock-usage` header that makes the mock report it.
    pub usage: String,
    pub cost_micro: i64,
}

impl CostlyCall {
    /// A chat call to the test kit's `mock-model` (1 µ per input token,
    /// 2 µ per output token) capped at 10 output tokens.
    pub fn new() -> Self {
        let body = json!({
            "model": "mock-model",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 10,
        });
        let input = serde_json::to_vec(&body).expect("JSON").len() as i64;
        Self {
            body,
            usage: format!("{input},10"),
            cost_micro: input + 10 * 2,
        }
    }

    /// A budget in USD, as `aexctl` takes it, for exactly `calls` of these.
    pub fn budget_for(&self, calls: i64) -> String {
        format!("{:.6}", (calls * self.cost_micro) as f64 / 1e6)
    }
}

impl Default for CostlyCall {
    fn default() -> Self {
        Self::new()
    }
}

/// `calls` requests, `at_once` at a time, spread over `planes` in turn;
/// the statuses in the order sent.
pub async fn run_calls_on(
    planes: &[&DataPlane],
    token: &str,
    call: &CostlyCall,
    calls: usize,
    at_once: usize,
) -> Vec<u16> {
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..calls {
        let permit = gate.clone().acquire_owned().await.expect("open gate");
        let request = client
            .post(planes[i % planes.len()].url("/v1/chat/completions"))
            .bearer_auth(token)
            .header("x-mock-usage", &call.usage)
            .json(&call.body);
        tasks.push(tokio::spawn(async move {
            let status = request.send().await.expect("request").status().as_u16();
            drop(permit);
            status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("request task"));
    }
    statuses
}

pub fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// The sum of `aex_dataplane_admissions_total{path="local"}` over `planes`.
pub async fn local_admissions(planes: &[&DataPlane]) -> f64 {
    let mut total = 0.0;
    for p in planes {
        let text = reqwest::get(p.metrics_url())
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        total += crate::prometheus_value(
            &text,
            "aex_dataplane_admissions_total",
            &[("path", "local")],
        );
    }
    total
}
