//! `flare`: the command-line front end of the flare library.
//!
//! The binary is thin: it parses arguments, validates them, calls the library and reports.
//! Each subcommand lives in its own module (`bench`, `generate_cmd`, `info`; `train`, `merge`
//! and `demo` slot in beside them). Errors are `anyhow` here and only here; `main` prints the whole chain and
//! exits non-zero.

#![deny(missing_docs)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod device;
mod generate_cmd;
mod info;
mod report;
mod train;

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
    /// LoRA fine-tune a model on JSONL data (flags and/or --config file.toml).
    Train(Box<train::TrainArgs>),
    /// Merge an adapter into its base model and write a Hugging Face model directory.
    Merge(train::MergeArgs),
    /// Fine-tune the bundled tiny model on the bundled data and show answers before and after.
    Demo(demo::DemoArgs),
    /// Generate text with a Hugging Face model directory, streaming it to stdout.
    #[command(long_about = generate_cmd::GENERATE_LONG_ABOUT)]
    Generate(generate_cmd::GenerateArgs),
    /// Describe a model directory: architecture, sizes, weights, tokenizer, chat template,
    /// generation config, adapters.
    Info(info::InfoArgs),
}

/// The subcommands of `flare bench`.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time flare's ops against Candle's equivalents (forward, and forward+backward).
    #[command(long_about = bench::ops::OPS_LONG_ABOUT)]
    Ops(bench::ops::OpsArgs),
    /// Time the pieces of one dispatch (kernel launch, allocation, cuBLASLt call, whole ops)
    /// on a CUDA device, to explain the dispatch-bound rows of `bench ops`.
    Floors(bench::floors::FloorsArgs),
    /// Time the fused LoRA linear against the plain linear and the unfused Candle composite,
    /// with each case's peak device memory.
    #[command(long_about = bench::lora::LORA_LONG_ABOUT)]
    Lora(bench::lora::LoraArgs),
    /// Time prefill and greedy decoding of a model with random weights (Qwen2-0.5B shape by
    /// default) against the weight-read floor.
    #[command(long_about = bench::decode::DECODE_LONG_ABOUT)]
    Decode(bench::decode::DecodeArgs),
    /// LoRA training throughput (Qwen2-0.5B shape, random weights): tokens/s, peak memory and
    /// a per-phase breakdown, in bench/anchor_train.py's rows.
    Train(bench::train::TrainBenchArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(BenchCommand::Ops(args)) => bench::ops::run_ops(&args),
        Command::Bench(BenchCommand::Floors(args)) => bench::floors::run_floors(&args),
        Command::Bench(BenchCommand::Lora(args)) => bench::lora::run_lora(&args),
        Command::Bench(BenchCommand::Decode(args)) => bench::decode::run_decode(&args),
        Command::Generate(args) => generate_cmd::run_generate(&args),
        Command::Info(args) => info::run_info(&args),
        Command::Bench(BenchCommand::Train(args)) => bench::train::run_train_bench(&args),
        Command::Train(args) => train::run_train(&args),
        Command::Merge(args) => train::run_merge(&args),
        Command::Demo(args) => demo::run_demo(&args),
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
        let Command::Bench(BenchCommand::Ops(a)) = cli.command else {
            panic!("expected bench ops");
        };
        assert_eq!(a.device, "cuda:1");
        assert!(a.quick);
        assert_eq!(a.filter.as_deref(), Some("softmax"));
        assert_eq!(a.repeats, Some(7));
        assert_eq!(a.json.as_deref(), Some(std::path::Path::new("out.json")));
    }

    #[test]
    fn default_device_is_cpu() {
        let cli = Cli::try_parse_from(["flare", "bench", "ops"]).unwrap();
        let Command::Bench(BenchCommand::Ops(a)) = cli.command else {
            panic!("expected bench ops");
        };
        assert_eq!(a.device, "cpu");
        assert!(!a.quick);
    }

    #[test]
    fn parses_bench_lora() {
        let cli = Cli::try_parse_from([
            "flare",
            "bench",
            "lora",
            "--device",
            "cuda",
            "--tokens",
            "128",
            "--in",
            "64",
            "--out",
            "32",
            "--r",
            "4",
            "--torch-json",
            "t.json",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::Lora(a)) = cli.command else {
            panic!("expected bench lora");
        };
        assert_eq!(a.device, "cuda");
        assert_eq!(
            (a.tokens, a.in_features, a.out_features, a.r),
            (Some(128), Some(64), Some(32), Some(4))
        );
        assert_eq!(
            a.torch_json.as_deref(),
            Some(std::path::Path::new("t.json"))
        );
        assert!(Cli::try_parse_from(["flare", "bench", "lora", "--r", "0"]).is_err());
    }

    #[test]
    fn parses_bench_decode() {
        let cli = Cli::try_parse_from([
            "flare",
            "bench",
            "decode",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--prompt-len",
            "64",
            "--new-tokens",
            "8",
            "--batch",
            "1,4",
            "--quick",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::Decode(a)) = cli.command else {
            panic!("expected bench decode");
        };
        assert_eq!((a.prompt_len, a.new_tokens), (64, 8));
        assert_eq!(a.batch, vec![1, 4]);
        assert!(a.quick && a.dtype.as_deref() == Some("f32"));
        assert!(Cli::try_parse_from(["flare", "bench", "decode", "--new-tokens", "0"]).is_err());
    }

    #[test]
    fn parses_train_with_flags_over_config() {
        let dir = std::env::temp_dir().join(format!("flare-cli-train-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("run.toml");
        std::fs::write(
            &toml,
            "model = \"m\"\ndata = \"d.jsonl\"\nlr = 0.001\nlora_r = 4\nbatch_size = 2\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "flare",
            "train",
            "--config",
            toml.to_str().unwrap(),
            "--lr",
            "0.01",
            "--target-modules",
            "q_proj,v_proj",
            "--schedule",
            "linear",
            "--max-grad-norm",
            "0",
            "--resume",
        ])
        .unwrap();
        let Command::Train(a) = cli.command else {
            panic!("expected train");
        };
        assert_eq!(a.resume.as_deref(), Some(std::path::Path::new("latest")));
        let cfg = train::build_config(&a).unwrap();
        assert_eq!(cfg.lr, 0.01); // the flag wins
        assert_eq!(cfg.lora_r, 4); // from the file
        assert_eq!(cfg.batch_size, 2);
        assert_eq!(cfg.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(cfg.schedule, flare::train::Schedule::Linear);
        assert_eq!(cfg.max_grad_norm, None);
        // A key the config does not know is an error naming it.
        std::fs::write(&toml, "model = \"m\"\nlearning_rate = 1\n").unwrap();
        let cli =
            Cli::try_parse_from(["flare", "train", "--config", toml.to_str().unwrap()]).unwrap();
        let Command::Train(a) = cli.command else {
            panic!("expected train");
        };
        let e = format!("{:#}", train::build_config(&a).unwrap_err());
        assert!(e.contains("learning_rate"), "{e}");
        // No data: a clear error.
        let cli = Cli::try_parse_from(["flare", "train", "--model", "m"]).unwrap();
        let Command::Train(a) = cli.command else {
            panic!("expected train");
        };
        assert!(train::build_config(&a)
            .unwrap_err()
            .to_string()
            .contains("no data"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_merge_demo_and_bench_train() {
        let cli = Cli::try_parse_from([
            "flare",
            "merge",
            "--model",
            "m",
            "--adapter",
            "a",
            "--out",
            "o",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Merge(_)));
        let cli = Cli::try_parse_from(["flare", "demo", "--steps", "10"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("expected demo");
        };
        assert_eq!((d.steps, d.device.as_str()), (10, "cpu"));
        let cli = Cli::try_parse_from(["flare", "bench", "train", "--quick"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Bench(BenchCommand::Train(ref t)) if t.quick
        ));
    }

    #[test]
    fn rejects_zero_repeats() {
        assert!(Cli::try_parse_from(["flare", "bench", "ops", "--repeats", "0"]).is_err());
    }
}
