//! Where the daemons are: a flag wins, then the environment, then what
//! `aexctl daemon start` recorded in AEX_HOME/run, then the defaults.

use aex_core::home::Home;

pub const DEFAULT_CONTROL_ADDR: &str = "http://127.0.0.1:9001";
pub const DEFAULT_DATAPLANE_ADDR: &str = "127.0.0.1:9000";

fn recorded(home: &Home, file: &str) -> Option<String> {
    std::fs::read_to_string(home.run_dir().join(file))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The control plane's gRPC URL (`http://host:port`).
pub fn control(home: &Home, flag: Option<String>) -> String {
    flag.or_else(|| env("AEX_CONTROL_ADDR"))
        .or_else(|| recorded(home, "control.addr"))
        .unwrap_or_else(|| DEFAULT_CONTROL_ADDR.to_string())
}

/// The data plane's `host:port`.
pub fn dataplane(home: &Home, flag: Option<String>) -> String {
    flag.or_else(|| env("AEX_DATAPLANE_ADDR"))
        .or_else(|| recorded(home, "dataplane.addr"))
        .unwrap_or_else(|| DEFAULT_DATAPLANE_ADDR.to_string())
}
