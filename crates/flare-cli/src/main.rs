//! `flare`: the command-line front end of the flare library.
//!
//! The binary is thin: it parses arguments, validates them, calls the library and reports.
//! Each subcommand lives in its own module (`bench`, `generate_cmd`, `info`; `train`, `merge`
//! and `demo` slot in beside them). Errors are `anyhow` here and only here; `main` prints the
//! whole chain, each message once, and exits non-zero. Diagnostics go through
//! [`output::elog`], which never panics on a closed or full stderr.

#![deny(missing_docs)]

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod bench;
mod demo;
mod device;
mod generate_cmd;
mod info;
mod launch;
mod output;
mod report;
mod train;

use output::elog;

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
    /// LoRA training throughput of a model shape (a preset or a config.json; random weights):
    /// tokens/s, MFU, peak memory, a per-phase breakdown and the longest batch-1 context, in
    /// bench/anchor_train.py's rows.
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

/// The lines that report an error: `error: <message>`, then `  caused by: <source>` for each
/// source in the chain whose text is not already part of a line above. Many errors embed
/// their source in their own message (`reading x: No such file or directory`) and also
/// return it as `source()`: printed naively, every such cause would appear twice.
fn error_lines(e: &anyhow::Error) -> Vec<String> {
    let mut shown = vec![e.to_string()];
    let mut lines = vec![format!("error: {e}")];
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if shown.iter().any(|s| s.contains(&text)) {
            continue;
        }
        lines.push(format!("  caused by: {text}"));
        shown.push(text);
    }
    lines
}

fn main() -> ExitCode {
    device::pin_cpu_threads();
    // `flare train --help` shows the defaults of the library's TrainConfig.
    let cmd = Cli::command().mut_subcommand("train", train::show_defaults);
    let cli = match cmd
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        // Prints the message (or the help) and exits; a failed write there does not panic.
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in error_lines(&e) {
                elog!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn train_args(args: &[&str]) -> train::TrainArgs {
        let mut argv = vec!["flare", "train"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Train(a) => *a,
            _ => panic!("expected train"),
        }
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("flare-cli-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn toml_keys_are_the_long_flags_and_paths_resolve_against_the_file() {
        let dir = TempDir::new("toml-keys");
        let sub = dir.0.join("runs");
        std::fs::create_dir_all(&sub).unwrap();
        let toml = sub.join("run.toml");
        std::fs::write(
            &toml,
            "model = \"/abs/model\"\ndata = \"data/train.jsonl\"\neval-data = \"eval.jsonl\"\n\
             output_dir = \"out\"\nskip_bad_lines = true\nlora-alpha = 8\nadam_beta2 = 0.95\n\
             append_eos = false\ntarget_modules = [\"q_proj\", \"v_proj\"]\nmax_steps = 7\n\
             max_grad_norm = 0.5\nresume = \"latest\"\nlog_every = 3\n",
        )
        .unwrap();
        let a = train_args(&["--config", toml.to_str().unwrap()]);
        let c = train::build_config(&a).unwrap();
        // Relative paths are the file's directory's, whatever the working directory.
        assert_eq!(c.model, std::path::Path::new("/abs/model"));
        assert_eq!(c.data, sub.join("data/train.jsonl"));
        assert_eq!(c.eval_data, Some(sub.join("eval.jsonl")));
        assert_eq!(c.output_dir, sub.join("out"));
        assert_eq!(c.bad_lines, flare::train::BadLines::Skip);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.beta2, 0.95);
        assert!(!c.append_eos);
        assert_eq!(c.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!((c.max_steps, c.max_grad_norm), (Some(7), Some(0.5)));
        // The run's own switches come from the file too; `latest` is no path; flags win.
        let e = train::effective_args(&a).unwrap();
        assert_eq!(e.resume.as_deref(), Some(std::path::Path::new("latest")));
        assert_eq!(e.log_every, Some(3));
        let a = train_args(&[
            "--config",
            toml.to_str().unwrap(),
            "--log-every",
            "5",
            "--resume",
            "ckpt",
            "--data",
            "d.jsonl",
        ]);
        let e = train::effective_args(&a).unwrap();
        assert_eq!(e.log_every, Some(5));
        assert_eq!(e.resume.as_deref(), Some(std::path::Path::new("ckpt")));
        assert_eq!(e.data.as_deref(), Some(std::path::Path::new("d.jsonl")));
        assert!(e.skip_bad_lines);
        std::fs::write(&toml, "resume = \"checkpoint-4\"\n").unwrap();
        let a = train_args(&["--config", toml.to_str().unwrap()]);
        let e = train::effective_args(&a).unwrap();
        assert_eq!(e.resume, Some(sub.join("checkpoint-4")));

        // Every long flag but --config is a key, in either spelling.
        use clap::CommandFactory;
        let cmd = Cli::command();
        let train = cmd.find_subcommand("train").unwrap();
        for arg in train.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "help"].contains(&long) {
                continue;
            }
            let value = match arg.get_action() {
                clap::ArgAction::SetTrue => "true".to_string(),
                _ if long == "target-modules" => "[\"q_proj\"]".to_string(),
                _ if ["append-eos", "packing"].contains(&long) => "false".to_string(),
                _ if long == "schedule" => "\"linear\"".to_string(),
                _ if long == "dtype" => "\"bf16\"".to_string(),
                _ if long == "gradient-checkpointing" => "\"on\"".to_string(),
                _ if arg.get_value_hint() != clap::ValueHint::Unknown
                    || ["device"].contains(&long) =>
                {
                    "\"cpu\"".to_string()
                }
                _ => "1".to_string(),
            };
            for key in [long.to_string(), long.replace('-', "_")] {
                std::fs::write(&toml, format!("{key} = {value}\n")).unwrap();
                let a = train_args(&["--config", toml.to_str().unwrap()]);
                let e = train::build_config(&a).err().map(|e| format!("{e:#}"));
                // It may fail for lack of --model/--data, never for the key.
                if let Some(e) = e {
                    assert!(
                        e.starts_with("no model") || e.starts_with("no data"),
                        "{key}: {e}"
                    );
                }
            }
        }

        // An unknown key, a key set twice, a bad value, a table: the file, line and key.
        for (text, needles) in [
            (
                "lr = 0.1\nbad_lines = \"skip\"\n",
                vec!["run.toml:2", "`bad_lines`"],
            ),
            (
                "lr = 0.1\n\nlearning_rate = 1\n",
                vec!["run.toml:3", "`learning_rate`"],
            ),
            (
                "lora_r = 2\nlora-r = 3\n",
                vec!["run.toml:2", "`lora-r`", "`lora_r`"],
            ),
            (
                "model = \"m\"\nlora_r = \"big\"\n",
                vec!["run.toml:2", "`lora_r`", "big"],
            ),
            ("config = \"other.toml\"\n", vec!["run.toml:1", "`config`"]),
            ("[train]\nlr = 1\n", vec!["run.toml:1", "`train`", "table"]),
            ("lr = \n", vec!["run.toml"]),
        ] {
            std::fs::write(&toml, text).unwrap();
            let a = train_args(&["--config", toml.to_str().unwrap(), "--model", "m"]);
            let e = format!("{:#}", train::build_config(&a).unwrap_err());
            for n in needles {
                assert!(e.contains(n), "{text:?}: {n:?} not in {e}");
            }
        }
    }

    #[test]
    fn negative_numbers_reach_the_real_check() {
        for (flag, value, needle) in [
            ("--lr", "-1", "lr must be > 0"),
            ("--lora-alpha", "-5", "alpha must be finite and > 0"),
            ("--weight-decay", "-1", "weight_decay must be >= 0"),
            ("--lora-dropout", "-0.5", "dropout must be in [0, 1)"),
            ("--eval-fraction", "-0.1", "eval_fraction must be in [0, 1)"),
            (
                "--max-grad-norm",
                "-1",
                "--max-grad-norm must be a finite number >= 0",
            ),
        ] {
            let joined = format!("{flag}={value}");
            for args in [
                vec!["--model", "m", "--data", "d", flag, value],
                vec!["--model", "m", "--data", "d", &joined],
            ] {
                let a = train_args(&args);
                let e = format!("{:#}", train::build_config(&a).unwrap_err());
                assert!(e.contains(needle), "{args:?}: {e}");
            }
        }
        // Unsigned flags refuse a negative number as a value, not as an unknown argument.
        let e = Cli::try_parse_from(["flare", "train", "--lora-r", "-1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid value '-1' for '--lora-r"), "{e}");
        // 0 turns clipping off, explicitly.
        let a = train_args(&["--model", "m", "--data", "d", "--max-grad-norm", "0"]);
        assert_eq!(train::build_config(&a).unwrap().max_grad_norm, None);
        let a = train_args(&["--model", "m", "--data", "d"]);
        assert_eq!(train::build_config(&a).unwrap().max_grad_norm, Some(1.0));
    }

    #[test]
    fn an_error_chain_prints_each_message_once() {
        let a = train_args(&["--config", "/no/such/run.toml"]);
        let e = train::build_config(&a).unwrap_err();
        let lines = error_lines(&e);
        let all = lines.join("\n");
        assert_eq!(all.matches("No such file").count(), 1, "{all}");
        assert!(
            lines[0].starts_with("error: reading config /no/such/run.toml"),
            "{all}"
        );
        // A cause not contained in the message above it is still printed.
        let e = anyhow::anyhow!("disk on fire").context("saving the adapter");
        assert_eq!(
            error_lines(&e),
            vec!["error: saving the adapter", "  caused by: disk on fire"]
        );
    }

    #[test]
    fn train_help_shows_the_defaults() {
        let defaults = flare::train::TrainConfig::default();
        let mut cmd = Cli::command().mut_subcommand("train", train::show_defaults);
        let help = cmd
            .find_subcommand_mut("train")
            .unwrap()
            .render_help()
            .to_string();
        for needle in [
            format!("Peak learning rate [default: {}]", defaults.lr),
            format!("[default: {}]", defaults.output_dir.display()),
            format!("[default: {}]", defaults.batch_size),
            format!("[default: {}]", defaults.epochs),
            format!("[default: {}]", defaults.eval_every),
            format!("[default: {}]", defaults.save_every),
            format!("LoRA rank [default: {}]", defaults.lora_r),
            "[default: cosine]".to_string(),
            format!("[default: {}]", defaults.target_modules.join(",")),
        ] {
            assert!(help.contains(&needle), "{needle:?} not in\n{help}");
        }
    }

    #[test]
    fn the_readme_train_example_is_the_demo_recipe() {
        let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(readme).unwrap();
        let start = readme
            .find("flare train --model assets/demo/model")
            .expect("the README's example on the demo data");
        let mut words = Vec::new();
        for line in readme[start..].lines() {
            let line = line.trim();
            words.extend(line.trim_end_matches('\\').split_whitespace());
            if !line.ends_with('\\') {
                break;
            }
        }
        let cli = Cli::try_parse_from(&words).unwrap();
        let Command::Train(a) = cli.command else {
            panic!("expected train: {words:?}");
        };
        // The run `flare demo` checks (eval loss < 0.5 after 200 steps), plus checkpoints.
        let mut want = demo::recipe(
            std::path::Path::new("assets/demo"),
            "out".into(),
            200,
            "cpu",
        );
        want.save_every = 100;
        assert_eq!(train::build_config(&a).unwrap(), want);
    }

    #[test]
    fn the_readme_toml_example_is_valid() {
        let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(readme).unwrap();
        let start = readme.find("```toml\n").expect("the README's TOML example") + 8;
        let toml_text = &readme[start..start + readme[start..].find("```").unwrap()];
        let dir = TempDir::new("readme-toml");
        let runs = dir.0.join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        let file = runs.join("veloria.toml");
        std::fs::write(&file, toml_text).unwrap();
        let c = train::build_config(&train_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.model, runs.join("../assets/demo/model"));
        assert_eq!(c.data, runs.join("train.jsonl"));
        assert_eq!(c.output_dir, runs.join("out"));
        assert_eq!(c.bad_lines, flare::train::BadLines::Skip);
    }

    #[test]
    fn rejects_zero_repeats() {
        assert!(Cli::try_parse_from(["flare", "bench", "ops", "--repeats", "0"]).is_err());
    }
}
