//! `flare`: the command-line front end of the flare library.
//!
//! The binary is thin: it parses arguments, validates them, calls the library and reports.
//! Each subcommand lives in its own module (`bench` now; `train`, `generate`, `merge` and `demo`
//! slot in beside it). Errors are `anyhow` here and only here; `main` prints the whole chain and
//! exits non-zero.

#![deny(missing_docs)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod floors;

/// Fast LoRA fine-tuning and inference on Candle.
#[derive(Debug, Parser)]
#[command(
    name = "flare",
    version,
    about = "flare: fast LoRA fine-tuning and inference on Candle",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands of `flare`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks: time flare against Candle on the same inputs in the same process.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// The subcommands of `flare bench`.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time flare's ops against Candle's equivalents (forward, and forward+backward).
    #[command(long_about = bench::OPS_LONG_ABOUT)]
    Ops(bench::OpsArgs),
    /// Time the pieces of one dispatch (kernel launch, allocation, cuBLASLt call, whole ops)
    /// on a CUDA device, to explain the dispatch-bound rows of `bench ops`.
    Floors(floors::FloorsArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(BenchCommand::Ops(args)) => bench::run_ops(&args),
        Command::Bench(BenchCommand::Floors(args)) => floors::run_floors(&args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_bench_ops() {
        let cli = Cli::try_parse_from([
            "flare",
            "bench",
            "ops",
            "--device",
            "cuda:1",
            "--quick",
            "--filter",
            "softmax",
            "--repeats",
            "7",
            "--json",
            "out.json",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::Ops(a)) = cli.command;
        assert_eq!(a.device, "cuda:1");
        assert!(a.quick);
        assert_eq!(a.filter.as_deref(), Some("softmax"));
        assert_eq!(a.repeats, Some(7));
        assert_eq!(a.json.as_deref(), Some(std::path::Path::new("out.json")));
    }

    #[test]
    fn default_device_is_cpu() {
        let cli = Cli::try_parse_from(["flare", "bench", "ops"]).unwrap();
        let Command::Bench(BenchCommand::Ops(a)) = cli.command;
        assert_eq!(a.device, "cpu");
        assert!(!a.quick);
    }

    #[test]
    fn rejects_zero_repeats() {
        assert!(Cli::try_parse_from(["flare", "bench", "ops", "--repeats", "0"]).is_err());
    }
}
