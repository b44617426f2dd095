//! End-to-end runs of the `flare` binary on the qwen2 and llama fixture models of the flare
//! crate: `flare info` reports what the directory holds (the parameter count checked against the
//! config's arithmetic), and `flare generate` prints exactly what the library generates with the
//! same settings, reports its rates on stderr, and fails clearly on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use flare::generate::{generate_text, GenerationConfig, HfGenerationConfig, Prompt};
use flare::models::{load_peft_adapter, ModelConfig, Transformer};
use flare::text::{ChatMessage, Tokenizer};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../flare/tests/fixtures/models")
        .join(arch)
}

fn flare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(args)
        .output()
        .expect("running flare")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parameters of a Llama-family model from its config.
fn param_count(c: &ModelConfig) -> u64 {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let bias = |b: bool, n: usize| if b { n } else { 0 };
    let attn = h * q
        + bias(c.qkv_bias, q)
        + 2 * (h * kv + bias(c.qkv_bias, kv))
        + q * h
        + bias(c.o_bias, h);
    let mlp = 3 * h * i + bias(c.mlp_bias, 2 * i + h);
    let layer = attn + mlp + 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    (v * h + c.num_hidden_layers * layer + h + head) as u64
}

#[test]
fn info_describes_the_fixtures() {
    for (arch, name, template) in [
        ("qwen2", "Qwen2", "yes (tokenizer_config.json"),
        ("llama", "Llama", "yes (chat_template.jinja"),
    ] {
        let dir = fixture(arch);
        let o = flare(&["info", dir.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let c = ModelConfig::from_dir(&dir).unwrap();
        let want_params = param_count(&c);
        for line in [
            format!("architecture    {name}"),
            format!(
                "layers          {}, hidden {}, intermediate {}, vocab {}",
                c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
            ),
            format!("({want_params})"),
            "dtype on disk   BF16".to_string(),
            format!("chat template   {template}"),
            "tokenizer       vocab 256".to_string(),
            "adapter (LoRA r=4, alpha=8, 14 modules".to_string(),
        ] {
            assert!(out.contains(&line), "{arch}: {line:?} not in\n{out}");
        }
    }
    let o = flare(&["info", fixture("mistral").to_str().unwrap()]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("tokenizer       none"), "{out}");
    assert!(out.contains("adapters        none"), "{out}");

    let o = flare(&["info", "/no/such/model"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/model"), "{}", stderr(&o));
}

/// What the library generates for `prompt` with the fixture's generation_config.json, the
/// tokenizer's EOS as fallback, and `edit` applied.
fn library_text(
    arch: &str,
    adapter: bool,
    prompt: Prompt,
    edit: impl FnOnce(&mut GenerationConfig),
) -> String {
    let dir = fixture(arch);
    let mut model = Transformer::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    if adapter {
        load_peft_adapter(&mut model, dir.join("adapter"), "default").unwrap();
    }
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let ids = prompt.to_ids(&tok).unwrap();
    let mut cfg = GenerationConfig {
        max_new_tokens: 256,
        ..Default::default()
    };
    if let Some(f) = HfGenerationConfig::from_dir(&dir).unwrap() {
        f.apply(&mut cfg, ids.len());
    }
    if cfg.eos_token_ids.is_empty() {
        cfg.eos_token_ids.extend(tok.eos_token_id());
    }
    edit(&mut cfg);
    generate_text(&model, &tok, prompt, &cfg).unwrap().text
}

#[test]
fn generate_prints_what_the_library_generates() {
    let q = fixture("qwen2");
    let q = q.to_str().unwrap();

    // Plain prompt, greedy with the file's repetition penalty and EOS ids.
    let o = flare(&[
        "generate",
        "--model",
        q,
        "--prompt",
        "The quick brown fox",
        "-n",
        "12",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = library_text("qwen2", false, "The quick brown fox".into(), |c| {
        c.max_new_tokens = 12
    });
    assert_eq!(stdout(&o), format!("{want}\n"));
    let err = stderr(&o);
    assert!(
        err.contains("prompt tokens") && err.contains("tokens/s"),
        "{err}"
    );

    // Chat with a system message, sampling, a stop string.
    let o = flare(&[
        "generate",
        "--model",
        q,
        "--chat",
        "--system",
        "You are a helpful assistant.",
        "--prompt",
        "Hello, how are you?",
        "-n",
        "30",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "5",
        "--stop",
        "e",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let messages = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "Hello, how are you?"),
    ];
    let want = library_text("qwen2", false, Prompt::Chat(messages), |c| {
        c.max_new_tokens = 30;
        c.sampling.do_sample = true;
        c.sampling.temperature = 0.9;
        c.sampling.top_k = 20;
        c.seed = 5;
        c.stop_strings = vec!["e".into()];
    });
    assert_eq!(stdout(&o), format!("{want}\n"));
    assert!(!want.contains('e'));

    // With an adapter, prompt on stdin.
    let l = fixture("llama");
    let adapter = l.join("adapter");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args([
            "generate",
            "--model",
            l.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--greedy",
            "-n",
            "16",
            "--dtype",
            "f32",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"Hello, world!")
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = library_text("llama", true, "Hello, world!".into(), |c| {
        c.max_new_tokens = 16;
        c.sampling.do_sample = false;
    });
    assert_eq!(stdout(&o), format!("{want}\n"));
    assert!(stderr(&o).contains("14 modules"), "{}", stderr(&o));

    // The adapter merged into the weights: the same greedy text in f32 (the merged weights
    // differ from base + adapter by f32 rounding only).
    let o = flare(&[
        "generate",
        "--model",
        l.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--merge-adapter",
        "--greedy",
        "-n",
        "16",
        "--dtype",
        "f32",
        "--prompt",
        "Hello, world!",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{want}\n"));
    assert!(
        stderr(&o).contains("adapter merged into 14 projections"),
        "{}",
        stderr(&o)
    );
    // --merge-adapter needs --adapter.
    let o = flare(&["generate", "--model", q, "--merge-adapter", "--prompt", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--adapter"), "{}", stderr(&o));
}

#[test]
fn generate_fails_clearly() {
    let q = fixture("qwen2");
    let q = q.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["generate", "--model", "/no/such/model", "--prompt", "x"],
            "/no/such/model",
        ),
        (
            vec![
                "generate",
                "--model",
                q,
                "--prompt",
                "x",
                "--adapter",
                "/no/adapter",
            ],
            "/no/adapter",
        ),
        (
            vec!["generate", "--model", q, "--prompt", "x", "--top-p", "3"],
            "top_p",
        ),
        (vec!["generate", "--model", q, "--prompt", ""], "empty"),
        (
            vec![
                "generate",
                "--model",
                fixture("mistral").to_str().unwrap(),
                "--prompt",
                "x",
            ],
            "tokenizer.json",
        ),
        (
            vec!["generate", "--model", q, "--system", "s", "--prompt", "x"],
            "--chat",
        ),
    ] {
        let o = flare(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

/// A temporary copy of the qwen2 fixture with its weights split into two shards and an index,
/// removed on drop.
struct Sharded(PathBuf);

impl Sharded {
    fn new() -> Self {
        let src = fixture("qwen2");
        let dir = std::env::temp_dir().join(format!("flare-cli-sharded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let tensors =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut map = serde_json::Map::new();
        for (shard, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
            let sub: std::collections::HashMap<String, candle_core::Tensor> = part
                .iter()
                .map(|n| ((*n).clone(), tensors[*n].clone()))
                .collect();
            candle_core::safetensors::save(&sub, dir.join(&file)).unwrap();
            for n in part {
                map.insert((*n).clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string(&index).unwrap(),
        )
        .unwrap();
        Sharded(dir)
    }
}

impl Drop for Sharded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn info_and_generate_on_a_sharded_model() {
    let d = Sharded::new();
    let dir = d.0.to_str().unwrap();
    let o = flare(&["info", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let want = param_count(&ModelConfig::from_dir(&d.0).unwrap());
    assert!(out.contains("weights         2 file(s)"), "{out}");
    assert!(out.contains(&format!("({want})")), "{out}");
    assert!(
        out.contains("generation      no generation_config.json"),
        "{out}"
    );

    let o = flare(&["generate", "--model", dir, "--prompt", "Hello", "-n", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // No generation_config.json here: the tokenizer's EOS, plain greedy.
    let model = Transformer::from_dir(&d.0, DType::F32, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        eos_token_ids: tok.eos_token_id().into_iter().collect(),
        ..Default::default()
    };
    let want = generate_text(&model, &tok, "Hello", &cfg).unwrap().text;
    assert_eq!(stdout(&o), format!("{want}\n"));

    // A truncated shard: both commands fail naming it.
    let shard = d.0.join("model-00002-of-00002.safetensors");
    std::fs::write(&shard, [1u8, 2, 3]).unwrap();
    for args in [
        vec!["info", dir],
        vec!["generate", "--model", dir, "--prompt", "x"],
    ] {
        let o = flare(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            stderr(&o).contains("model-00002-of-00002.safetensors"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

// ---- flare train: output, progress, help, errors ----------------------------------------------

fn demo_assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

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

/// `flare train` arguments for a short run on the demo assets into `out`.
fn short_run(out: &Path, steps: u64) -> Vec<String> {
    let a = demo_assets();
    [
        "train",
        "--model",
        a.join("model").to_str().unwrap(),
        "--data",
        a.join("data/train.jsonl").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
        "--max-seq-len",
        "32",
        "--lora-r",
        "2",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn adapter_written(out: &Path) -> bool {
    let a = out.join("adapter");
    a.join("adapter_model.safetensors").is_file() && a.join("adapter_config.json").is_file()
}

#[test]
fn train_survives_a_closed_or_full_stderr() {
    use std::process::Stdio;
    let dir = TempDir::new("closed-stderr");
    // stderr into a pipe whose reader is gone at once: every write gets EPIPE.
    let out = dir.0.join("pipe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(short_run(&out, 4))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(adapter_written(&out));
    // stderr on a full disk: every write gets ENOSPC.
    if Path::new("/dev/full").exists() {
        let out = dir.0.join("full");
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_flare"))
            .args(short_run(&out, 4))
            .stderr(full)
            .status()
            .unwrap();
        assert!(status.success(), "{status:?}");
        assert!(adapter_written(&out));
        // An error with nowhere to print it still exits 1 (not a panic's 101).
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_flare"))
            .args(["train", "--config", "/no/such/run.toml"])
            .stderr(full)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1));
    }
    // generate: a reader that goes away ends the generation quietly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args([
            "generate",
            "--model",
            fixture("qwen2").to_str().unwrap(),
            "--prompt",
            "The quick brown fox",
            "-n",
            "64",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn train_prints_progress_lines_without_a_terminal() {
    let dir = TempDir::new("progress");
    // stderr is a pipe here: no bar, a line every 5% of the run (every 2 of 40 steps).
    let out = dir.0.join("auto");
    let o = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(short_run(&out, 40))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    for step in [1, 2, 4, 20, 38, 40] {
        let prefix = format!("step {step}/40 (");
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix)),
            "{prefix:?} not in\n{err}"
        );
    }
    assert!(!lines.iter().any(|l| l.starts_with("step 3/40")), "{err}");
    let last = lines.iter().find(|l| l.starts_with("step 40/40")).unwrap();
    for part in ["(100%): loss ", ", lr ", " tok/s, elapsed ", ", ETA 0:00"] {
        assert!(last.contains(part), "{part:?} not in {last}");
    }
    // --log-every 10: steps 1, 10, 20, 30, 40 only.
    let out = dir.0.join("every");
    let mut args = short_run(&out, 40);
    args.extend(["--log-every".into(), "10".into()]);
    let o = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let steps: Vec<String> = stderr(&o)
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["1/40", "10/40", "20/40", "30/40", "40/40"]);
    // --help lists the flag.
    let o = flare(&["train", "--help"]);
    assert!(stdout(&o).contains("--log-every <N>"), "{}", stdout(&o));
}

#[test]
fn train_help_shows_the_defaults() {
    let o = flare(&["train", "--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for needle in [
        "Peak learning rate [default: 0.0002]",
        "the final adapter) [default: flare-out]",
        "Examples per micro-batch [default: 4]",
        "(when --max-steps is not given) [default: 1]",
        "Eval every N steps (0: at the end only) [default: 0]",
        "Checkpoint every N steps (0: none) [default: 0]",
        "LoRA rank [default: 16]",
        "or cosine [default: cosine]",
        "0 turns clipping off [default: 1.0]",
        "no padding computed [default: true]",
        "--no-packing",
        "(off on the CPU) [default: auto]",
    ] {
        assert!(help.contains(needle), "{needle:?} not in\n{help}");
    }
}

#[test]
fn train_errors_are_clear_and_printed_once() {
    // Negative values reach the real check instead of "unexpected argument '-1'".
    for (flag, needle) in [
        ("--lr", "lr must be > 0"),
        ("--lora-alpha", "alpha must be finite and > 0"),
        ("--weight-decay", "weight_decay must be >= 0"),
        (
            "--max-grad-norm",
            "--max-grad-norm must be a finite number >= 0",
        ),
    ] {
        let o = flare(&["train", "--model", "m", "--data", "d.jsonl", flag, "-1"]);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        assert!(stderr(&o).contains(needle), "{flag}: {}", stderr(&o));
    }
    // Each message of an error chain once.
    let o = flare(&["train", "--config", "/no/such/run.toml"]);
    let err = stderr(&o);
    assert!(
        err.starts_with("error: reading config /no/such/run.toml"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `flare train` with `env` set (as a rank of a data-parallel run sees it).
fn flare_in_world(args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running flare")
}

#[test]
fn train_gpus_is_refused_before_any_rank_starts_without_cuda_and_nccl() {
    let tmp = TempDir::new("gpus");
    let out = tmp.0.join("out");
    let o = flare(&["train", "--help"]);
    assert!(stdout(&o).contains("--gpus <N>"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("Needs a build with the nccl feature. [default: 1]"),
        "{}",
        stdout(&o)
    );
    // --device cpu (short_run's), in any build.
    let mut args = short_run(&out, 1);
    args.extend(["--gpus".into(), "2".into()]);
    let o = flare_in_world(&args, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("--gpus 2 with --device cpu"), "{err}");
    assert!(!err.contains("[rank"), "no rank may start: {err}");
    assert!(!out.exists(), "nothing may be written");
    // --device cuda in a build without the nccl feature.
    if !cfg!(feature = "nccl") {
        let n = args.len();
        args[n - 3] = "cuda".into();
        let o = flare_in_world(&args, &[]);
        let err = stderr(&o);
        assert!(
            err.contains("needs CUDA and the nccl feature") && err.contains("--features nccl"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // --gpus 0 is not a number of GPUs.
    let o = flare(&["train", "--gpus", "0"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn train_as_a_rank_checks_its_environment_and_needs_cuda_and_nccl() {
    let tmp = TempDir::new("rank-env");
    let out = tmp.0.join("out");
    let args = short_run(&out, 1);
    // A bad world names the variable and its value.
    let o = flare_in_world(
        &args,
        &[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("RANK=2 is not below WORLD_SIZE=2"),
        "{}",
        stderr(&o)
    );
    let o = flare_in_world(&args, &[("RANK", "1"), ("WORLD_SIZE", "two")]);
    assert!(
        stderr(&o).contains("WORLD_SIZE=\"two\" is not a non-negative integer"),
        "{}",
        stderr(&o)
    );
    // A rank on the CPU is refused before its rendezvous (no home-made collective).
    let world = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("FLARE_MASTER_PORT", "29555"),
    ];
    let o = flare_in_world(&args, &world);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(
            "data-parallel training needs CUDA and the nccl feature (this is rank 1 of 2)"
        ),
        "{err}"
    );
    assert!(!out.exists(), "a rank above 0 writes nothing");
    // --gpus inside a world that flare did not launch is ambiguous.
    let mut gpus = args.clone();
    gpus.extend(["--gpus".into(), "2".into()]);
    let o = flare_in_world(&gpus, &world);
    assert!(
        stderr(&o).contains("--gpus 2 in a process that is already rank 1 of 2"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn train_config_file_keys_are_the_flags_and_paths_are_the_files() {
    let dir = TempDir::new("toml-run");
    let runs = dir.0.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    // The demo data beside the TOML file, plus one malformed line to skip.
    let mut data = std::fs::read_to_string(demo_assets().join("data/train.jsonl")).unwrap();
    data.push_str("{not json\n");
    std::fs::write(runs.join("train.jsonl"), data).unwrap();
    let toml = runs.join("run.toml");
    std::fs::write(
        &toml,
        format!(
            "model = {:?}\ndata = \"train.jsonl\"\noutput-dir = \"out\"\nmax_steps = 2\n\
             batch_size = 2\nmax_seq_len = 32\nlora_r = 2\ntarget_modules = [\"q_proj\"]\n\
             skip_bad_lines = true\ndevice = \"cpu\"\n",
            demo_assets().join("model").to_str().unwrap()
        ),
    )
    .unwrap();
    // Run from another directory: the paths are the file's, not the working directory's.
    let o = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(["train", "--config", toml.to_str().unwrap()])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(adapter_written(&runs.join("out")), "{}", stderr(&o));
    assert!(!dir.0.join("out").exists());
    assert!(
        stderr(&o).contains("skipped 1 malformed line"),
        "{}",
        stderr(&o)
    );
    // A key that is no flag: the file, the line and the key.
    std::fs::write(&toml, "lr = 1e-3\nbad_lines = \"skip\"\n").unwrap();
    let o = flare(&["train", "--config", toml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let want = format!("{}:2: unknown key `bad_lines`", toml.display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
}

// ---- issue 10: merge safety, checkpoint rotation and resume checks, the demo's cleanup -------

/// A fresh scratch directory for one of the tests below.
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flare-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the qwen2 fixture (with its adapter in `adapter/`) under `dir`.
fn qwen2_copy(dir: &Path) -> PathBuf {
    let (src, m) = (fixture("qwen2"), dir.join("model"));
    std::fs::create_dir_all(m.join("adapter")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    m
}

#[test]
fn merge_refuses_the_model_dir_and_mixing_with_other_files() {
    let dir = scratch_dir("merge-guard");
    let m = qwen2_copy(&dir);
    let (ms, adapter) = (m.to_str().unwrap(), m.join("adapter"));
    let before = std::fs::read(m.join("model.safetensors")).unwrap();
    for force in [false, true] {
        let mut args = vec![
            "merge",
            "--model",
            ms,
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            ms,
        ];
        if force {
            args.push("--force");
        }
        let o = flare(&args);
        assert!(!o.status.success(), "merge into the model dir succeeded");
        assert!(stderr(&o).contains("is the base model"), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), before);
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let merge = |extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--model",
            ms,
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            busy.to_str().unwrap(),
        ];
        args.extend(extra);
        flare(&args)
    };
    let o = merge(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(busy.join("notes.txt").is_file());
    let o = merge(&["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(busy.join("model.safetensors").is_file());
    // Each weights file is reported as it is written (stderr is a pipe here, not a terminal).
    let err = stderr(&o);
    assert!(
        err.contains("model.safetensors (1/1): ") && err.contains(" merged, "),
        "{err}"
    );
    assert!(
        !busy.join("notes.txt").exists(),
        "the old directory was not replaced whole"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_rotates_checkpoints_and_resume_from_checks_the_run() {
    let dir = scratch_dir("train-rotate");
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"The sky is\", \"completion\": \" blue.\"}\n\
         {\"prompt\": \"Cats say\", \"completion\": \" meow.\"}\n",
    )
    .unwrap();
    let out = dir.join("out");
    let q = fixture("qwen2");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            q.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--lora-r",
            "4",
            "--batch-size",
            "1",
            "--save-every",
            "1",
            "--save-total-limit",
            "2",
            "--no-progress",
        ];
        args.extend(extra);
        flare(&args)
    };
    let o = train(&["--max-steps", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-2", "checkpoint-3"]);
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let ckpt = out.join("checkpoint-2");
    let ckpt = ckpt.to_str().unwrap();
    // Another length under the cosine schedule: refused, naming the field.
    let o = train(&["--max-steps", "5", "--resume-from", ckpt]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("`max_steps`: 5 steps here, 3 steps"),
        "{}",
        stderr(&o)
    );
    // The same command without a resume: refused, the directory holds this run.
    let o = train(&["--max-steps", "3"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a training run"),
        "{}",
        stderr(&o)
    );
    // The explicit checkpoint of this run resumes.
    let o = train(&["--max-steps", "3", "--resume-from", ckpt]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step 3/3"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_leaves_no_temporary_directory_and_prints_a_clean_model_path() {
    let tmp = scratch_dir("demo-tmp");
    let o = Command::new(env!("CARGO_BIN_EXE_flare"))
        .args(["demo", "--steps", "2"])
        .env("TMPDIR", &tmp)
        .output()
        .expect("running flare demo");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/demo/model")
        .canonicalize()
        .unwrap();
    assert!(
        out.contains(&format!("({})", model.display())),
        "no canonical model path in\n{out}"
    );
    assert!(!out.contains("/../"), "{out}");
    assert!(out.contains("deleted when the demo ends"), "{out}");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "the demo left {left:?}");
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---- hardening: adapters in `flare info`, context warnings, memory, TOML fuzz --------------------

#[test]
fn info_describes_an_adapter_directory() {
    let dir = fixture("qwen2").join("adapter");
    let o = flare(&["info", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // r 4, alpha 8, 7 target modules on 2 layers: 14 modules, 28 tensors, each pair
    // r·(in + out) parameters.
    for want in [
        "adapter directory",
        "LORA (PEFT), r 4, alpha 8, scaling 2",
        "targets         down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        "base model      ..",
        "task type       CAUSAL_LM",
        "28 tensors (14 modules)",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let c = ModelConfig::from_dir(fixture("qwen2")).unwrap();
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (q, kv) = (
        (c.num_attention_heads * c.head_dim) as u64,
        (c.num_key_value_heads * c.head_dim) as u64,
    );
    let per_layer = 4 * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i));
    let want = c.num_hidden_layers as u64 * per_layer;
    assert!(out.contains(&format!("({want})")), "{want} not in:\n{out}");
}

#[test]
fn info_on_a_broken_adapter_names_the_file() {
    let dir = std::env::temp_dir().join(format!("flare-cli-bad-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("qwen2").join("adapter");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    let o = flare(&["info", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generating_past_max_position_embeddings_warns_on_stderr() {
    let q = fixture("qwen2");
    let q = q.to_str().unwrap();
    // The fixture's max_position_embeddings is 128.
    let o = flare(&[
        "generate",
        "--model",
        q,
        "--prompt",
        "hello",
        "--greedy",
        "--max-new-tokens",
        "200",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("max_position_embeddings (128)"),
        "{err}"
    );
    let o = flare(&[
        "generate",
        "--model",
        q,
        "--prompt",
        "hello",
        "--greedy",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning:"), "{}", stderr(&o));
    // A KV cache no machine can hold is refused before it is allocated.
    let o = flare(&[
        "generate",
        "--model",
        q,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "1000000000000000",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("KV cache") && err.contains("--max-new-tokens"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_run_too_large_for_memory_is_refused_with_the_estimate() {
    let dir = std::env::temp_dir().join(format!("flare-cli-oom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n").unwrap();
    let out = dir.join("out");
    let o = flare(&[
        "train",
        "--model",
        fixture("qwen2").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--lora-r",
        "100000000000",
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("not enough memory on cpu")
            && err.contains("GiB")
            && err.contains("available")
            && err.contains("lower lora_r"),
        "{err}"
    );
    assert!(!out.exists(), "the output directory was created");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mutated TOML train configs through the binary: never a panic, a parse error names the file,
/// and a refused config leaves the output directory as it was. (The library's TOML loader gets
/// many more inputs in flare's `it::fuzz`.)
#[test]
fn fuzz_train_toml_through_the_cli() {
    use rand::{Rng, SeedableRng};
    let dir = std::env::temp_dir().join(format!("flare-cli-fuzz-toml-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"hello there\"}\n{\"text\": \"general kenobi\"}\n",
    )
    .unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "an earlier file").unwrap();
    let model = fixture("qwen2");
    let base = format!(
        "model = {:?}\ndata = {:?}\noutput_dir = {:?}\nlora_r = 2\nlora_alpha = 4.0\n\
         lr = 1e-3\nmax_steps = 1\nbatch_size = 2\nmax_seq_len = 16\ndevice = \"cpu\"\n\
         target_modules = [\"q_proj\"]\nseed = 1\n",
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.join("run").to_str().unwrap()
    );
    let toml = dir.join("train.toml");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7011);
    const ODD: &[&str] = &[
        "-1", "0", "1e400", "\"\"", "[]", "{}", "true", "nan", "\"x\"",
    ];
    let n = 24;
    for i in 0..n {
        let mut text = base.clone().into_bytes();
        match rng.random_range(0..3) {
            0 => {
                // An odd value for one key.
                let lines: Vec<&str> = base.lines().collect();
                let k = rng.random_range(0..lines.len());
                let key = lines[k].split(" = ").next().unwrap();
                let odd = ODD[rng.random_range(0..ODD.len())];
                text = lines
                    .iter()
                    .enumerate()
                    .map(|(j, l)| {
                        if j == k {
                            format!("{key} = {odd}")
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes();
            }
            1 => {
                let at = rng.random_range(0..text.len());
                text[at] = b"{}[]=\"#\x00\xff"[rng.random_range(0..9)];
            }
            _ => {
                let at = rng.random_range(0..text.len());
                text.truncate(at);
            }
        }
        std::fs::write(&toml, &text).unwrap();
        let before: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let o = flare(&["train", "--config", toml.to_str().unwrap(), "--no-progress"]);
        let err = stderr(&o);
        let input = String::from_utf8_lossy(&text);
        assert!(
            !err.contains("panicked"),
            "case {i}: {err}\ninput:\n{input}"
        );
        assert_ne!(o.status.code(), Some(101), "case {i}: {err}");
        if !o.status.success() {
            assert!(!err.trim().is_empty(), "case {i}: no message");
            if err.contains("TOML") || err.contains("parse") || err.contains("expected") {
                assert!(
                    err.contains("train.toml"),
                    "case {i}: {err}\ninput:\n{input}"
                );
            }
            let after: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert_eq!(before, after, "case {i}: {err}\ninput:\n{input}");
        }
        let _ = std::fs::remove_dir_all(out.join("run"));
    }
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "an earlier file"
    );
    println!("fuzz train.toml through the CLI: {n} inputs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `flare bench train` on the CPU with the llama fixture's config (a folder given to
/// `--config`): the shape rows and the `--max-context` search's row (no allocation fails on the
/// CPU, so the search doubles up to `--max-context-limit`), MFU from `--peak-tflops`, and the
/// trainer settings recorded in the JSON rows.
#[test]
fn bench_train_reports_shapes_mfu_and_max_context() {
    let dir = std::env::temp_dir().join(format!("flare-cli-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("rows.json");
    let cfg = fixture("llama");
    let o = flare(&[
        "bench",
        "train",
        "--device",
        "cpu",
        "--config",
        cfg.to_str().unwrap(),
        "--shapes",
        "1x8,2x8",
        "--max-context",
        "--max-context-start",
        "16",
        "--max-context-granularity",
        "16",
        "--max-context-limit",
        "48",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--peak-tflops",
        "0.5",
        "--gradient-checkpointing",
        "on",
        "--packing",
        "true",
        "--grouped-projections",
        "false",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("max-context try"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("grouped projections false"),
        "{}",
        stderr(&o)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (r, (b, s)) in rows.iter().zip([(1, 8), (2, 8), (1, 48)]) {
        assert_eq!((r["batch"].as_u64(), r["seq"].as_u64()), (Some(b), Some(s)));
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["grad_ckpt"], true);
        assert_eq!(r["packing"], true);
        assert_eq!(r["grouped_projections"], false);
        let tps = r["tokens_per_s"].as_f64().unwrap();
        let fpt = r["flops_per_token"].as_f64().unwrap();
        let mfu = r["mfu"].as_f64().unwrap();
        assert!(tps > 0.0 && fpt > 0.0);
        assert!(
            (mfu - fpt * tps / 0.5e12).abs() <= 1e-9 * mfu.max(1e-30),
            "{r}"
        );
        assert!(stdout(&o).contains(&format!("{b}x{s}")), "{}", stdout(&o));
    }
    // Doubling from 16 stops at the limit (48): 16, 32, 48 all ran.
    let m = &rows[2];
    assert_eq!(m["max_context"], true);
    assert_eq!(m["longest_single_step"], 48);
    let tried: Vec<u64> = m["tries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(tried, [16, 32, 48]);
    assert!(m["search"].as_str().unwrap().contains("limit"), "{m}");

    let o = flare(&["bench", "train", "--device", "cpu", "--config", "gpt-9"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("llama-3.1-8b"), "{}", stderr(&o));
    let o = flare(&["bench", "train", "--device", "cpu", "--shapes", "4by8"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("4by8"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `flare bench decode --adapter-rank` adds `generate` with an active adapter and with it
/// merged, on the same prompt; on the CPU both run per-op (the engine is CUDA's), and every
/// row has a positive rate.
#[test]
fn bench_decode_times_an_adapter_active_and_merged() {
    let dir = scratch_dir("bench-decode-adapter");
    let json = dir.join("decode.json");
    let o = flare(&[
        "bench",
        "decode",
        "--quick",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--repeats",
        "1",
        "--adapter-rank",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "prefill",
            "decode",
            "generate",
            "generate, adapter r4",
            "generate, adapter r4 merged"
        ]
    );
    for r in &rows {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        stdout(&o).contains("generate, adapter r4 merged per-op"),
        "{}",
        stdout(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
