//! TLS on the gRPC API, with certificates made here (rcgen): a control
//! plane requiring mutual TLS serves the clients whose certificates its
//! client CA signed, and refuses a client without the server's CA, one
//! without a certificate, and one whose certificate another CA signed.

use aex_tests::{ControlPlane, DataPlane, TestHome, bin, mock::MockUpstream};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.join(format!("{name}.ca.pem"));
    std::fs::write(&pem, cert.pem()).unwrap();
    Ca { cert, key, pem }
}

fn issue(dir: &Path, ca: &Ca, name: &str, server: bool) -> Issued {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    if server {
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Issued {
        cert: cert_path,
        key: key_path,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `aexctl status --json` against `url` with these TLS files.
fn aexctl_status(home: &TestHome, url: &str, tls: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(bin("aexctl"));
    cmd.args(["agent", "list", "--json"])
        .env("AEX_HOME", home.path())
        .env("AEX_CONTROL_ADDR", url)
        .env_remove("AEX_TLS_CA")
        .env_remove("AEX_TLS_CERT")
        .env_remove("AEX_TLS_KEY");
    for (var, file) in tls {
        cmd.env(var, file);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data plane that never gets ready within `within` (its control plane
/// refuses it): started by hand, since the kit waits for readiness.
fn never_ready(home: &TestHome, control: &str, tls: &[&str], within: Duration) {
    let port = aex_tests::free_port();
    let mut child = Command::new(bin("aex-dataplane"))
        .args([
            "--home",
            path(home.path()),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--control", control, "--metrics-listen", "off"])
        .args(tls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while started.elapsed() < within {
        assert_ne!(
            aex_tests::http_status(addr, "/readyz"),
            Some(200),
            "a data plane the control plane should refuse got ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_the_signed_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ours = ca(dir.path(), "aex");
    let theirs = ca(dir.path(), "stranger");
    let server = issue(dir.path(), &ours, "control", true);
    let client = issue(dir.path(), &ours, "dataplane", false);
    let stranger = issue(dir.path(), &theirs, "intruder", false);

    let mock = MockUpstream::start().await;
    let home = TestHome::serving(&mock);
    let control = ControlPlane::start_with(
        &home,
        &[
            "--tls-cert",
            path(&server.cert),
            "--tls-key",
            path(&server.key),
            "--tls-client-ca",
            path(&ours.pem),
        ],
    );
    let url = format!("https://127.0.0.1:{}", control.addr.port());

    // aexctl: with everything, served; each missing piece, refused.
    let (ok, err) = aexctl_status(
        &home,
        &url,
        &[
            ("AEX_TLS_CA", &ours.pem),
            ("AEX_TLS_CERT", &client.cert),
            ("AEX_TLS_KEY", &client.key),
        ],
    );
    assert!(ok, "{err}");
    let (ok, err) = aexctl_status(&home, &url, &[]);
    assert!(!ok && err.contains("--tls-ca"), "{err}");
    let (ok, _) = aexctl_status(&home, &url, &[("AEX_TLS_CA", &ours.pem)]);
    assert!(!ok, "no client certificate under mutual TLS");
    let (ok, _) = aexctl_status(
        &home,
        &url,
        &[
            ("AEX_TLS_CA", &ours.pem),
            ("AEX_TLS_CERT", &stranger.cert),
            ("AEX_TLS_KEY", &stranger.key),
        ],
    );
    assert!(!ok, "a certificate another CA signed");
    let (ok, _) = aexctl_status(
        &home,
        &url,
        &[
            ("AEX_TLS_CA", &theirs.pem),
            ("AEX_TLS_CERT", &client.cert),
            ("AEX_TLS_KEY", &client.key),
        ],
    );
    assert!(!ok, "a server certificate the given CA did not sign");
    let (ok, err) = aexctl_status(&home, &control.url(), &[]);
    assert!(!ok, "plain HTTP/2 to a TLS listener: {err}");

    // Data planes: the signed one serves calls; the others never get ready.
    let data = DataPlane::start(
        &home,
        &url,
        &[
            "--tls-ca",
            path(&ours.pem),
            "--tls-cert",
            path(&client.cert),
            "--tls-key",
            path(&client.key),
        ],
    );
    let mut create = Command::new(bin("aexctl"));
    let out = create
        .args(["agent", "create", "secure", "1", "60", "--json"])
        .env("AEX_HOME", home.path())
        .env("AEX_CONTROL_ADDR", &url)
        .env("AEX_TLS_CA", &ours.pem)
        .env("AEX_TLS_CERT", &client.cert)
        .env("AEX_TLS_KEY", &client.key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["token"].as_str().unwrap();
    let r = reqwest::Client::new()
        .post(data.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&serde_json::json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wait = Duration::from_secs(2);
    never_ready(&home, &url, &["--tls-ca", path(&ours.pem)], wait);
    never_ready(
        &home,
        &url,
        &[
            "--tls-ca",
            path(&ours.pem),
            "--tls-cert",
            path(&stranger.cert),
            "--tls-key",
            path(&stranger.key),
        ],
        wait,
    );
}

/// `aexctl` against `url` with the client's TLS files; the output.
fn aexctl_tls(
    home: &TestHome,
    url: &str,
    tls: &[(&str, &Path)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(bin("aexctl"));
    cmd.args(args)
        .env("AEX_HOME", home.path())
        .env("AEX_CONTROL_ADDR", url);
    for (var, file) in tls {
        cmd.env(var, file);
    }
    cmd.output().unwrap()
}

/// The several-nodes guarantees hold over mutual TLS: two control planes
/// on PostgreSQL, two data planes given both (`https://…,https://…`), a
/// budget that covers exactly 10 worst-case calls, 40 slow calls at once,
/// and one control plane killed with `kill -9` while they are in flight:
/// exactly 10 go through, every one is settled through the survivor, and
/// audit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_nodes_over_mutual_tls_keep_the_budget_through_a_kill() {
    let Some(db) = aex_tests::postgres::TestDatabase::fresh().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ours = ca(dir.path(), "aex");
    let server = issue(dir.path(), &ours, "control", true);
    let client = issue(dir.path(), &ours, "dataplane", false);
    let tls_env: [(&str, &Path); 3] = [
        ("AEX_TLS_CA", &ours.pem),
        ("AEX_TLS_CERT", &client.cert),
        ("AEX_TLS_KEY", &client.key),
    ];
    let mock = MockUpstream::start().await;
    let home = TestHome::serving(&mock);
    let db_url = db.url();
    let control_args = [
        "--database-url",
        &db_url,
        "--tls-cert",
        path(&server.cert),
        "--tls-key",
        path(&server.key),
        "--tls-client-ca",
        path(&ours.pem),
    ];
    let first = ControlPlane::start_with(&home, &control_args);
    let second = ControlPlane::start_with(&home, &control_args);
    let https = |c: &ControlPlane| format!("https://127.0.0.1:{}", c.addr.port());
    let (url1, url2) = (https(&first), https(&second));
    let both = format!("{url1},{url2}");
    let data_args = [
        "--tls-ca",
        path(&ours.pem),
        "--tls-cert",
        path(&client.cert),
        "--tls-key",
        path(&client.key),
    ];
    let data = [
        DataPlane::start(&home, &both, &data_args),
        DataPlane::start(&home, &both, &data_args),
    ];
    let chat = serde_json::json!({"model": "mock-model", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]});
    // One call's worst case, from a probe agent's admit event.
    let created = |name: &str, budget: &str| -> String {
        let out = aexctl_tls(
            &home,
            &url1,
            &tls_env,
            &["agent", "create", name, budget, "100000", "--json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let probe = created("probe", "1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let client_http = reqwest::Client::new();
    let r = client_http
        .post(data[0].url("/v1/chat/completions"))
        .bearer_auth(&probe)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = aexctl_tls(
        &home,
        &url1,
        &tls_env,
        &["events", "--agent", "probe", "--json"],
    );
    let worst = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["kind"] == "admit")
        .and_then(|e| e["amount_micro"].as_i64())
        .expect("an admit event");
    let budget = 10 * worst;
    let token = created(
        "fleet",
        &format!("{}.{:06}", budget / 1_000_000, budget % 1_000_000),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls = (0..40).map(|i| {
        let request = client_http
            .post(data[i % 2].url("/v1/chat/completions"))
            .bearer_auth(&token)
            .header("x-mock-delay-ms", "1500")
            .json(&chat)
            .timeout(Duration::from_secs(30))
            .send();
        async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
    });
    let killer = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        drop(first); // kill -9, with every admitted call in flight
    };
    let (statuses, ()) = tokio::join!(futures_util::future::join_all(calls), killer);
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((ok, refused), (10, 30), "{statuses:?}");
    // Settled through the survivor.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = aexctl_tls(
            &home,
            &url2,
            &tls_env,
            &["agent", "inspect", "fleet", "--json"],
        );
        let agent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if agent["reserved_micro"] == 0 {
            let spent = agent["spent_micro"].as_i64().unwrap();
            assert!(spent > 0 && spent <= budget, "{agent}");
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {agent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = aexctl_tls(&home, &url2, &tls_env, &["audit", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(report["passed"], true, "{report:#}");
    drop(second);
}
