use crate::client::Admin;
use crate::error::{CliError, Result};
use aex_core::home::Home;
use aex_proto::v1 as pb;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
pub struct Args {
    /// The agent the command runs as.
    #[arg(long, short = 'a')]
    agent: String,
    /// Seconds between SIGTERM and SIGKILL when the process is killed.
    #[arg(long, default_value_t = 5)]
    grace: u64,
    /// Data-plane address to point the command at [env: AEX_DATAPLANE_ADDR].
    #[arg(long, value_name = "HOST:PORT")]
    dataplane: Option<String>,
    /// The command and its arguments, passed on untouched (`--` optional).
    #[arg(required = true, allow_hyphen_values = true, num_args = 1.., value_name = "CMD")]
    command: Vec<String>,
}

impl Args {
    pub fn dataplane_flag(&self) -> Option<String> {
        self.dataplane.clone()
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Forwards these to the child's process group.
const FORWARDED: &[(SignalKind, Signal)] = &[
    (SignalKind::interrupt(), Signal::SIGINT),
    (SignalKind::terminate(), Signal::SIGTERM),
    (SignalKind::hangup(), Signal::SIGHUP),
    (SignalKind::quit(), Signal::SIGQUIT),
    (SignalKind::user_defined1(), Signal::SIGUSR1),
    (SignalKind::user_defined2(), Signal::SIGUSR2),
];

/// Runs CMD as the agent, supervised: registered with the control plane,
/// given its own token, killed (its whole process group) when the agent is
/// killed or its budget is exhausted. Exits with the child's status.
pub async fn run(home: &Home, control: &str, dataplane: &str, args: Args) -> Result<()> {
    let mut admin = Admin::connect(home, control).await?;
    let command_line = args.command.join(" ");
    let started = admin
        .processes
        .start_process(pb::StartProcessRequest {
            agent_name: args.agent.clone(),
            pid: std::process::id(),
            command: command_line.clone(),
            host: hostname(),
        })
        .await
        .map_err(|s| admin.status(s))?
        .into_inner();
    let process_id = started.process_id.clone();
    let base_url = format!("http://{dataplane}/v1");
    let mut child = match tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("OPENAI_BASE_URL", &base_url)
        .env("OPENAI_API_BASE", &base_url)
        .env("OPENAI_API_KEY", &started.token)
        // Anthropic's clients (its SDKs, Claude Code) take the host and add
        // /v1 themselves.
        .env("ANTHROPIC_BASE_URL", format!("http://{dataplane}"))
        .env("ANTHROPIC_API_KEY", &started.token)
        .env("AEX_AGENT", &args.agent)
        // Its own process group, so a kill reaches the whole tree.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            report_exit(&mut admin, &process_id, 127, false, "could not start").await;
            return Err(CliError::Failed(format!(
                "cannot run '{}': {e}",
                args.command[0]
            )));
        }
    };
    let pgid = Pid::from_raw(child.id().expect("a spawned child has a pid") as i32);

    // Kill orders arrive on a stream held for the process's lifetime; it is
    // reopened if the control plane restarts.
    let (orders_tx, mut orders) = mpsc::channel::<String>(4);
    let supervisor = {
        let mut processes = admin.processes.clone();
        let process_id = process_id.clone();
        let pid = pgid.as_raw() as u32;
        tokio::spawn(async move {
            loop {
                if let Ok(stream) = processes
                    .supervise_process(pb::ProcessRef {
                        process_id: process_id.clone(),
                        pid,
                    })
                    .await
                {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(order)) = stream.message().await {
                        if order.kill && orders_tx.send(order.reason).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let (sig_tx, mut signals) = mpsc::channel::<Signal>(8);
    for (kind, sig) in FORWARDED {
        let mut stream =
            signal(*kind).map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
        let tx = sig_tx.clone();
        let sig = *sig;
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).await.is_err() {
                    return;
                }
            }
        });
    }

    let mut killed: Option<String> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(sig) = signals.recv() => {
                let _ = killpg(pgid, sig);
            }
            Some(reason) = orders.recv(), if killed.is_none() => {
                eprintln!("aexctl: stopping '{command_line}': {reason} (SIGTERM, then SIGKILL after {} s)", args.grace);
                let _ = killpg(pgid, Signal::SIGTERM);
                killed = Some(reason);
                let grace = tokio::time::sleep(Duration::from_secs(args.grace));
                tokio::select! {
                    status = child.wait() => break status,
                    _ = grace => {
                        let _ = killpg(pgid, Signal::SIGKILL);
                    }
                }
            }
        }
    };
    // The rest of the tree goes with it.
    if killed.is_some() {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(e) => {
            return Err(CliError::Failed(format!(
                "lost track of '{command_line}': {e}"
            )));
        }
    };
    let reason = killed.clone().unwrap_or_default();
    // Report before closing the supervision stream: a stream that closes
    // first reads as a supervisor that vanished.
    report_exit(&mut admin, &process_id, code, killed.is_some(), &reason).await;
    supervisor.abort();
    Err(CliError::Exit(code.clamp(0, 255) as u8))
}

async fn report_exit(admin: &mut Admin, process_id: &str, code: i32, killed: bool, reason: &str) {
    let exit = pb::ProcessExit {
        process_id: process_id.to_string(),
        exit_code: code,
        killed,
        reason: reason.to_string(),
    };
    for _ in 0..10 {
        if admin.processes.process_exited(exit.clone()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("aexctl: could not report the exit of process {process_id} to the control plane");
}
