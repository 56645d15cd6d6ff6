use crate::error::{CliError, Result};
use crate::output::print_json;
use aex_core::config::ModelsConfig;
use aex_core::home::Home;

#[derive(clap::Args)]
pub struct Args {
    /// Replace models.yaml and the gRPC credentials with fresh defaults.
    /// The ledger key and .env are always kept.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(home: &Home, args: Args) -> Result<()> {
    if !args.json {
        println!("Initializing AEX in {}...", home.root().display());
    }
    let report = home.init(args.force)?;
    let config = ModelsConfig::load(&home.models_yaml()).map_err(|e| {
        CliError::Failed(format!(
            "{e}\nFix the file, or run `aexctl init --force` to restore the default."
        ))
    })?;
    // The control plane's binary owns the database and its migrations.
    let migrated = tokio::process::Command::new(crate::commands::daemon::binary("aex-control"))
        .arg("migrate")
        .arg("--home")
        .arg(home.root())
        .output()
        .await
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot run aex-control to create {}: {e} (install aex-control next to aexctl or on PATH)",
                home.db_path().display()
            ))
        })?;
    if !migrated.status.success() {
        return Err(CliError::Failed(format!(
            "cannot create {}: {}",
            home.db_path().display(),
            String::from_utf8_lossy(&migrated.stderr).trim()
        )));
    }
    let name = |p: &std::path::PathBuf| {
        p.strip_prefix(home.root())
            .unwrap_or(p)
            .display()
            .to_string()
    };
    if args.json {
        print_json(&serde_json::json!({
            "home": home.root(),
            "created": report.created.iter().map(name).collect::<Vec<_>>(),
            "replaced": report.replaced.iter().map(name).collect::<Vec<_>>(),
            "kept": report.kept.iter().map(name).collect::<Vec<_>>(),
            "database": home.db_path(),
            "models": config.models.keys().collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    for p in &report.created {
        println!("  created   {}", name(p));
    }
    for p in &report.replaced {
        println!("  replaced  {}", name(p));
    }
    for p in &report.kept {
        println!("  kept      {}", name(p));
    }
    println!(
        "Config: {} model(s): {}",
        config.models.len(),
        config.models.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    println!("Database initialized: {}", home.db_path().display());
    if !report.kept.is_empty() && !args.force {
        println!(
            "Existing files were kept; `aexctl init --force` resets models.yaml and the credentials."
        );
    }
    println!("AEX initialized successfully.");
    Ok(())
}
