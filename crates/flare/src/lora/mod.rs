//! LoRA: low-rank adapters on frozen linear layers, PEFT-compatible.

pub mod config;
pub mod peft;

pub use config::LoraConfig;
pub use peft::{load_adapter, save_adapter, Adapter, AdapterConfig};
