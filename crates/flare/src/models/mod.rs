//! Decoder-only transformer models loaded from Hugging Face directories (Llama, Qwen2,
//! Mistral), with every linear projection a [`crate::lora::LoraLinear`] so that LoRA adapters
//! can be injected by their PEFT module path.
//!
//! - [`ModelConfig`] reads `config.json`.
//! - [`Weights`] memory-maps `model.safetensors` or the shards of
//!   `model.safetensors.index.json`.
//! - [`Transformer`] is the model and its forward.
//! - [`load_peft_adapter`] / [`apply_adapter`] put a PEFT LoRA adapter into it.
//! - [`checkpoint()`] recomputes a block's activations in the backward (activation
//!   checkpointing; [`Transformer::set_gradient_checkpointing`] applies it to every layer).
//! - [`KvCache`] is its preallocated key/value cache for incremental decoding
//!   ([`Transformer::prefill`], [`Transformer::decode_step`]).
//!
//! Errors about a file's contents are [`crate::Error::Io`] of kind `InvalidData` whose context
//! is the file's path and whose message names the field or the tensor.

pub mod adapter;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod transformer;
pub mod weights;

pub use adapter::{apply_adapter, load_peft_adapter};
pub use cache::{KvCache, LayerKv};
pub use checkpoint::{
    checkpoint, checkpoint_chain, checkpoint_rows, ChainBlock, CheckpointGrads, CheckpointStore,
};
pub use config::{Architecture, Llama3RopeScaling, ModelConfig};
pub use transformer::{apply_rope, rope_inv_freq, Transformer};
pub use weights::Weights;
