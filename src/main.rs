//! The `meshguard` executable; the command line itself is `meshguard::cli`.

fn main() -> std::process::ExitCode {
    meshguard::cli::main()
}
