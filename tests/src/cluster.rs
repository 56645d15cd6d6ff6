//! N control planes × M data planes over one ledger, on SQLite (the
//! embedded default: one control plane, the store's one writer) or on
//! PostgreSQL (a fresh database per cluster; `start` answers `None`,
//! reported skipped, without `AEX_TEST_DATABASE_URL`), with the mock
//! provider and one `AEX_HOME` (`Stack::models_yaml`). Everything it started
//! stops when it is dropped.

use crate::mock::MockUpstream;
use crate::postgres::TestDatabase;
use crate::{ControlPlane, DataPlane, TestHome};
use serde_json::Value;
use std::time::Duration;

/// Which store holds the cluster's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ledger {
    Sqlite,
    Postgres,
}

/// Which control planes a data plane is started against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The `n`th control plane only.
    On(usize),
    /// Every control plane, comma separated: it fails over between them.
    Every,
    /// The last control plane (the first on SQLite): where a test puts what
    /// it wants away from the first.
    Last,
}

pub struct Cluster {
    // Dropped first to last: the processes before the database they use.
    pub planes: Vec<DataPlane>,
    pub controls: Vec<ControlPlane>,
    pub mock: MockUpstream,
    pub home: TestHome,
    pub db: Option<TestDatabase>,
    pub ledger: Ledger,
}

pub struct Builder {
    ledger: Ledger,
    controls: usize,
    control_args: Vec<String>,
    planes: Vec<(Place, Vec<String>)>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn borrowed(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl Cluster {
    pub fn on(ledger: Ledger) -> Builder {
        Builder {
            ledger,
            controls: 1,
            control_args: Vec::new(),
            planes: Vec::new(),
        }
    }

    /// The shape the grants tests share: on SQLite one control plane and
    /// three data planes on it; on PostgreSQL two control planes and data
    /// planes on the first, on the second, and on both.
    pub fn for_grants(ledger: Ledger) -> Builder {
        let b = Cluster::on(ledger);
        match ledger {
            Ledger::Sqlite => b.plane(Place::On(0), &[]).plane(Place::On(0), &[]),
            Ledger::Postgres => b
                .controls(2)
                .plane(Place::On(0), &[])
                .plane(Place::On(1), &[]),
        }
        .plane(Place::Every, &[])
    }

    /// The first control plane.
    pub fn control(&self) -> &ControlPlane {
        &self.controls[0]
    }

    /// The last control plane (the first on SQLite): what a test does
    /// through it must reach the data planes of every other.
    pub fn other_control(&self) -> &ControlPlane {
        self.controls.last().expect("a control plane")
    }

    pub fn planes(&self) -> Vec<&DataPlane> {
        self.planes.iter().collect()
    }

    /// The URL a data plane at `place` is given.
    pub fn control_url(&self, place: Place) -> String {
        match place {
            Place::On(n) => self.controls[n].url(),
            Place::Last => self.other_control().url(),
            Place::Every => self
                .controls
                .iter()
                .map(ControlPlane::url)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Starts one more data plane.
    pub fn start_plane(&self, place: Place, args: &[&str]) -> DataPlane {
        DataPlane::start(&self.home, &self.control_url(place), args)
    }

    /// Every ledger event of `agent`, oldest first, read through the last
    /// control plane (`aexctl events --json`); `details` parsed.
    pub fn events(&self, agent: &str) -> Vec<Value> {
        let out = self
            .other_control()
            .aexctl(&["events", "--agent", agent, "--limit", "1000000", "--json"]);
        out.assert_ok();
        out.stdout
            .lines()
            .map(|l| {
                let mut e: Value = serde_json::from_str(l).expect("one JSON event per line");
                if let Value::String(details) = &e["details"] {
                    e["details"] = serde_json::from_str(details).unwrap_or(Value::Null);
                }
                e
            })
            .collect()
    }

    /// Waits until every reservation of `agent` is settled; the agent.
    pub async fn settled(&self, agent: &str, within: Duration) -> Value {
        self.control().settled(agent, within).await
    }

    /// `aexctl audit` passes, run through the first control plane.
    pub fn audit_passes(&self) -> Value {
        let out = self.control().aexctl(&["audit", "--json"]);
        assert_eq!(out.code(), 0, "audit failed:\n{}", out.stdout);
        out.json()
    }
}

impl Builder {
    /// `n` control planes (only one on SQLite: its store has one writer).
    pub fn controls(mut self, n: usize) -> Self {
        assert!(n >= 1, "a cluster has a control plane");
        assert!(
            n == 1 || self.ledger == Ledger::Postgres,
            "SQLite is one control plane's store"
        );
        self.controls = n;
        self
    }

    /// Arguments every control plane is started with.
    pub fn control_args(mut self, args: &[&str]) -> Self {
        self.control_args = owned(args);
        self
    }

    /// One more data plane, at `place`, with `args`.
    pub fn plane(mut self, place: Place, args: &[&str]) -> Self {
        self.planes.push((place, owned(args)));
        self
    }

    pub async fn start(self) -> Option<Cluster> {
        let db = match self.ledger {
            Ledger::Sqlite => None,
            Ledger::Postgres => Some(TestDatabase::fresh().await?),
        };
        let mock = MockUpstream::start().await;
        let home = TestHome::serving(&mock);
        let mut args = self.control_args.clone();
        if let Some(db) = &db {
            args.extend(["--database-url".to_string(), db.url()]);
        }
        let controls = (0..self.controls)
            .map(|_| ControlPlane::start_with(&home, &borrowed(&args)))
            .collect();
        let mut cluster = Cluster {
            planes: Vec::new(),
            controls,
            mock,
            home,
            db,
            ledger: self.ledger,
        };
        for (place, args) in &self.planes {
            let plane = cluster.start_plane(*place, &borrowed(args));
            cluster.planes.push(plane);
        }
        Some(cluster)
    }
}
