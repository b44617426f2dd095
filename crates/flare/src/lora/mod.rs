//! LoRA: low-rank adapters on frozen linear layers, PEFT-compatible.

pub mod config;
pub mod dropout;
pub mod init;
pub mod linear;
pub mod op;
pub mod peft;

pub use config::LoraConfig;
pub use dropout::with_dropout_seed;
pub use linear::{LoraAdapter, LoraLinear};
pub use op::{lora_linear, lora_linear_grouped, lora_linear_reference};
pub use peft::{load_adapter, save_adapter, Adapter, AdapterConfig};
