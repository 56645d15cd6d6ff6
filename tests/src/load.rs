//! Load for the grants tests: calls whose charge is exactly their
//! reservation, sent over several data planes at a bounded concurrency.

use crate::DataPlane;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A metric of `plane`'s Prometheus endpoint, summed over the series
/// with `labels`.
pub async fn plane_metric(plane: &DataPlane, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(plane.metrics_url())
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    crate::prometheus_value(&text, metric, labels)
}

/// The sum of `aex_dataplane_admissions_total{path="local"}` over `planes`.
pub async fn local_admissions(planes: &[&DataPlane]) -> f64 {
    let mut total = 0.0;
    for p in planes {
        total += plane_metric(p, "aex_dataplane_admissions_total", &[("path", "local")]).await;
    }
    total
}

/// Whether `plane` holds a grant now (installed more than it returned).
pub async fn holds_grant(plane: &DataPlane) -> bool {
    let metric = "aex_dataplane_grants_total";
    let installed = plane_metric(plane, metric, &[("event", "installed")]).await;
    installed > plane_metric(plane, metric, &[("event", "returned")]).await
}

/// Waits (at most 30 s) until no data plane of `planes` has a report
/// waiting for the control plane: after an outage the returning control
/// plane may expire a grant, leaving the agent holding nothing, before the
/// queued reports arrive, so the ledger is counted only then.
pub async fn until_reports_drained(planes: &[&DataPlane]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for plane in planes {
        while plane_metric(plane, "aex_dataplane_report_backlog", &[]).await > 0.0 {
            assert!(Instant::now() < deadline, "a report backlog never drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `workers` clients on each of `planes` calling as `token` until `length`
/// has passed (see [`run_for`]): the request ids of the successes, and how
/// many calls were answered in all.
pub async fn run_on_every_plane_for(
    planes: &[&DataPlane],
    token: &str,
    workers: usize,
    length: Duration,
) -> (Vec<String>, usize) {
    let loads: Vec<_> = planes
        .iter()
        .map(|p| {
            let (url, token, call) = (
                p.url("/v1/chat/completions"),
                token.to_string(),
                CostlyCall::new(),
            );
            tokio::spawn(async move { run_for(&url, &token, &call, workers, length).await })
        })
        .collect();
    let (mut served, mut answered) = (Vec::new(), 0);
    for load in loads {
        for a in load.await.expect("load task") {
            answered += 1;
            if a.status == 200 {
                served.push(a.request_id.expect("a success names its request"));
            }
        }
    }
    (served, answered)
}

/// Keeps the agent busy on every plane until each holds a grant (at most
/// `within`); returns how many calls succeeded meanwhile.
pub async fn until_every_plane_holds_a_grant(
    planes: &[&DataPlane],
    token: &str,
    call: &CostlyCall,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    let mut ok = 0;
    loop {
        ok += count(
            &run_calls_on(planes, token, call, 30 * planes.len(), 6).await,
            200,
        );
        let mut holding = 0;
        for p in planes {
            if holds_grant(p).await {
                holding += 1;
            }
        }
        if holding == planes.len() {
            return ok;
        }
        assert!(
            Instant::now() < deadline,
            "not every data plane got a grant"
        );
    }
}

/// Calls each plane until it refuses with `status`, failing if one still
/// admits `within` after `since`; returns how many calls succeeded meanwhile.
pub async fn until_refused_everywhere(
    planes: &[&DataPlane],
    token: &str,
    call: &CostlyCall,
    status: u16,
    since: Instant,
    within: Duration,
) -> usize {
    let mut ok = 0;
    for p in planes {
        loop {
            let statuses = run_calls_on(&[p], token, call, 3, 3).await;
            ok += count(&statuses, 200);
            if statuses.iter().all(|s| *s == status) {
                break;
            }
            assert!(
                since.elapsed() < within,
                "a data plane still admits after {within:?}: {statuses:?}"
            );
        }
    }
    ok
}

/// What one call of [`run_for`] got: its status (0: no answer) and the
/// `x-aex-request-id` the client was told.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub request_id: Option<String>,
}

/// `workers` clients calling `url` back to back until `length` has passed
/// (a call under way then is finished); every answer, in no order.
pub async fn run_for(
    url: &str,
    token: &str,
    call: &CostlyCall,
    workers: usize,
    length: Duration,
) -> Vec<Answer> {
    let client = reqwest::Client::new();
    let until = Instant::now() + length;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, token) = (client.clone(), url.to_string(), token.to_string());
        let (usage, body) = (call.usage.clone(), call.body.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while Instant::now() < until {
                let sent = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("x-mock-usage", &usage)
                    .json(&body)
                    .send()
                    .await;
                answers.push(match sent {
                    Ok(r) => Answer {
                        status: r.status().as_u16(),
                        request_id: r
                            .headers()
                            .get("x-aex-request-id")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string),
                    },
                    Err(_) => Answer {
                        status: 0,
                        request_id: None,
                    },
                });
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// Sends `calls` requests to `url`, one after the other; a connection that
/// fails (its data plane killed) counts as status 0.
pub async fn run_until_dead(url: String, token: &str, call: &CostlyCall, calls: usize) -> Vec<u16> {
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..calls {
        let sent = client
            .post(&url)
            .bearer_auth(token)
            .header("x-mock-usage", &call.usage)
            .json(&call.body)
            .send()
            .await;
        statuses.push(sent.map_or(0, |r| r.status().as_u16()));
    }
    statuses
}
