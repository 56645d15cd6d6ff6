fn main() -> std::process::ExitCode {
    // `daemon start` creates the logs and run files; `init` the home.
    aex_core::home::create_files_private();
    aexctl::main()
}
