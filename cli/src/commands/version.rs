use crate::error::Result;
use crate::output::print_json;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    if args.json {
        print_json(&serde_json::json!({ "version": version }));
    } else {
        println!("AEX {version}");
    }
    Ok(())
}
