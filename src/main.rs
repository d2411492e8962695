fn main() -> std::process::ExitCode {
    sd_studio::cli::main()
}
