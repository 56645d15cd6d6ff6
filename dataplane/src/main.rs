//! Placeholder binary until the pingora proxy lands (issue #3): it answers
//! `--version` and otherwise says plainly that it cannot serve yet.

fn main() -> std::process::ExitCode {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("aex-dataplane {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    eprintln!("aex-dataplane: the OpenAI-compatible proxy is not part of this build yet");
    std::process::ExitCode::from(1)
}
