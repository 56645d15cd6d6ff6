//! `aexctl` against a real `aex-control`: output and exit codes.

use aex_tests::TestHome;
use std::os::unix::fs::PermissionsExt;

#[test]
fn init_is_idempotent_and_private() {
    let home = TestHome::empty();
    let first = home.aexctl_offline(&["init"]);
    first.assert_ok();
    assert!(
        first.stdout.contains("AEX initialized successfully."),
        "{}",
        first.stdout
    );
    assert!(first.stdout.contains("created   config/models.yaml"));
    assert!(first.stdout.contains("2 model(s): llama3-local, simulated"));
    for f in ["admin.token", "dataplane.token", "ledger.key", ".env"] {
        let mode = std::fs::metadata(home.file(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    assert!(home.file("aex.db").exists());
    let admin = home.admin_token();

    std::fs::write(home.file("config/models.yaml"), "# mine\n").unwrap();
    // Our edited (now invalid) file is kept, and init says what is wrong with it.
    let again = home.aexctl_offline(&["init"]);
    again.assert_code(1);
    assert!(again.stderr.contains("models.yaml"), "{}", again.stderr);
    assert_eq!(
        std::fs::read_to_string(home.file("config/models.yaml")).unwrap(),
        "# mine\n"
    );
    assert_eq!(home.admin_token(), admin);

    let forced = home.aexctl_offline(&["init", "--force", "--json"]);
    forced.assert_ok();
    let report = forced.json();
    assert!(
        report["replaced"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "config/models.yaml")
    );
    assert!(
        report["kept"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "ledger.key")
    );
    assert_ne!(home.admin_token(), admin);
}

#[test]
fn version_has_json() {
    let home = TestHome::empty();
    let out = home.aexctl_offline(&["version"]);
    out.assert_ok();
    assert!(out.stdout.starts_with("AEX "));
    let json = home.aexctl_offline(&["version", "--json"]).json();
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn agent_lifecycle_through_aexctl() {
    let home = TestHome::new();
    let cp = home.start_control();

    let created = cp.aexctl(&[
        "agent",
        "create",
        "dev-agent",
        "5",
        "120",
        "--allowed-models",
        "llama3-local",
    ]);
    created.assert_ok();
    assert!(created.stdout.contains("Agent 'dev-agent' created."));
    assert!(created.stdout.contains("Budget: $5.000000 (5000000 µ)"));
    let token = created
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .expect("token line")
        .to_string();
    assert!(token.starts_with("aex_"));

    let small = cp.aexctl(&["agent", "create", "tiny", "0.004", "120", "--json"]);
    small.assert_ok();
    let small = small.json();
    assert_eq!(small["agent"]["budget_micro"], 4000);
    assert_eq!(small["agent"]["budget_usd"], "0.004000");
    let human = cp.aexctl(&["agent", "inspect", "tiny"]);
    human.assert_ok();
    assert!(
        human.stdout.contains("$0.004000 (4000 µ)"),
        "{}",
        human.stdout
    );
    assert!(!human.stdout.contains("$0.00 "), "never $0.00");

    let list = cp.aexctl(&["agent", "list"]);
    list.assert_ok();
    assert!(list.stdout.contains("dev-agent") && list.stdout.contains("tiny"));
    assert!(list.stdout.contains("5.000000") && list.stdout.contains("0.004000"));
    assert!(!list.stdout.contains(&token), "list never shows a token");
    let listed = cp.aexctl(&["agent", "list", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    let inspect = cp.aexctl(&["agent", "inspect", "dev-agent", "--json"]);
    inspect.assert_ok();
    let before = inspect.json();
    let prefix = before["token_prefix"].as_str().unwrap().to_string();
    assert!(token.starts_with(&prefix));
    assert!(
        !inspect.stdout.contains(&token),
        "inspect never shows the token"
    );
    let inspect_human = cp.aexctl(&["agent", "inspect", "dev-agent"]);
    assert!(inspect_human.stdout.contains(&prefix));
    assert!(!inspect_human.stdout.contains(&token));

    let rotated = cp.aexctl(&["agent", "rotate-token", "dev-agent", "--json"]);
    rotated.assert_ok();
    let rotated = rotated.json();
    let new_token = rotated["token"].as_str().unwrap();
    assert_ne!(new_token, token);
    assert_ne!(rotated["agent"]["token_prefix"], prefix);

    let updated = cp.aexctl(&[
        "agent",
        "update",
        "dev-agent",
        "--top-up",
        "0.5",
        "--rpm",
        "60",
        "--tpm",
        "10000",
        "--vision",
        "true",
        "--json",
    ]);
    updated.assert_ok();
    let updated = updated.json();
    assert_eq!(updated["budget_micro"], 5_500_000);
    assert_eq!(updated["rpm"], 60);
    assert_eq!(updated["tpm"], 10000);
    assert_eq!(updated["capabilities"]["vision"], true);

    cp.aexctl(&["agent", "pause", "dev-agent"]).assert_ok();
    assert_eq!(
        cp.aexctl(&["agent", "inspect", "dev-agent", "--json"])
            .json()["state"],
        "paused"
    );
    let resumed = cp.aexctl(&["agent", "resume", "dev-agent"]);
    resumed.assert_ok();
    assert!(resumed.stdout.contains("Agent 'dev-agent' resumed."));

    let deleted = cp.aexctl(&["agent", "delete", "dev-agent"]);
    deleted.assert_ok();
    assert!(deleted.stdout.contains("history stays in the ledger"));
    cp.aexctl(&["agent", "inspect", "dev-agent"]).assert_code(1);
    let all = cp.aexctl(&["agent", "list", "--all", "--json"]).json();
    let tomb = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "dev-agent")
        .unwrap();
    assert_eq!(tomb["state"], "deleted");
    assert_eq!(
        cp.aexctl(&["agent", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn failures_say_why_and_exit_1_usage_errors_exit_2() {
    let home = TestHome::new();
    let cp = home.start_control();
    cp.aexctl(&["agent", "create", "dup", "1", "10"])
        .assert_ok();

    for (args, needle) in [
        (vec!["agent", "create", "dup", "1", "10"], "already exists"),
        (vec!["agent", "create", "neg", "-1", "10"], "negative"),
        (
            vec!["agent", "create", "nan", "NaN", "10"],
            "not a decimal amount",
        ),
        (
            vec!["agent", "create", "p", "1.0000001", "10"],
            "7 decimal places; at most 6",
        ),
        (
            vec![
                "agent",
                "create",
                "m",
                "1",
                "10",
                "--allowed-models",
                "nope",
            ],
            "'nope' is not configured",
        ),
        (
            vec!["agent", "create", "t", "1", "10", "--ttl", "soon"],
            "--ttl 'soon'",
        ),
        (vec!["agent", "inspect", "ghost"], "no agent named 'ghost'"),
        (vec!["agent", "pause", "ghost"], "no agent named 'ghost'"),
        (vec!["agent", "update", "dup", "--top-up", "-2"], "negative"),
        (vec!["agent", "update", "dup"], "nothing to update"),
    ] {
        let out = cp.aexctl(&args);
        out.assert_code(1);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("error: "),
            "{args:?}: {}",
            out.stderr
        );
    }
    for args in [
        vec!["agent", "create"],
        vec!["agent", "create", "x", "1", "lots"],
        vec!["agent", "frobnicate"],
        vec!["agent", "create", "x", "1", "10", "--scope", "root"],
    ] {
        cp.aexctl(&args).assert_code(2);
    }
}

#[test]
fn unreachable_control_plane_is_a_clear_error() {
    let home = TestHome::new();
    let out = home.aexctl_offline(&["agent", "list"]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("cannot reach the AEX control plane at http://127.0.0.1:1"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Start it"), "{}", out.stderr);

    let uninitialised = TestHome::empty();
    let out = uninitialised.aexctl_offline(&["agent", "list"]);
    out.assert_code(1);
    assert!(out.stderr.contains("run `aexctl init`"), "{}", out.stderr);
}

#[test]
fn models_list_and_reload_keep_the_running_config_on_error() {
    let home = TestHome::new();
    let cp = home.start_control();
    let listed = cp.aexctl(&["models", "list", "--json"]).json();
    assert_eq!(listed["default_model"], "llama3-local");
    let names: Vec<_> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(names, ["llama3-local", "simulated"]);
    let human = cp.aexctl(&["models", "list"]);
    human.assert_ok();
    assert!(human.stdout.contains("0.15 µ/token"), "{}", human.stdout);

    let path = home.file("config/models.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace(
            "    provider_model: llama3\n",
            "    provider_model: llama3\n    colour: blue\n",
        ),
    )
    .unwrap();
    let bad = cp.aexctl(&["models", "reload"]);
    bad.assert_code(1);
    assert!(bad.stderr.contains("models.yaml:"), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("unknown field `colour`"),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("left unchanged"), "{}", bad.stderr);
    // Still serving the previous config.
    assert_eq!(
        cp.aexctl(&["models", "list", "--json"]).json()["digest"],
        listed["digest"]
    );

    std::fs::write(
        &path,
        good.replace("default_model: llama3-local", "default_model: simulated"),
    )
    .unwrap();
    let ok = cp.aexctl(&["models", "reload"]);
    ok.assert_ok();
    assert!(
        ok.stdout.contains("reloaded successfully: 2 model(s)"),
        "{}",
        ok.stdout
    );
    assert_eq!(
        cp.aexctl(&["models", "list", "--json"]).json()["default_model"],
        "simulated"
    );
}
