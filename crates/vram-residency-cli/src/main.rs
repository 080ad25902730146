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
    quiet_broken_pipe();
    let args = cli::Cli::parse();
    init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", cli::error_chain(&error));
            ExitCode::from(cli::exit_status(&error))
        }
    }
}

/// Ends the process quietly when stdout's reader has gone away (`vram-residency inspect M | head`).
/// Rust ignores SIGPIPE, so a write to a closed pipe fails with EPIPE and `println!` panics; a shell
/// tool would have died of SIGPIPE instead. This hook turns exactly that panic into the same exit
/// status (141 = 128 + SIGPIPE) without a message; every other panic keeps the default report.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory (os error 2)",
        );
        let inner = vram_residency::VramError::Io {
            path: "model.bin".into(),
            source: io,
        };
        let error = anyhow::Error::new(inner).context("sealing model.bin");
        assert_eq!(
            crate::cli::error_chain(&error),
            "sealing model.bin: reading model.bin: No such file or directory (os error 2)"
        );
    }
}
