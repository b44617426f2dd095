//! A rough estimate of the memory a LoRA training run needs, checked against what the device
//! has free before anything is allocated, so that a run that cannot fit (`--lora-r 100000`)
//! stops with the estimate and a hint instead of being killed by the OOM killer half-way.
//!
//! The formula ([`MemoryEstimate::for_run`]), in bytes, with `d` the bytes of the compute dtype,
//! `T = batch_size × max_seq_len` the tokens of the largest batch the settings allow, `L` layers,
//! `h` hidden, `i` intermediate, `q = heads × head_dim`, `kv = kv_heads × head_dim`, `V` vocab:
//!
//! - frozen weights: every parameter of the base model × `d` (embeddings, the untied
//!   `lm_head`, per layer q/k/v/o, gate/up/down, biases, norms);
//! - adapters: `P = Σ r × (in + out)` over the targeted modules, f32: `4P`;
//! - gradients: `4P`; AdamW's two moments: `8P`;
//! - activations kept for the backward pass,
//!   `L × T × (d × (4h + 4q + 4kv + 4i) + 4 × r × m)` plus `(C × V + T × h) × d`, where `m` is
//!   the number of targeted modules per layer: per token and layer the two norms' inputs and
//!   outputs, q as projected, after RoPE and as flash attention's rows, the attention output,
//!   k likewise after RoPE and as rows, v as projected and as rows, gate, up, `silu(gate)` and
//!   their product, and each adapter's `x·A` (f32); and the fused linear + cross-entropy's one
//!   chunk of logits (`C` rows, [`crate::ops::linear_cross_entropy::chunk_rows`]) and the
//!   hidden states' gradient it keeps for the backward. Training attention is flash attention:
//!   no `seq × seq` scores are kept (nor formed).
//! - with gradient checkpointing ([`crate::models::Transformer::set_gradient_checkpointing`])
//!   the per-layer activations are kept for one layer only (the one being recomputed), plus
//!   each layer's input: `L × T × h × d + (one layer's term above)` plus the loss's term;
//!   with the inputs offloaded to host memory (`offload`) the device keeps the chain's input
//!   and output instead, `2 × T × h × d + (one layer's term)`, and the host the
//!   `L × T × h × d` ([`MemoryEstimate::host`]).
//!
//! [`TrainConfig::gradient_checkpointing`]'s `auto` ([`decide_checkpointing`]) turns
//! checkpointing on when the estimate without it exceeds the free memory of a CUDA device, and
//! offloads the layers' inputs when the estimate with on-device checkpointing exceeds it too.
//! On the CPU `auto` means off: the memory there is the host's (large, shared with everything
//! else and backed by swap, so "free" is a moving target), and compute, not memory, bounds a
//! CPU run, so the extra forward of the recomputation would be paid for nothing; a run that
//! cannot fit is refused with the estimate instead, and `on` still forces checkpointing.
//!
//! It leaves out allocator slack, the tokeniser and the transient buffers of the backward pass,
//! and assumes every batch may be as long as `max_seq_len` (short data uses less), so it is a
//! guide within a factor of about two, not a promise: the check refuses only when the estimate
//! exceeds what is available. Available memory is `MemAvailable` of `/proc/meminfo` on the CPU
//! and the free device memory the CUDA driver reports on a GPU; where it cannot be read (a CPU
//! without `/proc/meminfo`), [`check_memory`] cannot check and returns `Ok`.

use std::path::Path;

use candle_core::Device;

use crate::models::ModelConfig;
use crate::train::{Checkpointing, TrainConfig};
use crate::{Error, Result};

/// The memory a training run needs, by part, in bytes (see the module docs for the formula).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The frozen base model at the compute dtype.
    pub weights: u64,
    /// The LoRA adapters (f32).
    pub adapters: u64,
    /// The adapters' gradients (f32).
    pub gradients: u64,
    /// AdamW's first and second moments (f32).
    pub optimizer: u64,
    /// Activations kept for the backward pass of the largest batch.
    pub activations: u64,
    /// The number of trainable (adapter) parameters.
    pub trainable_params: u64,
    /// Whether the activations are those of a run with gradient checkpointing.
    pub checkpointing: bool,
    /// Whether the checkpointed layers' inputs are in host memory (not counted above).
    pub offload: bool,
    /// Host memory the offloaded layer inputs take (0 without offload).
    pub host: u64,
}

impl MemoryEstimate {
    /// The whole estimate.
    pub fn total(&self) -> u64 {
        self.weights + self.adapters + self.gradients + self.optimizer + self.activations
    }

    /// The estimate of a run of `train` on a model of `model`, the dtype parsed from
    /// `train.dtype`, with gradient checkpointing when `train.gradient_checkpointing` is `On`
    /// (`Auto` is decided against the free memory: [`check_memory`]). Saturates instead of
    /// overflowing on absurd settings.
    ///
    /// ```
    /// # let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    /// #     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    /// #     "rms_norm_eps": 1e-6, "vocab_size": 256, "max_position_embeddings": 128}"#;
    /// let model = flare::models::ModelConfig::from_json_str(json, "config.json")?;
    /// let mut train = flare::train::TrainConfig { lora_r: 8, ..Default::default() };
    /// let small = flare::train::memory::MemoryEstimate::for_run(&model, &train)?;
    /// train.lora_r = 100_000;
    /// let big = flare::train::memory::MemoryEstimate::for_run(&model, &train)?;
    /// assert_eq!(big.trainable_params, 12_500 * small.trainable_params);
    /// assert!(big.total() > 50 * small.total());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn for_run(model: &ModelConfig, train: &TrainConfig) -> Result<Self> {
        match train.gradient_checkpointing {
            Checkpointing::On => Self::for_run_with(model, train, true),
            Checkpointing::Offload => Self::for_run_offloaded(model, train),
            Checkpointing::Off | Checkpointing::Auto => Self::for_run_with(model, train, false),
        }
    }

    /// [`for_run`](Self::for_run) with gradient checkpointing on, the layers' inputs in host
    /// memory ([`host`](Self::host)).
    pub fn for_run_offloaded(model: &ModelConfig, train: &TrainConfig) -> Result<Self> {
        Self::estimate(model, train, true, true)
    }

    /// [`for_run`](Self::for_run) with gradient checkpointing on (inputs on the device) or off
    /// as given.
    ///
    /// ```
    /// # let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    /// #     "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
    /// #     "rms_norm_eps": 1e-6, "vocab_size": 256, "max_position_embeddings": 128}"#;
    /// use flare::train::memory::MemoryEstimate;
    /// let model = flare::models::ModelConfig::from_json_str(json, "config.json")?;
    /// let train = flare::train::TrainConfig::default();
    /// let off = MemoryEstimate::for_run_with(&model, &train, false)?;
    /// let on = MemoryEstimate::for_run_with(&model, &train, true)?;
    /// assert!(on.activations < off.activations / 2);
    /// assert_eq!(on.weights, off.weights);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn for_run_with(
        model: &ModelConfig,
        train: &TrainConfig,
        checkpointing: bool,
    ) -> Result<Self> {
        Self::estimate(model, train, checkpointing, false)
    }

    fn estimate(
        model: &ModelConfig,
        train: &TrainConfig,
        checkpointing: bool,
        offload: bool,
    ) -> Result<Self> {
        let d = train.parsed_dtype()?.size_in_bytes() as u64;
        let c = model;
        let (h, i, v) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
        );
        let (heads, l) = (c.num_attention_heads as u64, c.num_hidden_layers as u64);
        let q = heads.saturating_mul(c.head_dim as u64);
        let kv = (c.num_key_value_heads as u64).saturating_mul(c.head_dim as u64);
        let r = train.lora_r as u64;
        let lora = train.lora();
        // (name, in, out, bias) of the projections of one layer.
        let projections = [
            ("self_attn.q_proj", h, q, c.qkv_bias),
            ("self_attn.k_proj", h, kv, c.qkv_bias),
            ("self_attn.v_proj", h, kv, c.qkv_bias),
            ("self_attn.o_proj", q, h, c.o_bias),
            ("mlp.gate_proj", h, i, c.mlp_bias),
            ("mlp.up_proj", h, i, c.mlp_bias),
            ("mlp.down_proj", i, h, c.mlp_bias),
        ];
        let mut layer_params = 2 * h; // the two norms
        let mut lora_params = 0u64;
        let mut targeted = 0u64;
        for (name, fan_in, fan_out, bias) in projections {
            layer_params = layer_params
                .saturating_add(fan_in.saturating_mul(fan_out))
                .saturating_add(if bias { fan_out } else { 0 });
            if lora.targets(&format!("model.layers.0.{name}")) {
                lora_params = lora_params.saturating_add(r.saturating_mul(fan_in + fan_out));
                targeted += 1;
            }
        }
        let embeddings = v.saturating_mul(h);
        let head = if c.tie_word_embeddings { 0 } else { embeddings };
        let frozen = l
            .saturating_mul(layer_params)
            .saturating_add(embeddings)
            .saturating_add(head)
            .saturating_add(h);
        let p = l.saturating_mul(lora_params);

        let (batch, seq) = (train.batch_size as u64, train.max_seq_len as u64);
        let tokens = batch.saturating_mul(seq);
        let per_token = d
            .saturating_mul(4 * h + 4 * q + 4 * kv)
            .saturating_add(4u64.saturating_mul(r).saturating_mul(targeted));
        // The MLP's activations; offloaded runs tile the MLP (Transformer::set_mlp_tile), so
        // they hold one tile's.
        let mlp_tokens = if checkpointing && offload {
            tokens.min(crate::models::transformer::MLP_TILE_TOKENS as u64)
        } else {
            tokens
        };
        let per_layer = tokens
            .saturating_mul(per_token)
            .saturating_add(mlp_tokens.saturating_mul(d).saturating_mul(4 * i));
        // The fused linear + cross-entropy holds one chunk of logits (its gradient is written in
        // place) and d(hidden) from the forward to the backward.
        let chunk = crate::ops::linear_cross_entropy::chunk_rows(
            tokens as usize,
            v as usize,
            train.parsed_dtype()?,
        ) as u64;
        let logits = chunk
            .saturating_mul(v)
            .saturating_add(tokens.saturating_mul(h))
            .saturating_mul(d);
        let input = tokens.saturating_mul(h).saturating_mul(d);
        let inputs = l.saturating_mul(input);
        let layers = match (checkpointing, offload) {
            // The chain's input and output, and one layer's intermediates at a time.
            (true, true) => input.saturating_mul(2).saturating_add(per_layer),
            // Each layer's input, and one layer's intermediates at a time.
            (true, false) => inputs.saturating_add(per_layer),
            (false, _) => l.saturating_mul(per_layer),
        };
        let offload = checkpointing && offload;
        Ok(MemoryEstimate {
            weights: frozen.saturating_mul(d),
            adapters: p.saturating_mul(4),
            gradients: p.saturating_mul(4),
            optimizer: p.saturating_mul(8),
            activations: layers.saturating_add(logits),
            trainable_params: p,
            checkpointing,
            offload,
            host: if offload { inputs } else { 0 },
        })
    }

    /// The parts, for messages: `weights 1.9 GiB, adapters 35.2 MiB, ...`.
    pub fn breakdown(&self) -> String {
        format!(
            "frozen weights {}, adapters {}, gradients {}, AdamW state {}, activations {}{}",
            human_bytes(self.weights),
            human_bytes(self.adapters),
            human_bytes(self.gradients),
            human_bytes(self.optimizer),
            human_bytes(self.activations),
            match (self.checkpointing, self.offload) {
                (true, true) => format!(
                    " (gradient checkpointing; the layers' inputs, {}, in host memory)",
                    human_bytes(self.host)
                ),
                (true, false) => " (gradient checkpointing)".to_string(),
                _ => String::new(),
            }
        )
    }
}

/// A size in bytes for messages: `1.23 GiB`, `180.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if x >= KIB * KIB * KIB {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    } else if x >= KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else if x >= KIB {
        format!("{:.1} KiB", x / KIB)
    } else {
        format!("{n} B")
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The memory a new allocation on `device` can use, in bytes: `MemAvailable` on the CPU, the
/// driver's free memory on a CUDA device. `None` where it cannot be known (no
/// `/proc/meminfo`, another backend).
pub fn available_memory(device: &Device) -> Result<Option<u64>> {
    match device {
        Device::Cpu => Ok(std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(parse_meminfo_available)),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use crate::runtime::cuda::CudaResultExt;
            use candle_core::cuda_backend::cudarc::driver::result;
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread()
                .cuda_ctx("binding the CUDA context to query free memory")?;
            let (free, _total) = result::mem_get_info().cuda_ctx("querying free device memory")?;
            Ok(Some(free as u64))
        }
        #[allow(unreachable_patterns)]
        _ => Ok(None),
    }
}

/// Refuses `estimate` when it exceeds `available` on `device` (named in the message), with
/// the breakdown and a hint.
pub fn check_fits(estimate: &MemoryEstimate, available: u64, device: &str) -> Result<()> {
    if estimate.total() <= available {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        device: device.to_string(),
        needed: human_bytes(estimate.total()),
        available: human_bytes(available),
        detail: format!(
            "{}; {} trainable parameters",
            estimate.breakdown(),
            estimate.trainable_params
        ),
    })
}

/// Refuses an offloaded run (`estimate.offload`) whose layer inputs (`estimate.host` bytes) do
/// not fit the host's available memory `host`; any other run passes.
///
/// ```
/// # let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
/// #     "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
/// #     "rms_norm_eps": 1e-6, "vocab_size": 256, "max_position_embeddings": 128}"#;
/// use flare::train::memory::{check_host_fits, MemoryEstimate};
/// let model = flare::models::ModelConfig::from_json_str(json, "config.json")?;
/// let train = flare::train::TrainConfig::default();
/// let e = MemoryEstimate::for_run_offloaded(&model, &train)?;
/// assert!(check_host_fits(&e, e.host).is_ok());
/// let err = check_host_fits(&e, e.host - 1).unwrap_err().to_string();
/// assert!(err.contains("host (offloaded checkpoints)"), "{err}");
/// let on = MemoryEstimate::for_run_with(&model, &train, true)?;
/// assert!(check_host_fits(&on, 0).is_ok());
/// # Ok::<(), flare::Error>(())
/// ```
pub fn check_host_fits(estimate: &MemoryEstimate, host: u64) -> Result<()> {
    if !estimate.offload || estimate.host <= host {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        device: "host (offloaded checkpoints)".into(),
        needed: human_bytes(estimate.host),
        available: human_bytes(host),
        detail: format!(
            "the layers' inputs of the largest batch; {}",
            estimate.breakdown()
        ),
    })
}

/// Whether a run uses gradient checkpointing, and why (its `Display` is the line the CLI
/// prints: `gradient checkpointing: on (estimate 91.20 GiB > free 78.50 GiB)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDecision {
    /// Checkpointing on.
    pub on: bool,
    /// The layers' inputs in host memory (only with `on`).
    pub offload: bool,
    /// Why, in words (`requested`, `estimate 91.20 GiB > free 78.50 GiB`, ...).
    pub reason: String,
}

impl std::fmt::Display for CheckpointDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match (self.on, self.offload) {
            (true, true) => "offload",
            (true, false) => "on",
            _ => "off",
        };
        write!(f, "gradient checkpointing: {state} ({})", self.reason)
    }
}

/// The choice of [`TrainConfig::gradient_checkpointing`]: `On`, `Offload` and `Off` as given;
/// `Auto` on exactly when the estimate without checkpointing (`without`, bytes) exceeds the
/// `free` memory of a CUDA device (`cuda`), and offloaded when the estimate with on-device
/// checkpointing (`with`) exceeds it too; off on the CPU (see the module docs for why) and
/// where the free memory is unknown.
///
/// ```
/// use flare::train::{memory::decide_checkpointing, Checkpointing};
/// let gib = 1u64 << 30;
/// let d = decide_checkpointing(Checkpointing::Auto, 90 * gib, 40 * gib, Some(78 * gib), true);
/// assert!(d.on && !d.offload);
/// assert_eq!(d.to_string(), "gradient checkpointing: on (estimate 90.00 GiB > free 78.00 GiB)");
/// let d = decide_checkpointing(Checkpointing::Auto, 190 * gib, 90 * gib, Some(78 * gib), true);
/// assert!(d.on && d.offload);
/// assert!(!decide_checkpointing(Checkpointing::Auto, 40 * gib, 30 * gib, Some(78 * gib), true).on);
/// assert!(!decide_checkpointing(Checkpointing::Auto, 90 * gib, 9 * gib, Some(78 * gib), false).on);
/// assert!(decide_checkpointing(Checkpointing::On, 1, 1, Some(78 * gib), false).on);
/// ```
pub fn decide_checkpointing(
    setting: Checkpointing,
    without: u64,
    with: u64,
    free: Option<u64>,
    cuda: bool,
) -> CheckpointDecision {
    let (on, offload, reason) = match (setting, free) {
        (Checkpointing::Off, _) => (false, false, "requested".to_string()),
        (Checkpointing::On, _) => (true, false, "requested".to_string()),
        (Checkpointing::Offload, _) => (true, true, "requested".to_string()),
        (Checkpointing::Auto, _) if !cuda => (
            false,
            false,
            "auto: off on the CPU, whose memory is the host's; use `on` to force it".to_string(),
        ),
        (Checkpointing::Auto, None) => {
            (false, false, "auto: the free memory is unknown".to_string())
        }
        (Checkpointing::Auto, Some(free)) if without <= free => (
            false,
            false,
            format!(
                "estimate {} <= free {}",
                human_bytes(without),
                human_bytes(free)
            ),
        ),
        (Checkpointing::Auto, Some(free)) if with <= free => (
            true,
            false,
            format!(
                "estimate {} > free {}",
                human_bytes(without),
                human_bytes(free)
            ),
        ),
        (Checkpointing::Auto, Some(free)) => (
            true,
            true,
            format!(
                "estimate with on-device checkpointing {} > free {}",
                human_bytes(with),
                human_bytes(free)
            ),
        ),
    };
    CheckpointDecision {
        on,
        offload,
        reason,
    }
}

/// What [`check_memory`] decided: the estimate of the run as it will go, and whether it uses
/// gradient checkpointing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The estimate, with checkpointing if it is on.
    pub estimate: MemoryEstimate,
    /// Gradient checkpointing on or off, and why.
    pub checkpointing: CheckpointDecision,
}

/// Estimates the memory of a run of `train` (reading the model's `config.json`), decides
/// gradient checkpointing ([`decide_checkpointing`]), and refuses the run when its estimate
/// exceeds what `device` has available ([`Error::OutOfMemory`], with the estimate, the
/// available memory and a hint). Call before loading anything. Where the available memory
/// cannot be read it is not checked.
pub fn check_memory(train: &TrainConfig, device: &Device) -> Result<MemoryPlan> {
    let model = ModelConfig::from_dir(Path::new(&train.model))?;
    let without = MemoryEstimate::for_run_with(&model, train, false)?;
    let with = MemoryEstimate::for_run_with(&model, train, true)?;
    let available = available_memory(device)?;
    let checkpointing = decide_checkpointing(
        train.gradient_checkpointing,
        without.total(),
        with.total(),
        available,
        device.is_cuda(),
    );
    let estimate = match (checkpointing.on, checkpointing.offload) {
        (true, true) => MemoryEstimate::for_run_offloaded(&model, train)?,
        (true, false) => with,
        _ => without,
    };
    // Offloaded inputs live in the host's memory: on a GPU run checked against what the host
    // has, on the CPU the same memory as the rest of the run, so taken out of it.
    let available = match (estimate.offload, device.is_cpu(), available) {
        (true, false, _) => {
            if let Some(host) = available_memory(&candle_core::Device::Cpu)? {
                check_host_fits(&estimate, host)?;
            }
            available
        }
        (true, true, Some(a)) => {
            check_host_fits(&estimate, a)?;
            Some(a.saturating_sub(estimate.host))
        }
        _ => available,
    };
    if let Some(available) = available {
        let fits = check_fits(&estimate, available, &crate::error::device_name(device));
        if let (
            false,
            Err(Error::OutOfMemory {
                device,
                needed,
                available,
                detail,
            }),
        ) = (checkpointing.on, &fits)
        {
            // Say what checkpointing would give.
            let offloaded = MemoryEstimate::for_run_offloaded(&model, train)?;
            return Err(Error::OutOfMemory {
                device: device.clone(),
                needed: needed.clone(),
                available: available.clone(),
                detail: format!(
                    "{detail}; with gradient_checkpointing on about {}, with offload about {}",
                    human_bytes(with.total()),
                    human_bytes(offloaded.total())
                ),
            });
        }
        fits?;
    }
    Ok(MemoryPlan {
        estimate,
        checkpointing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        // The bundled demo model's shape (Qwen2: q/k/v biases, tied embeddings).
        ModelConfig::from_json_str(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128,
                "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 1024,
                "max_position_embeddings": 512, "tie_word_embeddings": true}"#,
            "config.json",
        )
        .unwrap()
    }

    #[test]
    fn formula_on_a_known_config() {
        let train = TrainConfig {
            lora_r: 8,
            batch_size: 2,
            max_seq_len: 64,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        };
        let e = MemoryEstimate::for_run(&model(), &train).unwrap();
        // h 128, i 512, q 128, kv 64, V 1024, L 4, f32.
        // Per layer: norms 256, q 128·128+128, k 128·64+64, v 128·64+64, o 128·128,
        // gate/up/down 3·128·512: 256 + 16512 + 8256 + 8256 + 16384 + 196608 = 246272.
        let frozen = 4 * 246_272 + 1024 * 128 + 128;
        assert_eq!(e.weights, frozen * 4);
        // q: 8·(128+128), v: 8·(128+64), per layer 3584, 4 layers.
        assert_eq!(e.trainable_params, 4 * 3584);
        assert_eq!(
            (e.adapters, e.gradients, e.optimizer),
            (4 * 14_336, 4 * 14_336, 8 * 14_336)
        );
        // T = 128; per token 4·(512 + 512 + 256 + 2048) + 4·8·2 = 13376 (no s² scores: flash
        // attention); the loss: one chunk of all 128 tokens' logits (128·1024) and d(hidden)
        // (128·128), f32.
        let act = 4 * 128 * 13_376 + (128 * 1024 + 128 * 128) * 4;
        assert_eq!(e.activations, act);
        assert_eq!(e.total(), frozen * 4 + 16 * 14_336 + act);
    }

    #[test]
    fn huge_rank_is_refused_and_the_demo_is_not() {
        let demo = TrainConfig::default();
        let e = MemoryEstimate::for_run(&model(), &demo).unwrap();
        // The demo's default settings need well under a GiB.
        assert!(e.total() < 1 << 30, "{}", e.breakdown());
        check_fits(&e, 2 << 30, "cpu").unwrap();
        let huge = TrainConfig {
            lora_r: 100_000,
            ..Default::default()
        };
        let e = MemoryEstimate::for_run(&model(), &huge).unwrap();
        // 1.13e9 adapter parameters at 16 bytes each alone: ~16.8 GiB.
        assert!(e.total() > 40 << 30, "{}", e.breakdown());
        let err = check_fits(&e, 16 << 30, "cpu").unwrap_err().to_string();
        assert!(err.contains("16.00 GiB") && err.contains("lora_r"), "{err}");
    }

    #[test]
    fn checkpointing_keeps_one_layer_and_the_inputs() {
        let mut train = TrainConfig {
            lora_r: 8,
            batch_size: 2,
            max_seq_len: 64,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        };
        let off = MemoryEstimate::for_run_with(&model(), &train, false).unwrap();
        let on = MemoryEstimate::for_run_with(&model(), &train, true).unwrap();
        // As in formula_on_a_known_config: per layer 128·13376 (4 layers), the loss's chunk
        // (128·1024 + 128·128)·4; the inputs 4 layers × 128 tokens × 128 × 4 bytes.
        let per_layer = 128 * 13_376;
        let logits = (128 * 1024 + 128 * 128) * 4;
        assert_eq!(off.activations, 4 * per_layer + logits);
        assert_eq!(on.activations, 4 * 128 * 128 * 4 + per_layer + logits);
        assert!(on.checkpointing && !off.checkpointing);
        assert_eq!(on.total() - on.activations, off.total() - off.activations);
        assert!(on.breakdown().contains("gradient checkpointing"));
        // Offloaded: the chain's input and output on the device, the 4 inputs on the host.
        let offloaded = MemoryEstimate::for_run_offloaded(&model(), &train).unwrap();
        assert_eq!(
            offloaded.activations,
            2 * 128 * 128 * 4 + per_layer + logits
        );
        assert_eq!(offloaded.host, 4 * 128 * 128 * 4);
        assert!(offloaded.offload && offloaded.checkpointing && !on.offload && on.host == 0);
        assert!(offloaded.breakdown().contains("in host memory"));
        train.gradient_checkpointing = Checkpointing::Offload;
        assert_eq!(
            MemoryEstimate::for_run(&model(), &train).unwrap(),
            offloaded
        );
        // for_run follows the setting; auto is estimated as off (decided against free memory).
        train.gradient_checkpointing = Checkpointing::On;
        assert_eq!(MemoryEstimate::for_run(&model(), &train).unwrap(), on);
        train.gradient_checkpointing = Checkpointing::Auto;
        assert_eq!(MemoryEstimate::for_run(&model(), &train).unwrap(), off);
        // Past MLP_TILE_TOKENS the offloaded run's MLP holds one tile: each further token
        // costs the layer's other activations (4·(h + q + 2 kv)·4 bytes here, plus the
        // adapters' r-wide intermediates, and the loss's d(hidden)) but not the MLP's 4·i·4.
        let tile = crate::models::transformer::MLP_TILE_TOKENS;
        let at = |tokens: usize| {
            let t = TrainConfig {
                batch_size: 1,
                max_seq_len: tokens,
                ..train.clone()
            };
            MemoryEstimate::for_run_offloaded(&model(), &t)
                .unwrap()
                .activations
        };
        let (a, b) = (at(2 * tile), at(2 * tile + 1024));
        let c = model();
        let mlp = 1024 * 4 * c.intermediate_size as u64 * 4;
        let on_device = |tokens: usize| {
            let t = TrainConfig {
                batch_size: 1,
                max_seq_len: tokens,
                ..train.clone()
            };
            MemoryEstimate::for_run_with(&model(), &t, true)
                .unwrap()
                .activations
        };
        let inputs_growth = 1024 * c.hidden_size as u64 * 4 * c.num_hidden_layers as u64;
        assert_eq!(
            on_device(2 * tile + 1024) - on_device(2 * tile) - (b - a),
            mlp + inputs_growth - 1024 * c.hidden_size as u64 * 4 * 2,
            "the offloaded estimate grows without the MLP's per-token term"
        );
    }

    #[test]
    fn auto_decides_from_the_estimate_and_the_free_memory() {
        let gib = 1u64 << 30;
        // With on-device checkpointing the estimate is taken as a third of the plain one.
        let auto = |without: u64, free, cuda| {
            decide_checkpointing(Checkpointing::Auto, without, without / 3, free, cuda)
        };
        // CUDA: on exactly when the estimate exceeds the free memory.
        let d = auto(90 * gib, Some(78 * gib), true);
        assert!(d.on);
        assert_eq!(
            d.to_string(),
            "gradient checkpointing: on (estimate 90.00 GiB > free 78.00 GiB)"
        );
        let d = auto(78 * gib, Some(78 * gib), true);
        assert!(!d.on, "{d}");
        assert!(d.reason.contains("<= free 78.00 GiB"), "{d}");
        assert!(auto(78 * gib + 1, Some(78 * gib), true).on);
        // Offload when even on-device checkpointing exceeds the free memory.
        let d = auto(300 * gib, Some(78 * gib), true);
        assert!(d.on && d.offload, "{d}");
        assert_eq!(
            d.to_string(),
            "gradient checkpointing: offload (estimate with on-device checkpointing \
             100.00 GiB > free 78.00 GiB)"
        );
        assert!(!auto(90 * gib, Some(78 * gib), true).offload);
        // Unknown free memory, or the CPU: off.
        assert!(!auto(90 * gib, None, true).on);
        let d = auto(90 * gib, Some(8 * gib), false);
        assert!(!d.on && d.reason.contains("CPU"), "{d}");
        // On and Off are taken as given.
        for (cuda, free) in [(true, Some(gib)), (false, None)] {
            let on = decide_checkpointing(Checkpointing::On, 1, 1, free, cuda);
            assert!(on.on && !on.offload);
            let off = decide_checkpointing(Checkpointing::Off, 100 * gib, 90 * gib, free, cuda);
            assert!(!off.on && !off.offload);
            let o = decide_checkpointing(Checkpointing::Offload, 1, 1, free, cuda);
            assert!(o.on && o.offload);
        }
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(22_000_000 * 1024));
        assert_eq!(parse_meminfo_available("MemFree: 1 kB\n"), None);
    }
}
