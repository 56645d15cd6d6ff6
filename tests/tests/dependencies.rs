//! The crate boundaries ARCHITECTURE.md promises: the data plane and the
//! CLI carry no database code and do not depend on the control plane's
//! crate (`aexctl` speaks gRPC; migrations and database checks are
//! `aex-control`'s). Read from `cargo tree`, offline, as the lock file has it.

use std::process::Command;

fn normal_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_data_plane_and_the_cli_carry_no_database_and_no_control_plane() {
    for package in ["aex-dataplane", "aexctl"] {
        let deps = normal_dependencies(package);
        assert!(deps.len() > 10, "{package}: {deps:?}");
        let forbidden: Vec<&String> = deps
            .iter()
            .filter(|d| {
                d.starts_with("sqlx")
                    || ["rusqlite", "libsqlite3-sys", "aex-control"].contains(&d.as_str())
            })
            .collect();
        assert!(forbidden.is_empty(), "{package} depends on {forbidden:?}");
    }
    // The check can fail: the control plane does carry them.
    let control = normal_dependencies("aex-control");
    assert!(control.iter().any(|d| d == "rusqlite"));
}

#[test]
fn the_core_is_pure_no_runtime_network_or_database() {
    let deps = normal_dependencies("aex-core");
    assert!(deps.len() > 5, "{deps:?}");
    let forbidden: Vec<&String> = deps
        .iter()
        .filter(|d| {
            [
                "tokio", "tonic", "sqlx", "rusqlite", "pingora", "hyper", "prost",
            ]
            .iter()
            .any(|f| d.as_str() == *f || d.starts_with(&format!("{f}-")))
        })
        .collect();
    assert!(forbidden.is_empty(), "aex-core depends on {forbidden:?}");
    // The check can fail: the control plane does carry them.
    assert!(
        normal_dependencies("aex-control")
            .iter()
            .any(|d| d == "tokio")
    );
}
