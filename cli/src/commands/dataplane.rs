//! `aexctl dataplane credential create|list|revoke`: data-plane credentials
//! scoped to the agents a data plane serves (a sidecar's). A data plane
//! started with one (`aex-dataplane --dataplane-token-file F`) is shown only
//! those agents and may act for no other.

use crate::client::Admin;
use crate::error::Result;
use crate::output::{print_json, rendered, rfc3339, table};
use aex_core::home::Home;
use aex_proto::v1 as pb;
use clap::Subcommand;
use serde_json::json;
use std::fmt::Write as _;

#[derive(Subcommand)]
pub enum DataplaneCommand {
    /// Data-plane credentials scoped to some agents (for sidecars).
    #[command(subcommand)]
    Credential(CredentialCommand),
}

#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Issue a credential that serves only the named agents; its secret is
    /// printed once.
    Create {
        /// A name for it, e.g. the Pod's.
        name: String,
        /// The agents it serves, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List credentials (`--all` includes revoked ones).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a credential: refused at once by every control plane.
    Revoke {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(home: &Home, control: &str, cmd: DataplaneCommand) -> Result<()> {
    let DataplaneCommand::Credential(cmd) = cmd;
    let mut admin = Admin::connect(home, control).await?;
    match cmd {
        CredentialCommand::Create { name, agents, json } => {
            let out = admin
                .credentials
                .create_credential(pb::CreateCredentialRequest { name, agents })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            let c = out.credential.unwrap_or_default();
            if json {
                print_json(&json!({"credential": credential_json(&c), "secret": out.secret}));
                return Ok(());
            }
            println!(
                "Data-plane credential '{}' created; it serves: {}.",
                c.name,
                c.agents.join(", ")
            );
            println!("Secret: {}", out.secret);
            println!(
                "  (shown once: give it to the data plane in a file, `aex-dataplane \
                 --dataplane-token-file FILE`, or as AEX_DATAPLANE_TOKEN)"
            );
        }
        CredentialCommand::List { all, json } => {
            let list = admin
                .credentials
                .list_credentials(pb::ListCredentialsRequest {
                    include_revoked: all,
                })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner()
                .credentials;
            if json {
                print_json(&json!(list.iter().map(credential_json).collect::<Vec<_>>()));
            } else {
                print!("{}", rendered(|out| write_list(out, &list)));
            }
        }
        CredentialCommand::Revoke { name, json } => {
            let c = admin
                .credentials
                .revoke_credential(pb::RevokeCredentialRequest { name })
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            if json {
                print_json(&credential_json(&c));
            } else {
                println!(
                    "Data-plane credential '{}' revoked; data planes using it are refused from now on.",
                    c.name
                );
            }
        }
    }
    Ok(())
}

fn credential_json(c: &pb::Credential) -> serde_json::Value {
    json!({
        "id": c.id,
        "name": c.name,
        "secret_prefix": c.secret_prefix,
        "agents": c.agents,
        "created_at": rfc3339(c.created_at_ms),
        "revoked_at": (c.revoked_at_ms > 0).then(|| rfc3339(c.revoked_at_ms)),
    })
}

fn write_list(out: &mut String, list: &[pb::Credential]) -> std::fmt::Result {
    if list.is_empty() {
        return writeln!(
            out,
            "No data-plane credentials. Issue one with `aexctl dataplane credential create NAME --agents a,b`."
        );
    }
    let mut t = table(&["NAME", "SECRET", "AGENTS", "CREATED", "REVOKED"]);
    for c in list {
        t.add_row(vec![
            c.name.clone(),
            format!("{}…", c.secret_prefix),
            c.agents.join(", "),
            rfc3339(c.created_at_ms),
            if c.revoked_at_ms > 0 {
                rfc3339(c.revoked_at_ms)
            } else {
                "-".into()
            },
        ]);
    }
    writeln!(out, "{t}")
}
