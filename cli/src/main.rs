fn main() -> std::process::ExitCode {
    aexctl::main()
}
