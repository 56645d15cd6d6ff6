//! `aexctl demo`: the seed report's experiment, self-contained and checked.
//! Throwaway AEX_HOME, both planes on free ports, the simulated provider
//! priced like a real model; 12 agents stream concurrently, one bursts past
//! its RPM; then every number the clients saw is compared with the ledger.

use crate::client::Admin;
use crate::commands::daemon::binary;
use crate::error::{CliError, Result};
use crate::output::{print_json, table};
use aex_core::home::Home;
use aex_core::money::{Pricing, TokenUsage, usd, usd_with_micro};
use aex_proto::v1 as pb;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the throwaway AEX_HOME (its path is printed) for a look afterwards.
    #[arg(long)]
    keep: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

const MODEL: &str = "demo-sim";
/// Priced like a real hosted model, so the small agents meet their budget.
// $2.50 / Mtok in, $10 / Mtok out.
const PRICING: Pricing = Pricing::flat(2_500_000, 10_000_000);
const REQUESTS_PER_AGENT: usize = 5;
const BURST: usize = 150;

const MODELS_YAML: &str = "version: 1
providers:
  sim:
    type: simulated
    latency_ms: 20
    tokens_per_second: 400
    completion_tokens: 32
models:
  demo-sim:
    provider: sim
    provider_model: aex-simulated
    pricing: { input_usd_per_mtok: 2.50, output_usd_per_mtok: 10.00 }
    limits: { max_tokens: 4096 }
    capabilities: { tools: true, vision: false }
default_model: demo-sim
";

/// Kills the daemons the demo started, whatever happens.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(home: &Home, name: &str, args: &[&str], daemons: &mut Daemons) -> Result<String> {
    let log = std::fs::File::create(home.logs_dir().join(format!("{name}.log")))
        .map_err(|e| CliError::Failed(format!("cannot create a log file: {e}")))?;
    let mut child = Command::new(binary(name))
        .args(args)
        .env("AEX_HOME", home.root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot start {name}: {e}. Install AEX with ./scripts/install"
            ))
        })?;
    let stdout = child.stdout.take().expect("piped");
    daemons.0.push(child);
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| CliError::Failed(format!("{name} did not start: {e}")))?;
    first
        .trim()
        .rsplit(' ')
        .next()
        .filter(|a| a.contains(':'))
        .map(str::to_string)
        .ok_or_else(|| {
            CliError::Failed(format!(
                "{name} did not start; see {}",
                home.logs_dir().display()
            ))
        })
}

#[derive(Default, Clone)]
struct Tally {
    budget_micro: i64,
    requests: usize,
    success: usize,
    budget_denied: usize,
    rate_limited: usize,
    other: usize,
    latency_ms: Vec<f64>,
    /// What the successful calls cost, from the usage the client was sent.
    expected_spend: i64,
}

impl Tally {
    /// Counts one call by the status the client got.
    fn record(&mut self, status: u16, cost: i64, latency_ms: f64) {
        self.requests += 1;
        match status {
            200 => {
                self.success += 1;
                self.expected_spend += cost;
                self.latency_ms.push(latency_ms);
            }
            402 => self.budget_denied += 1,
            429 => self.rate_limited += 1,
            _ => self.other += 1,
        }
    }
}

/// Sends one request; returns (status, cost from the reported usage).
async fn call(client: &reqwest::Client, url: &str, token: &str, body: &Value) -> (u16, i64) {
    let Ok(r) = client.post(url).bearer_auth(token).json(body).send().await else {
        return (0, 0);
    };
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    if status != 200 {
        return (status, 0);
    }
    // Streams end with a usage chunk (asked for); JSON bodies carry usage.
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .chain(std::iter::once(text.as_str()))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .next_back();
    let cost = usage.map_or(0, |u| {
        PRICING.cost_micro(TokenUsage::new(
            u["prompt_tokens"].as_u64().unwrap_or(0),
            u["completion_tokens"].as_u64().unwrap_or(0),
        ))
    });
    (status, cost)
}

pub async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("aex-demo-")
        .tempdir()
        .map_err(|e| CliError::Failed(format!("cannot create a temporary AEX_HOME: {e}")))?;
    let home = Home::new(dir.path());
    home.init(false)?;
    std::fs::write(home.models_yaml(), MODELS_YAML).map_err(|e| CliError::Failed(e.to_string()))?;
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    say("AEX demo: 12 agents × 5 streaming requests, plus a burst past an RPM limit,".into());
    say(format!(
        "against the simulated provider priced like a hosted model ($2.50/$10 per Mtok). AEX_HOME: {}",
        home.root().display()
    ));

    let mut daemons = Daemons(Vec::new());
    let control_addr = start(
        &home,
        "aex-control",
        &["--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        &mut daemons,
    )?;
    let control_url = format!("http://{control_addr}");
    let data_addr = start(
        &home,
        "aex-dataplane",
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            &control_url,
            "--metrics-listen",
            "off",
        ],
        &mut daemons,
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while super::daemon::http_status(&data_addr, "/readyz").await != Ok(200) {
        if Instant::now() > deadline {
            return Err(CliError::Failed(
                "the data plane did not become ready".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say(format!(
        "  Control plane on {control_addr}; data plane on http://{data_addr}/v1"
    ));

    let mut admin = Admin::connect(&home, &control_url).await?;
    let mut agents: Vec<(String, String, i64)> = Vec::new();
    for i in 0..12 {
        let name = format!("demo-a{i:02}");
        let budget = if i < 10 { 1_200_000 } else { 4_000 };
        let created = admin
            .agents
            .create_agent(pb::CreateAgentRequest {
                name: name.clone(),
                budget_micro: budget,
                rpm: 120,
                allowed_models: vec![MODEL.into()],
                ..Default::default()
            })
            .await
            .map_err(|s| admin.status(s))?
            .into_inner();
        agents.push((name, created.token, budget));
    }
    let burst = admin
        .agents
        .create_agent(pb::CreateAgentRequest {
            name: "demo-burst".into(),
            budget_micro: 1_000_000,
            rpm: 120,
            allowed_models: vec![MODEL.into()],
            ..Default::default()
        })
        .await
        .map_err(|s| admin.status(s))?
        .into_inner();
    say("  Created 12 agents (10 × $1.20, 2 × $0.004, RPM 120) and demo-burst (RPM 120).".into());

    let client = reqwest::Client::new();
    let url = format!("http://{data_addr}/v1/chat/completions");
    let done = Arc::new(AtomicUsize::new(0));
    let stream_body = |i: usize| {
        json!({"model": MODEL, "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": format!("Plan step {i} of the demo task.")}]})
    };
    let mut tasks = Vec::new();
    for (name, token, budget) in &agents {
        for i in 0..REQUESTS_PER_AGENT {
            let (client, url, token, name, done, body) = (
                client.clone(),
                url.clone(),
                token.clone(),
                name.clone(),
                done.clone(),
                stream_body(i),
            );
            let budget = *budget;
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let (status, cost) = call(&client, &url, &token, &body).await;
                done.fetch_add(1, Ordering::Relaxed);
                (
                    name,
                    budget,
                    status,
                    cost,
                    t0.elapsed().as_secs_f64() * 1000.0,
                )
            }));
        }
    }
    let total = tasks.len();
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let progress = tokio::spawn({
        let done = done.clone();
        // A live counter only makes sense on a terminal.
        let quiet = args.json || !std::io::IsTerminal::is_terminal(&std::io::stdout());
        async move {
            if quiet {
                return;
            }
            loop {
                print!(
                    "\r  Streaming: {}/{total} requests done",
                    done.load(Ordering::Relaxed)
                );
                let _ = std::io::Write::flush(&mut std::io::stdout());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    for t in tasks {
        let (name, budget, status, cost, ms) =
            t.await.map_err(|e| CliError::Failed(e.to_string()))?;
        let tally = tallies.entry(name).or_default();
        tally.budget_micro = budget;
        tally.record(status, cost, ms);
    }
    progress.abort();
    say(format!("\r  Streaming: {total}/{total} requests done"));

    let mut burst_tasks = Vec::new();
    for i in 0..BURST {
        let (client, url, token) = (client.clone(), url.clone(), burst.token.clone());
        let body = json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": format!("ping {i}")}]});
        burst_tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let (status, cost) = call(&client, &url, &token, &body).await;
            (status, cost, t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut b = Tally {
        budget_micro: 1_000_000,
        ..Default::default()
    };
    for t in burst_tasks {
        let (status, cost, ms) = t.await.map_err(|e| CliError::Failed(e.to_string()))?;
        b.record(status, cost, ms);
    }
    say(format!(
        "  Burst: {BURST} requests at once from demo-burst: {} served, {} rate-limited (429)",
        b.success, b.rate_limited
    ));
    tallies.insert("demo-burst".into(), b);

    // Settlement is asynchronous: wait until nothing is reserved.
    let settle_deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = admin
            .ledger
            .get_status(pb::StatusRequest {})
            .await
            .map_err(|e| admin.status(e))?
            .into_inner();
        if s.total_reserved_micro == 0 || Instant::now() > settle_deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let audit = admin
        .ledger
        .audit(pb::AuditRequest {})
        .await
        .map_err(|e| admin.status(e))?
        .into_inner();

    // Compare every client-side number with the ledger.
    let mut mismatches = Vec::new();
    let listed = admin
        .agents
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .map_err(|e| admin.status(e))?
        .into_inner()
        .agents;
    for (name, t) in &tallies {
        let events = admin
            .ledger
            .list_events(pb::ListEventsRequest {
                agent_name: name.clone(),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| admin.status(e))?
            .into_inner()
            .events;
        let count = |kind: &str, reason: &str| {
            events
                .iter()
                .filter(|e| e.kind == kind && (reason.is_empty() || e.reason == reason))
                .count()
        };
        let spent = listed
            .iter()
            .find(|a| &a.name == name)
            .map_or(0, |a| a.spent_micro);
        for (what, client_saw, ledger) in [
            (
                "successful calls vs admissions",
                t.success,
                count("admit", ""),
            ),
            (
                "402s vs budget denials",
                t.budget_denied,
                count("deny", "budget"),
            ),
            (
                "429s vs rate-limit denials",
                t.rate_limited,
                count("deny", "rpm"),
            ),
        ] {
            if client_saw != ledger {
                mismatches.push(format!(
                    "{name}: {what}: clients saw {client_saw}, ledger has {ledger}"
                ));
            }
        }
        if t.expected_spend != spent {
            mismatches.push(format!(
                "{name}: spend: clients' usage comes to {} µ, ledger charged {spent} µ",
                t.expected_spend
            ));
        }
        if t.other > 0 {
            mismatches.push(format!(
                "{name}: {} calls failed for other reasons",
                t.other
            ));
        }
    }
    let served: usize = tallies.values().map(|t| t.success).sum();
    if status.requests_served as usize != served {
        mismatches.push(format!(
            "status: requests served {} vs {served} successful calls",
            status.requests_served
        ));
    }
    let audit_ok = audit.checks.iter().all(|c| c.passed);
    let avg = |t: &Tally| {
        if t.latency_ms.is_empty() {
            0.0
        } else {
            t.latency_ms.iter().sum::<f64>() / t.latency_ms.len() as f64
        }
    };

    if args.json {
        print_json(&json!({
            "agents": tallies.iter().map(|(n, t)| json!({
                "agent": n, "budget_micro": t.budget_micro, "requests": t.requests, "success": t.success,
                "denied_402": t.budget_denied, "limited_429": t.rate_limited, "avg_latency_ms": avg(t),
                "spent_micro": t.expected_spend,
            })).collect::<Vec<_>>(),
            "status": {"requests_served": status.requests_served, "total_spent_micro": status.total_spent_micro,
                       "denials_by_reason": status.denials_by_reason},
            "audit_passed": audit_ok,
            "mismatches": mismatches,
            "agreement": mismatches.is_empty(),
            "seconds": started.elapsed().as_secs_f64(),
        }));
    } else {
        let mut t = table(&[
            "Agent",
            "Budget",
            "Requests",
            "Success",
            "402",
            "429",
            "Avg Latency (ms)",
            "Spent",
        ]);
        for (name, x) in &tallies {
            t.add_row(vec![
                name.clone(),
                usd(x.budget_micro),
                x.requests.to_string(),
                x.success.to_string(),
                x.budget_denied.to_string(),
                x.rate_limited.to_string(),
                format!("{:.1}", avg(x)),
                usd(x.expected_spend),
            ]);
        }
        println!();
        println!("Per-agent outcomes (as the clients saw them)");
        println!("{t}");
        let d = |r: &str| status.denials_by_reason.get(r).copied().unwrap_or(0);
        println!();
        println!("Ledger status");
        println!("  Requests Served:    {}", status.requests_served);
        println!("  Budget Denials:     {}", d("budget"));
        println!("  Rate Limit Denials: {}", d("rpm"));
        println!(
            "  Total Spent:        {}",
            usd_with_micro(status.total_spent_micro)
        );
        println!(
            "  Total Reserved:     {}",
            usd_with_micro(status.total_reserved_micro)
        );
        println!();
        println!("Audit");
        for c in &audit.checks {
            println!("  {} {}", if c.passed { "✅" } else { "❌" }, c.name);
        }
        println!();
        if mismatches.is_empty() {
            println!(
                "✅ Every number the clients saw matches the ledger ({:.1} s).",
                started.elapsed().as_secs_f64()
            );
        } else {
            println!("❌ The clients and the ledger disagree:");
            for m in &mismatches {
                println!("   {m}");
            }
        }
    }
    drop(admin);
    drop(daemons);
    if args.keep {
        let kept = dir.keep();
        if !args.json {
            println!(
                "Kept {} (start it with AEX_HOME={} aexctl daemon start)",
                kept.display(),
                kept.display()
            );
        }
    }
    if !mismatches.is_empty() || !audit_ok {
        return Err(CliError::Failed(
            "the demo found a disagreement between clients and ledger; see above".into(),
        ));
    }
    Ok(())
}
