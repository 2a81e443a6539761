//! `kiwispray-hosts`: the operator's CLI. Everything is in
//! [`kiwispray::cli`]; this only hands it the command line.

fn main() -> std::process::ExitCode {
    kiwispray::cli::run(std::env::args_os().collect())
}
