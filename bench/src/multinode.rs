//! `aex-bench multinode`: the same workload (chat, 32 workers spread over
//! the data planes) directly, through one control plane on SQLite, and
//! through 1 and 2 control planes on PostgreSQL with 1-3 data planes, in one
//! run. Each shape gets a fresh home and a fresh database, dropped after.

use crate::{Args, Daemons, models_yaml, sibling, spawn_lines, usage, workload, workload_over};
use sqlx::Connection;
use std::process::Command;
use std::time::Duration;

struct Shape {
    name: &'static str,
    postgres: bool,
    controls: usize,
    data_planes: usize,
    /// One agent for every data plane (each agent with its sidecar), or
    /// one agent for all of them.
    agent_per_data_plane: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "SQLite, 1 control plane, 1 data plane",
        postgres: false,
        controls: 1,
        data_planes: 1,
        agent_per_data_plane: false,
    },
    Shape {
        name: "PostgreSQL, 1 control plane, 1 data plane",
        postgres: true,
        controls: 1,
        data_planes: 1,
        agent_per_data_plane: false,
    },
    Shape {
        name: "PostgreSQL, 1 control plane, 3 data planes",
        postgres: true,
        controls: 1,
        data_planes: 3,
        agent_per_data_plane: false,
    },
    Shape {
        name: "PostgreSQL, 2 control planes, 2 data planes",
        postgres: true,
        controls: 2,
        data_planes: 2,
        agent_per_data_plane: false,
    },
    Shape {
        name: "PostgreSQL, 2 control planes, 3 data planes",
        postgres: true,
        controls: 2,
        data_planes: 3,
        agent_per_data_plane: false,
    },
    Shape {
        name: "PostgreSQL, 2 control planes, 3 data planes, an agent each",
        postgres: true,
        controls: 2,
        data_planes: 3,
        agent_per_data_plane: true,
    },
];

const CONCURRENCY: u64 = 32;

/// CPU seconds of every PostgreSQL server process on the machine (the
/// backends serving the control planes, the WAL writer, the checkpointer),
/// 0 where there is none to see. A backend that exits mid-run takes its
/// share with it; the pools keep theirs for the run.
fn database_cpu() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|pid| usage(pid).0)
        .sum()
}

/// A database for one shape, dropped when done.
struct Database {
    server: String,
    name: String,
}

impl Database {
    async fn create(server: &str, n: usize) -> Self {
        let name = format!("aex_bench_{}_{n}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(server)
            .await
            .unwrap_or_else(|e| panic!("cannot reach --database-url's server: {e}"));
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .expect("drop");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        Self {
            server: server.to_string(),
            name,
        }
    }

    fn url(&self) -> String {
        let base = self.server.split('?').next().unwrap_or(&self.server);
        let authority_end = base
            .find("://")
            .and_then(|s| base[s + 3..].find('/').map(|j| s + 3 + j))
            .unwrap_or(base.len());
        format!("{}/{}", &base[..authority_end], self.name)
    }

    async fn drop_it(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.server).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

pub async fn run(args: &Args, mock_addr: std::net::SocketAddr, server: &str) {
    let direct = format!("http://{mock_addr}/v1/chat/completions");
    let d = workload(&direct, "unused", false, CONCURRENCY, args).await;
    eprintln!("direct: {:.0} rps p50 {:.3} ms", d.rps, d.p50);
    let mut rows = vec![format!(
        "| direct | {:.0} (100%) | {:.3} / {:.3} | — | — | {} / {} |",
        d.rps, d.p50, d.p99, d.done, d.errors
    )];
    for (n, shape) in SHAPES.iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = aex_core::home::Home::new(dir.path());
        home.init(false).expect("init");
        std::fs::write(home.models_yaml(), models_yaml(mock_addr)).expect("models.yaml");
        let db = if shape.postgres {
            Some(Database::create(server, n).await)
        } else {
            None
        };
        let mut daemons = Daemons(Vec::new());
        let mut control_args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(db) = &db {
            control_args.extend(["--database-url".into(), db.url()]);
        }
        let control_args: Vec<&str> = control_args.iter().map(String::as_str).collect();
        let controls: Vec<(u32, String)> = (0..shape.controls)
            .map(|_| {
                let (pid, lines) =
                    spawn_lines(dir.path(), "aex-control", &control_args, &mut daemons, 2);
                (pid, format!("http://{}", lines[0]))
            })
            .collect();
        let data: Vec<(u32, String)> = (0..shape.data_planes)
            .map(|i| {
                let control = &controls[i % controls.len()].1;
                let (pid, lines) = spawn_lines(
                    dir.path(),
                    "aex-dataplane",
                    &[
                        "--listen",
                        "127.0.0.1:0",
                        "--control",
                        control,
                        "--metrics-listen",
                        "127.0.0.1:0",
                    ],
                    &mut daemons,
                    2,
                );
                (pid, format!("http://{}/v1/chat/completions", lines[0]))
            })
            .collect();
        let agents = if shape.agent_per_data_plane {
            shape.data_planes
        } else {
            1
        };
        let tokens: Vec<String> = (0..agents)
            .map(|i| {
                let out = Command::new(sibling("aexctl"))
                    .args([
                        "agent",
                        "create",
                        &format!("fleet-{i}"),
                        "1000000",
                        "4000000000",
                        "--json",
                    ])
                    .env("AEX_HOME", dir.path())
                    .env("AEX_CONTROL_ADDR", &controls[0].1)
                    .output()
                    .expect("aexctl");
                let created: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("agent JSON");
                created["token"].as_str().expect("token").to_string()
            })
            .collect();
        // Every replica has the agent (LISTEN/NOTIFY) well within this.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let urls: Vec<String> = data.iter().map(|(_, u)| u.clone()).collect();
        let pids = |of: &[(u32, String)]| of.iter().map(|(p, _)| *p).collect::<Vec<_>>();
        let cpu = |pids: &[u32]| pids.iter().map(|&p| usage(p).0).sum::<f64>();
        let (control_pids, data_pids) = (pids(&controls), pids(&data));
        let (c0, d0, db0) = (cpu(&control_pids), cpu(&data_pids), database_cpu());
        let r = workload_over(&urls, &tokens, false, CONCURRENCY, args).await;
        let (c1, d1, db1) = (cpu(&control_pids), cpu(&data_pids), database_cpu());
        let per_k = |a: f64, b: f64| (b - a) / r.done.max(1) as f64 * 1000.0;
        eprintln!(
            "{}: {:.0} rps p50 {:.3} ms ({} errors)",
            shape.name, r.rps, r.p50, r.errors
        );
        rows.push(format!(
            "| {} | {:.0} ({:.0}%) | {:.3} / {:.3} | +{:.3} | {:.2} / {:.2} / {} | {} / {} |",
            shape.name,
            r.rps,
            r.rps / d.rps * 100.0,
            r.p50,
            r.p99,
            r.p50 - d.p50,
            per_k(c0, c1),
            per_k(d0, d1),
            if shape.postgres {
                format!("{:.2}", per_k(db0, db1))
            } else {
                "—".to_string()
            },
            r.done,
            r.errors,
        ));
        drop(daemons);
        if let Some(db) = db {
            db.drop_it().await;
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "## Several nodes: control planes on PostgreSQL\n\n\
Produced by `./bench/run multinode --requests {req}` (= `target/release/aex-bench multinode --requests {req}`, \
PostgreSQL from `--database-url` / `AEX_BENCH_DATABASE_URL`, default the machine's 127.0.0.1:5432) on {cpus} CPUs, \
everything on one machine: load generator, mock provider, PostgreSQL, every control and data plane. \
Chat, {CONCURRENCY} workers spread over the data planes, each with one kept-alive connection; data plane *i* asks \
control plane *i mod n*. Each shape has a fresh home and database and one agent (or, where it says so, one agent per data plane, as sidecars are); CPU is the sum over the processes \
of each plane (and of PostgreSQL's server processes), per 1,000 requests. Each workload stops after {max}s.\n\n\
| shape | rps (% of direct) | p50 / p99 ms | added p50 ms | CPU s per 1k req, control / data / database | requests / errors |\n\
|---|---|---|---|---|---|\n{}\n",
        rows.join("\n"),
        req = args.requests,
        max = args.max_seconds,
    );
    crate::write_section(&args.out, "multinode", &report);
    eprintln!("wrote {}", args.out.display());
}
