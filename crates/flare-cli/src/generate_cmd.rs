//! `flare generate`: loads a Hugging Face model directory (and optionally a PEFT adapter),
//! takes a prompt (plain text, or a chat turn rendered with the model's chat template), and
//! streams the generated text to stdout as it is decoded; the token counts and rates go to
//! stderr at the end, so stdout holds only the text.
//!
//! Settings are layered as transformers layers them, then the flags on top: flare's defaults
//! (greedy, 256 new tokens), the model's `generation_config.json` (EOS ids, sampling settings,
//! length), the tokenizer's EOS token when neither says one, then every flag given.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};
use flare::generate::{GenerationConfig, HfGenerationConfig, Prompt, StopReason, TextStream};
use flare::models::{load_peft_adapter, Transformer};
use flare::text::{ChatMessage, Tokenizer};

use crate::device::DeviceSpec;
use crate::output::elog;

/// The long help of `flare generate`.
pub const GENERATE_LONG_ABOUT: &str = "\
Generate text with a Hugging Face model directory (Qwen2, Llama, Mistral), streaming it to stdout.

The directory needs config.json, model.safetensors (or model.safetensors.index.json and its
shards) and tokenizer.json; tokenizer_config.json / chat_template.jinja give the chat template,
generation_config.json the default EOS ids and sampling settings. Flags override those.

The prompt is --prompt, or stdin when --prompt is not given. With --chat it is one user turn
(after --system, if given) rendered with the model's chat template and its generation prompt;
without, it is encoded as plain text (with the tokenizer's BOS, if it adds one).

Sampling: greedy unless generation_config.json says do_sample or --temperature is given; a
temperature of 0 (or --greedy) forces greedy. Token counts and tokens/s go to stderr at the end.

Examples:
  flare generate --model Qwen2.5-0.5B-Instruct --chat --prompt 'Write a haiku about rust.'
  flare generate --model llama --adapter my-lora --prompt 'Once upon a time' \\
      --temperature 0.8 --top-p 0.95 --seed 1 --max-new-tokens 100 --stop '\\n\\n'";

/// The dtype to compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float (the default on the CPU).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16 (the default on CUDA).
    Bf16,
}

impl DTypeArg {
    /// The Candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The arguments of `flare generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model directory (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Merge --adapter into the weights once, after loading (PEFT's merge_and_unload), instead
    /// of running its low-rank terms at every token: faster, and on CUDA greedy batch-1
    /// decoding then runs on the decode engine; the merged weights are rounded once to --dtype,
    /// so the output may differ from the unmerged adapter's by that rounding.
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
    /// The prompt; read from stdin when not given.
    #[arg(long, short = 'p', value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Treat the prompt as a user message and render it with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the user's (with --chat).
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    /// The most tokens to generate [default: generation_config.json's, else 256].
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: Option<u64>,
    /// Sampling temperature; 0 means greedy. Giving it turns sampling on.
    #[arg(long, value_name = "T", value_parser = non_negative)]
    pub temperature: Option<f32>,
    /// Greedy decoding, whatever generation_config.json says.
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Keep only the K most likely tokens when sampling (0: off).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches P when sampling (1: off).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one when sampling (0: off).
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Penalise tokens already present (transformers' semantics; 1: off).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// The seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (left out of the output); repeatable. Escapes
    /// \n, \t and \\ are understood.
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Where to run: auto (CUDA if available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceSpec,
    /// The dtype to compute in [default: bf16 on CUDA, f32 on the CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

fn non_negative(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number >= 0, got {s}"))
    }
}

/// `\n`, `\t`, `\r` and `\\` in a command-line string, as typed in a shell.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The generation settings: flare's defaults, then the model's `generation_config.json`, the
/// tokenizer's EOS when no EOS id is known yet, then the flags.
pub fn generation_config(
    args: &GenerateArgs,
    file: Option<&HfGenerationConfig>,
    tokenizer_eos: Option<u32>,
    prompt_len: usize,
) -> Result<GenerationConfig> {
    let mut cfg = GenerationConfig {
        max_new_tokens: 256,
        seed: args.seed,
        ..Default::default()
    };
    if let Some(file) = file {
        file.apply(&mut cfg, prompt_len);
    }
    if cfg.eos_token_ids.is_empty() {
        cfg.eos_token_ids.extend(tokenizer_eos);
    }
    if let Some(n) = args.max_new_tokens {
        cfg.max_new_tokens = n as usize;
    }
    let s = &mut cfg.sampling;
    if args.greedy {
        s.do_sample = false;
    }
    if let Some(t) = args.temperature {
        if t == 0.0 {
            s.do_sample = false;
        } else {
            s.do_sample = true;
            s.temperature = t;
        }
    }
    if let Some(k) = args.top_k {
        s.top_k = k;
    }
    if let Some(p) = args.top_p {
        s.top_p = p;
    }
    if let Some(p) = args.min_p {
        s.min_p = p;
    }
    if let Some(r) = args.repetition_penalty {
        s.repetition_penalty = r;
    }
    s.validate().context("invalid sampling settings")?;
    cfg.stop_strings
        .extend(args.stop.iter().map(|s| unescape(s)));
    if cfg.stop_strings.iter().any(String::is_empty) {
        bail!("--stop: a stop string must not be empty");
    }
    Ok(cfg)
}

/// The prompt the flags describe, `text` being --prompt or stdin.
pub fn prompt(args: &GenerateArgs, text: String) -> Prompt {
    if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", text));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(text)
    }
}

/// Warns (on stderr) when the prompt plus `max_new_tokens` go past the model's
/// `max_position_embeddings`, and refuses a request whose KV cache cannot fit in the memory
/// the device has available.
fn check_context(
    model: &Transformer,
    device: &candle_core::Device,
    prompt_len: usize,
    max_new_tokens: usize,
) -> Result<()> {
    let c = model.config();
    let positions = prompt_len.saturating_add(max_new_tokens);
    if let Some(w) = c.context_warning(positions) {
        elog!("warning: {w}");
    }
    let cache_bytes = (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim) as u128
        * positions as u128
        * model.dtype().size_in_bytes() as u128;
    if let Some(available) = flare::train::memory::available_memory(device)? {
        if cache_bytes > available as u128 {
            bail!(
                "the KV cache for {positions} positions (prompt {prompt_len} + max_new_tokens \
                 {max_new_tokens}) needs {} but {} is available: lower --max-new-tokens",
                flare::train::memory::human_bytes(u64::try_from(cache_bytes).unwrap_or(u64::MAX)),
                flare::train::memory::human_bytes(available)
            );
        }
    }
    Ok(())
}

/// Runs `flare generate`.
pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let text = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    if text.is_empty() && !args.chat {
        bail!("the prompt is empty (give --prompt TEXT or pipe it on stdin)");
    }

    let device = args.device.open()?;
    let dtype = args
        .dtype
        .map(DTypeArg::dtype)
        .unwrap_or(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        });
    let dir = &args.model;
    let t_load = Instant::now();
    let mut model = Transformer::from_dir(dir, dtype, &device)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer in {}", dir.display()))?;
    if let Some(adapter) = &args.adapter {
        let n = load_peft_adapter(&mut model, adapter, "default")
            .with_context(|| format!("applying the adapter in {}", adapter.display()))?;
        elog!("adapter {}: {n} modules", adapter.display());
        if args.merge_adapter {
            let merged = model
                .merge_and_unload()
                .with_context(|| format!("merging the adapter in {}", adapter.display()))?;
            elog!("adapter merged into {merged} projections' weights");
        }
    }
    let file = HfGenerationConfig::from_dir(dir)?;
    let ids = prompt(args, text)
        .to_ids(&tokenizer)
        .context("preparing the prompt")?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let cfg = generation_config(args, file.as_ref(), tokenizer.eos_token_id(), ids.len())?;
    let load_s = t_load.elapsed().as_secs_f64();
    check_context(&model, &device, ids.len(), cfg.max_new_tokens)?;

    let t0 = Instant::now();
    let mut stream = TextStream::new(&model, &tokenizer, &ids, &cfg)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = std::io::stdout().lock();
    // Ok(false) when the reader has gone (`flare generate ... | head -c 100`): generation stops
    // there, quietly, as a SIGPIPE would have stopped it. Any other failure (a full disk) is
    // an error: the text is the product.
    let mut emit = |text: &str| match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing the generated text to stdout")),
    };
    let mut reader_open = true;
    while reader_open {
        match stream.next_piece()? {
            Some(piece) => reader_open = emit(&piece)?,
            None => break,
        }
    }
    if reader_open {
        emit("\n")?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let n = stream.token_ids().len();
    let why = match stream.stop_reason() {
        Some(StopReason::Eos(id)) => format!("EOS token {id}"),
        Some(StopReason::StopString(s)) => format!("stop string {s:?}"),
        Some(StopReason::MaxNewTokens) | None => format!("max_new_tokens ({})", cfg.max_new_tokens),
    };
    elog!(
        "[{} prompt tokens, {n} new tokens, stopped by {why}; load {load_s:.2}s, prefill \
         {prefill_s:.3}s ({:.1} tokens/s), generation {decode_s:.3}s ({:.1} tokens/s); {:?} on {}]",
        ids.len(),
        ids.len() as f64 / prefill_s.max(1e-9),
        n as f64 / decode_s.max(1e-9),
        dtype,
        args.device.name(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(extra: &[&str]) -> std::result::Result<GenerateArgs, clap::Error> {
        let mut argv = vec!["flare", "--model", "m"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).map(|t| t.args)
    }

    #[test]
    fn parses_every_flag() {
        let a = parse(&[
            "--adapter",
            "ad",
            "-p",
            "hi",
            "--chat",
            "--system",
            "be brief",
            "-n",
            "9",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--min-p",
            "0.05",
            "--repetition-penalty",
            "1.1",
            "--seed",
            "4",
            "--stop",
            "a",
            "--stop",
            "\\n\\n",
            "--device",
            "cuda:1",
            "--dtype",
            "bf16",
        ])
        .unwrap();
        assert_eq!(a.model, PathBuf::from("m"));
        assert_eq!(a.adapter, Some(PathBuf::from("ad")));
        assert_eq!(a.prompt.as_deref(), Some("hi"));
        assert!(a.chat);
        assert_eq!(a.system.as_deref(), Some("be brief"));
        assert_eq!(a.max_new_tokens, Some(9));
        assert_eq!(a.device, DeviceSpec::Cuda(1));
        assert_eq!(a.dtype, Some(DTypeArg::Bf16));
        assert_eq!(a.stop, ["a", "\\n\\n"]);

        let cfg = generation_config(&a, None, Some(7), 3).unwrap();
        assert_eq!(cfg.max_new_tokens, 9);
        assert_eq!(cfg.eos_token_ids, [7]);
        assert_eq!(cfg.seed, 4);
        assert_eq!(cfg.stop_strings, ["a", "\n\n"]);
        let s = &cfg.sampling;
        assert!(s.do_sample);
        assert_eq!(
            (
                s.temperature,
                s.top_k,
                s.top_p,
                s.min_p,
                s.repetition_penalty
            ),
            (0.7, 5, 0.9, 0.05, 1.1)
        );
        match prompt(&a, "q".into()) {
            Prompt::Chat(m) => assert_eq!(
                m,
                [
                    ChatMessage::new("system", "be brief"),
                    ChatMessage::new("user", "q")
                ]
            ),
            other => panic!("expected a chat prompt, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_layering() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.device, "auto".parse::<DeviceSpec>().unwrap());
        assert_eq!(a.dtype, None);
        assert_eq!(prompt(&a, "q".into()), Prompt::Text("q".into()));
        // No file: greedy, 256 tokens, the tokenizer's EOS.
        let cfg = generation_config(&a, None, Some(2), 10).unwrap();
        assert_eq!(cfg.max_new_tokens, 256);
        assert_eq!(cfg.eos_token_ids, [2]);
        assert!(!cfg.sampling.do_sample);
        // The file's settings win over the defaults and the tokenizer; flags win over the file.
        let file = HfGenerationConfig {
            eos_token_ids: vec![5, 6],
            do_sample: Some(true),
            temperature: Some(0.6),
            max_length: Some(30),
            ..Default::default()
        };
        let cfg = generation_config(&a, Some(&file), Some(2), 10).unwrap();
        assert_eq!(cfg.eos_token_ids, [5, 6]);
        assert_eq!(cfg.max_new_tokens, 20);
        assert!(cfg.sampling.do_sample);
        assert_eq!(cfg.sampling.temperature, 0.6);
        assert_eq!(cfg.sampling.top_k, 50, "transformers' default top-k");
        let greedy = parse(&["--greedy"]).unwrap();
        assert!(
            !generation_config(&greedy, Some(&file), None, 1)
                .unwrap()
                .sampling
                .do_sample
        );
        let t0 = parse(&["--temperature", "0"]).unwrap();
        let cfg = generation_config(&t0, Some(&file), None, 1).unwrap();
        assert!(!cfg.sampling.do_sample);
    }

    #[test]
    fn refuses_bad_flags() {
        assert!(parse(&["--system", "x"]).is_err(), "--system needs --chat");
        assert!(parse(&["-n", "0"]).is_err());
        assert!(parse(&["--temperature", "-1"]).is_err());
        assert!(parse(&["--temperature", "1", "--greedy"]).is_err());
        assert!(parse(&["--device", "tpu"]).is_err());
        assert!(parse(&["--dtype", "f64"]).is_err());
        assert!(
            T::try_parse_from(["flare", "-p", "x"]).is_err(),
            "--model is required"
        );
        let bad = parse(&["--top-p", "1.5"]).unwrap();
        let err = generation_config(&bad, None, None, 1).unwrap_err();
        assert!(format!("{err:#}").contains("top_p"), "{err:#}");
        let empty = parse(&["--stop", ""]).unwrap();
        assert!(generation_config(&empty, None, None, 1).is_err());
    }

    #[test]
    fn unescapes_like_a_shell_user_expects() {
        assert_eq!(unescape("a\\nb\\tc\\\\d\\x\\"), "a\nb\tc\\d\\x\\");
        assert_eq!(unescape("plain"), "plain");
    }
}
