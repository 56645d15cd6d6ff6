mod view;

use crate::client::Admin;
use crate::error::{CliError, Result};
use crate::output::{parse_ttl, print_json, rendered};
use aex_core::home::Home;
use aex_core::money::{parse_usd, usd_with_micro};
use aex_proto::v1 as pb;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
pub use view::agent_json;
use view::{caps_text, expires, limit, models_text, remaining};
pub(super) use view::{write_inspect, write_list};

#[derive(Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    Execution,
    ReadOnly,
}

impl From<ScopeArg> for pb::Scope {
    fn from(s: ScopeArg) -> Self {
        match s {
            ScopeArg::Execution => pb::Scope::Execution,
            ScopeArg::ReadOnly => pb::Scope::ReadOnly,
        }
    }
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Create an agent and print its token (shown this once).
    Create(CreateArgs),
    /// List agents.
    List {
        /// Include deleted agents (tombstones).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one agent in full (never its token).
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Issue a new token; the old one stops working at once.
    RotateToken {
        name: String,
        /// Lifetime of the new token (30m, 24h, 7d, a number of hours, or never).
        /// Default: the agent's current policy.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change limits, budget or policy.
    Update(UpdateArgs),
    /// Refuse the agent's requests until resumed.
    Pause {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Let a paused agent make requests again.
    Resume {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Pause the agent and kill its supervised processes (`aexctl run`).
    Kill {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete the agent: its token stops working; its history stays in the ledger.
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    name: String,
    /// Budget in USD, up to 6 decimals (e.g. 5, 1.2, 0.004).
    #[arg(allow_hyphen_values = true)]
    budget_usd: String,
    /// Requests per minute.
    rpm: u32,
    /// Models the agent may use, comma-separated (default: all configured).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    allowed_models: Vec<String>,
    /// Tokens per minute (default: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    tpm: u64,
    /// Requests in flight at once (default: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_concurrent: u32,
    /// Refuse `stream: true`.
    #[arg(long)]
    no_streaming: bool,
    /// Refuse requests that carry `tools`.
    #[arg(long)]
    no_tools: bool,
    /// Refuse `functions`, `function_call` and `tool_choice`.
    #[arg(long)]
    no_function_calling: bool,
    /// Allow image inputs.
    #[arg(long)]
    allow_vision: bool,
    /// Token lifetime (30m, 24h, 7d, a number of hours; default: never expires).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    #[arg(long, value_enum, default_value = "execution")]
    scope: ScopeArg,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UpdateArgs {
    name: String,
    /// Set the budget (USD).
    #[arg(long, value_name = "USD", allow_hyphen_values = true)]
    budget: Option<String>,
    /// Add to the budget (USD).
    #[arg(long, value_name = "USD", allow_hyphen_values = true)]
    top_up: Option<String>,
    #[arg(long, value_name = "N")]
    rpm: Option<u32>,
    /// Tokens per minute; 0 = no limit.
    #[arg(long, value_name = "N")]
    tpm: Option<u64>,
    /// 0 = no limit.
    #[arg(long, value_name = "N")]
    max_concurrent: Option<u32>,
    /// Replace the allow-list, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "A,B",
        conflicts_with = "all_models"
    )]
    allowed_models: Option<Vec<String>>,
    /// Allow every configured model.
    #[arg(long)]
    all_models: bool,
    #[arg(long, value_name = "BOOL")]
    streaming: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    tools: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    function_calling: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    vision: Option<bool>,
    #[arg(long, value_enum)]
    scope: Option<ScopeArg>,
    #[arg(long)]
    json: bool,
}

fn budget_arg(what: &str, text: &str) -> Result<i64> {
    parse_usd(text).map_err(|e| CliError::Failed(format!("invalid {what}: {e}")))
}

pub async fn run(home: &Home, control: &str, cmd: AgentCommand) -> Result<()> {
    // Parse everything the server cannot check before connecting, so a bad
    // budget is reported as such even when the daemon is down.
    match cmd {
        AgentCommand::Create(args) => create(home, control, args).await,
        AgentCommand::List { all, json } => {
            let mut admin = Admin::connect(home, control).await?;
            let agents = admin
                .agents
                .list_agents(pb::ListAgentsRequest {
                    include_deleted: all,
                })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner()
                .agents;
            if json {
                print_json(&json!(agents.iter().map(agent_json).collect::<Vec<_>>()));
            } else {
                print!("{}", rendered(|out| write_list(out, &agents)));
            }
            Ok(())
        }
        AgentCommand::Inspect { name, json } => {
            let mut admin = Admin::connect(home, control).await?;
            let agent = admin
                .agents
                .get_agent(pb::AgentRef { name })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            if json {
                print_json(&agent_json(&agent));
            } else {
                print!("{}", rendered(|out| write_inspect(out, &agent)));
            }
            Ok(())
        }
        AgentCommand::RotateToken { name, ttl, json } => {
            let ttl_seconds = ttl.as_deref().map(parse_ttl).transpose()?;
            let mut admin = Admin::connect(home, control).await?;
            let out = admin
                .agents
                .rotate_token(pb::RotateTokenRequest { name, ttl_seconds })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            let agent = out.agent.unwrap_or_default();
            if json {
                print_json(&json!({ "agent": agent_json(&agent), "token": out.token }));
            } else {
                println!(
                    "Token rotated for agent '{}'. The old token no longer works.",
                    agent.name
                );
                println!("New Token: {}", out.token);
                println!("  (shown once: store it now)");
                println!("Expires:   {}", expires(&agent));
            }
            Ok(())
        }
        AgentCommand::Update(args) => update(home, control, args).await,
        AgentCommand::Pause { name, json } => {
            state_change(home, control, name, json, "paused", |mut a, r| async move {
                a.agents.pause_agent(r).await.map_err(|s| a.status(s))
            })
            .await
        }
        AgentCommand::Resume { name, json } => {
            state_change(
                home,
                control,
                name,
                json,
                "resumed",
                |mut a, r| async move { a.agents.resume_agent(r).await.map_err(|s| a.status(s)) },
            )
            .await
        }
        AgentCommand::Kill { name, json } => {
            let mut admin = Admin::connect(home, control).await?;
            let out = admin
                .agents
                .kill_agent(pb::AgentRef { name })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            let agent = out.agent.unwrap_or_default();
            if json {
                print_json(
                    &json!({ "agent": agent_json(&agent), "processes_signalled": out.processes_signalled }),
                );
            } else {
                println!(
                    "Agent '{}' killed: paused, and {} supervised process(es) told to terminate.",
                    agent.name, out.processes_signalled
                );
                println!("Resume it with `aexctl agent resume {}`.", agent.name);
            }
            Ok(())
        }
        AgentCommand::Delete { name, json } => {
            state_change(
                home,
                control,
                name,
                json,
                "deleted",
                |mut a, r| async move { a.agents.delete_agent(r).await.map_err(|s| a.status(s)) },
            )
            .await
        }
    }
}

async fn state_change<F, Fut>(
    home: &Home,
    control: &str,
    name: String,
    json: bool,
    verb: &str,
    call: F,
) -> Result<()>
where
    F: FnOnce(Admin, pb::AgentRef) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<pb::Agent>>>,
{
    let admin = Admin::connect(home, control).await?;
    let agent = call(admin, pb::AgentRef { name }).await?.into_inner();
    if json {
        print_json(&agent_json(&agent));
    } else {
        println!("Agent '{}' {verb}.", agent.name);
        if verb == "deleted" {
            println!(
                "Its token no longer works; its history stays in the ledger (spent {}).",
                usd_with_micro(agent.spent_micro)
            );
        }
    }
    Ok(())
}

async fn create(home: &Home, control: &str, a: CreateArgs) -> Result<()> {
    let budget_micro = budget_arg("budget", &a.budget_usd)?;
    let ttl_seconds = a.ttl.as_deref().map(parse_ttl).transpose()?.unwrap_or(0);
    let mut admin = Admin::connect(home, control).await?;
    let request = pb::CreateAgentRequest {
        name: a.name,
        budget_micro,
        rpm: a.rpm,
        tpm: a.tpm,
        max_concurrent: a.max_concurrent,
        allowed_models: a.allowed_models,
        capabilities: Some(pb::Capabilities {
            streaming: !a.no_streaming,
            tools: !a.no_tools,
            function_calling: !a.no_function_calling,
            vision: a.allow_vision,
        }),
        ttl_seconds,
        scope: pb::Scope::from(a.scope) as i32,
    };
    let out = admin
        .agents
        .create_agent(request)
        .await
        .map_err(|s| admin.status(s))?
        .into_inner();
    let agent = out.agent.unwrap_or_default();
    if a.json {
        print_json(&json!({ "agent": agent_json(&agent), "token": out.token }));
        return Ok(());
    }
    println!("Agent '{}' created.", agent.name);
    println!("Token: {}", out.token);
    println!(
        "  (shown once: store it now; `aexctl agent rotate-token {}` issues a new one)",
        agent.name
    );
    println!("Budget: {}", usd_with_micro(agent.budget_micro));
    println!("RPM: {}", agent.rpm);
    println!("Models: {}", models_text(&agent));
    println!("Capabilities: {}", caps_text(&agent));
    println!("Expires: {}", expires(&agent));
    Ok(())
}

async fn update(home: &Home, control: &str, a: UpdateArgs) -> Result<()> {
    let budget_micro = a
        .budget
        .as_deref()
        .map(|b| budget_arg("--budget", b))
        .transpose()?;
    let top_up_micro = a
        .top_up
        .as_deref()
        .map(|b| budget_arg("--top-up", b))
        .transpose()?;
    if top_up_micro == Some(0) {
        return Err(CliError::Failed(
            "invalid --top-up: it must add more than $0".into(),
        ));
    }
    let allowed_models = if a.all_models {
        Some(pb::StringList { values: vec![] })
    } else {
        a.allowed_models.map(|values| pb::StringList { values })
    };
    let request = pb::UpdateAgentRequest {
        name: a.name,
        budget_micro,
        top_up_micro,
        rpm: a.rpm,
        tpm: a.tpm,
        max_concurrent: a.max_concurrent,
        allowed_models,
        streaming: a.streaming,
        tools: a.tools,
        function_calling: a.function_calling,
        vision: a.vision,
        scope: a.scope.map(|s| pb::Scope::from(s) as i32).unwrap_or(0),
    };
    let mut admin = Admin::connect(home, control).await?;
    let agent = admin
        .agents
        .update_agent(request)
        .await
        .map_err(|s| admin.status(s))?
        .into_inner();
    if a.json {
        print_json(&agent_json(&agent));
    } else {
        println!("Agent '{}' updated.", agent.name);
        println!("Budget:    {}", usd_with_micro(agent.budget_micro));
        println!("Remaining: {}", usd_with_micro(remaining(&agent)));
        println!(
            "RPM: {}  TPM: {}  Concurrency: {}",
            agent.rpm,
            limit(agent.tpm),
            limit(u64::from(agent.max_concurrent))
        );
        println!("Models: {}", models_text(&agent));
        println!("Capabilities: {}", caps_text(&agent));
    }
    Ok(())
}
