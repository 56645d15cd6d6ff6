//! Where the real clients live (`scripts/install-clients` puts them outside
//! the clone) and how a test finds them. A missing client fails the test
//! with the fix: a test that did not run must not say `ok`. With
//! AEX_SKIP_CLIENTS=1 (offline, say) it skips instead, loudly, and writes
//! its name to AEX_SKIP_LOG, which `scripts/test` lists at the end (cargo
//! hides what a passing test prints).

use std::path::PathBuf;
use std::process::Command;

pub fn clients_dir() -> PathBuf {
    std::env::var_os("AEX_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/aex-clients")
        })
}

fn missing(client: &str) -> Option<PathBuf> {
    let message = format!("{client} is not installed in {}", clients_dir().display());
    if !std::env::var("AEX_SKIP_CLIENTS").is_ok_and(|v| v == "1") {
        panic!(
            "{message}: run ./scripts/install-clients (or ./scripts/test, which does), or set AEX_SKIP_CLIENTS=1 to skip the tests that drive it"
        );
    }
    crate::skipped(&message);
    None
}

/// The venv's python if `module` imports there.
pub fn python_with(module: &str, client: &str) -> Option<PathBuf> {
    let python = clients_dir().join("venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok { Some(python) } else { missing(client) }
}

/// The directory holding the Node 24 `node` binary and the npm clients'
/// executables, if `package` is installed there.
pub fn node_bin_with(package: &str, client: &str) -> Option<PathBuf> {
    let modules = clients_dir().join("node/node_modules");
    let bin = modules.join(".bin");
    let ok = bin.join("node").exists() && modules.join(package).join("package.json").exists();
    if ok { Some(bin) } else { missing(client) }
}

/// The grpcurl binary from the venv.
pub fn grpcurl() -> Option<PathBuf> {
    let grpcurl = clients_dir().join("venv/bin/grpcurl");
    let ok = Command::new(&grpcurl)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(grpcurl)
    } else {
        missing("grpcurl")
    }
}

/// `PATH` with `dir` first, so scripts' `#!/usr/bin/env node` finds Node 24.
pub fn path_with(dir: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).expect("PATH")
}
