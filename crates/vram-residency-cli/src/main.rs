//! `vram-residency`: the command-line tool.
//!
//! Subcommands: `digest` (fs-verity digests, same output as `fsverity digest`), `inspect` (a model's
//! tensor table), `devices` (GPUs and the policy verdict), `seal` (seal a model file and print its seal
//! record), `demo` (the whole story in one run), `bench` (throughput against the seed and the
//! hardware), `serve` (the worker service), `audit verify` and `attest verify` (offline checks). See the
//! README and `docs/`.

mod backends;
mod bench;
mod cli;
mod demo;
mod devices;
mod inspect;
mod offline;
mod progress;
mod serve;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
