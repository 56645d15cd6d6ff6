use crate::client::Admin;
use crate::error::Result;
use crate::output::{print_json, rfc3339, table};
use aex_core::home::Home;
use aex_core::money::PicoPerToken;
use aex_proto::v1 as pb;
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Show the running model configuration.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Re-read models.yaml; an invalid file leaves the running config in place.
    Reload {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(home: &Home, control: &str, cmd: ModelsCommand) -> Result<()> {
    let mut admin = Admin::connect(home, control).await?;
    match cmd {
        ModelsCommand::List { json } => {
            let config = admin
                .models
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(|s| admin.status(s))?
                .into_inner();
            if json {
                print_json(&config_json(&config));
            } else {
                print_config(&config);
            }
        }
        ModelsCommand::Reload { json } => {
            let config = admin
                .models
                .reload_models(pb::ReloadModelsRequest {})
                .await
                .map_err(|s| {
                    let mut e = admin.status(s);
                    if let crate::error::CliError::Failed(m) = &mut e {
                        m.push_str("\nThe running configuration was left unchanged.");
                    }
                    e
                })?
                .into_inner();
            if json {
                print_json(&config_json(&config));
            } else {
                println!(
                    "Model configuration reloaded successfully: {} model(s) from {}.",
                    config.models.len(),
                    config.source_path
                );
            }
        }
    }
    Ok(())
}

fn provider_type(p: &pb::Provider) -> &'static str {
    match p.r#type() {
        pb::ProviderType::Simulated => "simulated",
        _ => "openai_compatible",
    }
}

fn config_json(c: &pb::ModelConfig) -> serde_json::Value {
    json!({
        "source": c.source_path,
        "digest": c.digest,
        "loaded_at": rfc3339(c.loaded_at_ms),
        "default_model": c.default_model,
        "providers": c.providers.iter().map(|p| json!({
            "name": p.name,
            "type": provider_type(p),
            "base_url": p.base_url,
            "api_key_env": p.api_key_env,
        })).collect::<Vec<_>>(),
        "models": c.models.iter().map(|m| json!({
            "name": m.name,
            "provider": m.provider,
            "provider_model": m.provider_model,
            "input_pico_per_token": m.input_pico_per_token,
            "cached_input_pico_per_token": m.cached_input_pico_per_token.unwrap_or(m.input_pico_per_token),
            "cache_write_pico_per_token": m.cache_write_pico_per_token.unwrap_or(m.input_pico_per_token),
            "output_pico_per_token": m.output_pico_per_token,
            "max_tokens": m.max_tokens,
            "max_tokens_per_minute": m.max_tokens_per_minute,
            "capabilities": { "reasoning": m.reasoning, "tools": m.tools, "vision": m.vision },
            "default": m.name == c.default_model,
        })).collect::<Vec<_>>(),
    })
}

fn print_config(c: &pb::ModelConfig) {
    let mut t = table(&[
        "Model",
        "Provider",
        "Provider Model",
        "Input",
        "Cached Input",
        "Cache Write",
        "Output",
        "Max Tokens",
        "Tools",
        "Vision",
    ]);
    for m in &c.models {
        let name = if m.name == c.default_model {
            format!("{} (default)", m.name)
        } else {
            m.name.clone()
        };
        t.add_row(vec![
            name,
            m.provider.clone(),
            m.provider_model.clone(),
            PicoPerToken(m.input_pico_per_token).to_string(),
            PicoPerToken(
                m.cached_input_pico_per_token
                    .unwrap_or(m.input_pico_per_token),
            )
            .to_string(),
            PicoPerToken(
                m.cache_write_pico_per_token
                    .unwrap_or(m.input_pico_per_token),
            )
            .to_string(),
            PicoPerToken(m.output_pico_per_token).to_string(),
            m.max_tokens.to_string(),
            if m.tools { "yes" } else { "no" }.into(),
            if m.vision { "yes" } else { "no" }.into(),
        ]);
    }
    println!("Models ({})", c.source_path);
    println!("{t}");
    let mut p = table(&["Provider", "Type", "Base URL", "Key Variable"]);
    for pr in &c.providers {
        p.add_row(vec![
            pr.name.clone(),
            provider_type(pr).into(),
            if pr.base_url.is_empty() {
                "(built in)".into()
            } else {
                pr.base_url.clone()
            },
            if pr.api_key_env.is_empty() {
                "(none needed)".into()
            } else {
                pr.api_key_env.clone()
            },
        ]);
    }
    println!("{p}");
}
