//! `flare info DIR`: what a Hugging Face model directory holds, as flare reads it: the
//! architecture and sizes from `config.json`, the weights' files, dtypes on disk and parameter
//! count (from the safetensors headers, without reading the tensors), the tokenizer (vocabulary,
//! special tokens, chat template), `generation_config.json`, and PEFT adapters found in the
//! directory itself or its immediate subdirectories. On a PEFT adapter directory (an
//! `adapter_config.json` and no `config.json`) it describes the adapter instead.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use flare::generate::HfGenerationConfig;
use flare::lora::peft::load_adapter;
use flare::models::weights::read_safetensors_header;
use flare::models::ModelConfig;
use flare::text::Tokenizer;

/// The arguments of `flare info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The model directory, or a PEFT adapter directory (adapter_config.json +
    /// adapter_model.safetensors).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// What the safetensors headers of a model say.
#[derive(Debug, Default, PartialEq)]
pub struct WeightsSummary {
    /// The files, with their sizes in bytes.
    pub files: Vec<(PathBuf, u64)>,
    /// The number of tensors.
    pub tensors: usize,
    /// The number of parameters (elements), per dtype on disk.
    pub params_by_dtype: BTreeMap<String, u64>,
}

impl WeightsSummary {
    /// All parameters.
    pub fn params(&self) -> u64 {
        self.params_by_dtype.values().sum()
    }
}

/// The weights files of `dir`: `model.safetensors`, else the shards of
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", index.display()))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no `weight_map` object", index.display());
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for f in map.values() {
        let Some(f) = f.as_str() else {
            bail!(
                "{}: `weight_map` values must be file names",
                index.display()
            );
        };
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and checks the header of one safetensors file: `name -> (dtype, shape)`. Errors name
/// the file and the tensor ([`flare::models::weights::read_safetensors_header`]).
fn read_header(path: &Path) -> Result<Vec<(String, String, Vec<u64>)>> {
    Ok(read_safetensors_header(path)?
        .into_iter()
        .map(|e| {
            let shape = e.shape.iter().map(|&d| d as u64).collect();
            (e.name, e.dtype, shape)
        })
        .collect())
}

/// Summarises the weights of `dir` from the safetensors headers.
pub fn weights_summary(dir: &Path) -> Result<WeightsSummary> {
    let mut s = WeightsSummary::default();
    for file in weight_files(dir)? {
        let size = std::fs::metadata(&file)
            .with_context(|| format!("opening {}", file.display()))?
            .len();
        for (_, dtype, shape) in read_header(&file)? {
            s.tensors += 1;
            *s.params_by_dtype.entry(dtype).or_default() += shape.iter().product::<u64>();
        }
        s.files.push((file, size));
    }
    Ok(s)
}

/// A count with a unit suffix: 494.03M, 1.54B, 12.3K.
pub fn human_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// A size in bytes: 1.23 GiB, 180.0 KiB.
pub fn human_bytes(n: u64) -> String {
    let x = n as f64;
    if x >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", x / (1u64 << 30) as f64)
    } else if x >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", x / (1u64 << 20) as f64)
    } else if x >= 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// The report of `flare info`, as text.
pub fn report(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if !dir.join("config.json").is_file() && dir.join(ADAPTER_CONFIG).is_file() {
        return adapter_report(dir);
    }
    let mut r = String::new();
    writeln!(r, "model directory {}", dir.display())?;

    let c = ModelConfig::from_dir(dir)?;
    writeln!(r, "architecture    {:?}", c.architecture)?;
    writeln!(
        r,
        "layers          {}, hidden {}, intermediate {}, vocab {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    )?;
    writeln!(
        r,
        "attention       {} heads, {} KV heads, head dim {}{}",
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        match c.sliding_window {
            Some(w) => format!(", sliding window {w}"),
            None => String::new(),
        }
    )?;
    writeln!(
        r,
        "positions       {} (RoPE theta {}{})",
        c.max_position_embeddings,
        c.rope_theta,
        if c.rope_scaling.is_some() {
            ", llama3 scaling"
        } else {
            ""
        }
    )?;
    writeln!(
        r,
        "embeddings      {}",
        if c.tie_word_embeddings {
            "tied (lm_head = embed_tokens)"
        } else {
            "untied"
        }
    )?;

    let w = weights_summary(dir)?;
    let bytes: u64 = w.files.iter().map(|f| f.1).sum();
    let dtypes: Vec<String> = w
        .params_by_dtype
        .iter()
        .map(|(d, n)| format!("{d} ({})", human_count(*n)))
        .collect();
    writeln!(
        r,
        "weights         {} file(s), {}, {} tensors",
        w.files.len(),
        human_bytes(bytes),
        w.tensors
    )?;
    writeln!(r, "dtype on disk   {}", dtypes.join(", "))?;
    writeln!(
        r,
        "parameters      {} ({})",
        human_count(w.params()),
        w.params()
    )?;

    if dir.join("tokenizer.json").is_file() {
        let t = Tokenizer::from_dir(dir)?;
        let special: Vec<String> = ["bos_token", "eos_token", "pad_token"]
            .iter()
            .filter_map(|n| t.special_token(n).map(|v| format!("{n} {v:?}")))
            .collect();
        writeln!(
            r,
            "tokenizer       vocab {}{}{}",
            t.vocab_size(),
            if special.is_empty() { "" } else { ", " },
            special.join(", ")
        )?;
        let source = if dir.join("chat_template.jinja").is_file() {
            "chat_template.jinja"
        } else {
            "tokenizer_config.json"
        };
        match t.chat_template() {
            Some(tpl) => writeln!(
                r,
                "chat template   yes ({source}, {} bytes)",
                tpl.source().len()
            )?,
            None => writeln!(r, "chat template   no")?,
        }
    } else {
        writeln!(r, "tokenizer       none (no tokenizer.json)")?;
        writeln!(r, "chat template   no")?;
    }

    match HfGenerationConfig::from_dir(dir)? {
        Some(g) => {
            let mut parts = Vec::new();
            if !g.eos_token_ids.is_empty() {
                parts.push(format!("eos {:?}", g.eos_token_ids));
            }
            if let Some(b) = g.do_sample {
                parts.push(format!("do_sample {b}"));
            }
            for (name, v) in [
                ("temperature", g.temperature),
                ("top_p", g.top_p),
                ("min_p", g.min_p),
                ("repetition_penalty", g.repetition_penalty),
            ] {
                if let Some(v) = v {
                    parts.push(format!("{name} {v}"));
                }
            }
            if let Some(k) = g.top_k {
                parts.push(format!("top_k {k}"));
            }
            if let Some(n) = g.max_new_tokens {
                parts.push(format!("max_new_tokens {n}"));
            }
            if let Some(n) = g.max_length {
                parts.push(format!("max_length {n}"));
            }
            writeln!(r, "generation      {}", parts.join(", "))?;
        }
        None => writeln!(r, "generation      no generation_config.json")?,
    }

    let mut adapters = Vec::new();
    let mut candidates = vec![dir.to_path_buf()];
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    candidates.extend(subdirs);
    for d in candidates {
        if !d.join("adapter_config.json").is_file() {
            continue;
        }
        let name = d.strip_prefix(dir).unwrap_or(&d).display().to_string();
        let name = if name.is_empty() { ".".into() } else { name };
        match load_adapter(&d, &candle_core::Device::Cpu) {
            Ok(a) => {
                let mut targets = a.config.target_modules.clone();
                targets.sort();
                adapters.push(format!(
                    "{name} (LoRA r={}, alpha={}, {} modules: {})",
                    a.config.r,
                    a.config.lora_alpha,
                    a.tensors.len(),
                    targets.join(",")
                ));
            }
            Err(e) => adapters.push(format!("{name} (unreadable: {e})")),
        }
    }
    if adapters.is_empty() {
        writeln!(r, "adapters        none")?;
    } else {
        for (i, a) in adapters.iter().enumerate() {
            let label = if i == 0 { "adapters" } else { "" };
            writeln!(r, "{label:<16}{a}")?;
        }
    }
    Ok(r)
}

/// The config file of a PEFT adapter directory.
const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The report of `flare info` on a PEFT adapter directory (`adapter_config.json` and
/// `adapter_model.safetensors`, no `config.json`): the LoRA settings, the base model it was
/// trained on, and the weights as stored. The adapter is loaded in full, so a malformed one is
/// an error naming its file.
pub fn adapter_report(dir: &Path) -> Result<String> {
    let a = load_adapter(dir, &candle_core::Device::Cpu)?;
    let c = &a.config;
    let weights = dir.join(ADAPTER_WEIGHTS);
    let size = std::fs::metadata(&weights)
        .with_context(|| format!("opening {}", weights.display()))?
        .len();
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let header = read_header(&weights)?;
    for (_, dtype, shape) in &header {
        *by_dtype.entry(dtype.clone()).or_default() += shape.iter().product::<u64>();
    }
    let params: u64 = by_dtype.values().sum();
    let mut targets = c.target_modules.clone();
    targets.sort();
    let mut r = String::new();
    writeln!(r, "adapter directory {}", dir.display())?;
    writeln!(
        r,
        "type            {} (PEFT), r {}, alpha {}, scaling {}{}, dropout {}",
        c.peft_type,
        c.r,
        c.lora_alpha,
        a.scaling(),
        if c.use_rslora { " (rsLoRA)" } else { "" },
        c.lora_dropout
    )?;
    writeln!(r, "targets         {}", targets.join(", "))?;
    writeln!(
        r,
        "base model      {}",
        c.base_model_name_or_path
            .as_deref()
            .unwrap_or("(not recorded)")
    )?;
    if let Some(t) = &c.task_type {
        writeln!(r, "task type       {t}")?;
    }
    writeln!(
        r,
        "weights         {ADAPTER_WEIGHTS}, {}, {} tensors ({} modules)",
        human_bytes(size),
        header.len(),
        a.tensors.len()
    )?;
    let dtypes: Vec<String> = by_dtype
        .iter()
        .map(|(d, n)| format!("{d} ({})", human_count(*n)))
        .collect();
    writeln!(r, "dtype on disk   {}", dtypes.join(", "))?;
    writeln!(r, "parameters      {} ({params})", human_count(params))?;
    Ok(r)
}

/// Runs `flare info`.
pub fn run_info(args: &InfoArgs) -> Result<()> {
    print!("{}", report(&args.dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(12_345), "12.3K");
        assert_eq!(human_count(494_032_768), "494.03M");
        assert_eq!(human_count(1_543_714_304), "1.54B");
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(184_048), "179.7 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
