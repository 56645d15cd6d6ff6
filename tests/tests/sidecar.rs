//! A sidecar's data plane with a credential scoped to its agent (docs/DEPLOY.md,
//! issue #31 finding 8), as an operator sets one up: `aexctl dataplane
//! credential create`, the secret in a file, `aex-dataplane
//! --dataplane-token-file`. Real processes; on one SQLite control plane,
//! and on two PostgreSQL ones (issued through one, served and revoked
//! through the other).

use aex_tests::cluster::{Cluster, Ledger};
use aex_tests::{ControlPlane, DataPlane, Stack, TestHome, chat};
use std::path::PathBuf;
use std::time::{Duration, Instant};

async fn call(plane: &DataPlane, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(plane.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&chat())
        .send()
        .await
        .unwrap()
}

/// Issues a credential through `control` and writes its secret to a file
/// in `home`, as a Secret mounted in the Pod would be.
fn issue(control: &ControlPlane, home: &TestHome, name: &str, agents: &str) -> PathBuf {
    let out = control.aexctl(&[
        "dataplane",
        "credential",
        "create",
        name,
        "--agents",
        agents,
        "--json",
    ]);
    out.assert_ok();
    let secret = out.json()["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("aexsc_"));
    let file = home.file(&format!("{name}.token"));
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    file
}

/// Waits until a call of `token` through `plane` is refused; returns the
/// status and body it got.
async fn until_refused(plane: &DataPlane, token: &str, within: Duration) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let answer = call(plane, token).await;
        let status = answer.status().as_u16();
        if status != 200 {
            return (status, answer.text().await.unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "a revoked sidecar still served after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_serves_its_own_agent_and_no_other() {
    let stack = Stack::start().await;
    let mine = stack.agent("mine", "1", "6000", &[]);
    let other = stack.agent("other", "1", "6000", &[]);
    let file = issue(&stack.control, &stack.home, "pod-mine", "mine");
    let sidecar = DataPlane::start(
        &stack.home,
        &stack.control.url(),
        &[
            "--dataplane-token-file",
            file.to_str().unwrap(),
            "--id",
            "pod-mine",
        ],
    );

    // Its agent, served, from grants too (about a second of calls).
    let mut served = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        assert_eq!(call(&sidecar, &mine).await.status(), 200);
        served += 1;
    }
    // Another agent's valid token: a 403 naming the rule, also on /v1/models.
    let refused = call(&sidecar, &other).await;
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["x-aex-denied-by"], "data_plane");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "agent_not_served", "{body}");
    let models = reqwest::Client::new()
        .get(sidecar.url("/v1/models"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 403);
    // The fleet's data plane serves both.
    assert_eq!(call(&stack.data, &other).await.status(), 200);
    assert_eq!(call(&stack.data, &mine).await.status(), 200);

    let settled = stack.settled("mine", Duration::from_secs(10)).await;
    println!("{served} calls through the sidecar; mine: {settled}");
    assert_eq!(
        stack.settled("other", Duration::from_secs(10)).await["reserved_micro"],
        0
    );
    let events = stack
        .control
        .aexctl(&["events", "--agent", "mine", "--limit", "100000", "--json"]);
    events.assert_ok();
    let admits = events
        .stdout
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"] == "admit")
        .count();
    assert_eq!(admits, served + 1, "every call served is in the ledger");
    stack.control.aexctl(&["audit"]).assert_ok();

    let list = stack
        .control
        .aexctl(&["dataplane", "credential", "list", "--json"]);
    list.assert_ok();
    assert_eq!(list.json()[0]["agents"], serde_json::json!(["mine"]));
    stack
        .control
        .aexctl(&["dataplane", "credential", "revoke", "pod-mine"])
        .assert_ok();
    let (status, body) = until_refused(&sidecar, &mine, Duration::from_secs(5)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("refused this data plane's credential"),
        "{body}"
    );
    assert_eq!(call(&stack.data, &mine).await.status(), 200);
    stack.control.aexctl(&["audit"]).assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_issued_through_one_control_plane_works_and_is_revoked_through_another() {
    let Some(c) = Cluster::on(Ledger::Postgres).controls(2).start().await else {
        return;
    };
    let (home, first, second) = (&c.home, &c.controls[0], &c.controls[1]);
    let mine = first.agent("mine", "1", "6000", &[]);
    let other = first.agent("other", "1", "6000", &[]);

    let file = issue(first, home, "pod-mine", "mine");
    let sidecar = DataPlane::start(
        home,
        &second.url(),
        &["--dataplane-token-file", file.to_str().unwrap()],
    );
    assert_eq!(call(&sidecar, &mine).await.status(), 200);
    assert_eq!(call(&sidecar, &other).await.status(), 403);

    first
        .aexctl(&["dataplane", "credential", "revoke", "pod-mine"])
        .assert_ok();
    let revoked = Instant::now();
    until_refused(&sidecar, &mine, Duration::from_secs(5)).await;
    println!(
        "revoked through one control plane, refused through the other after {:?}",
        revoked.elapsed()
    );
}
