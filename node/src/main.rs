fn main() -> std::process::ExitCode {
    smarthost_node::cli::main()
}
