//! LoRA fine-tuning: data ([`data`]), the optimizer and schedule ([`optim`]), the loss plot
//! ([`plot`]), the identity of a run that checkpoints record ([`identity`]), the memory
//! estimate checked before a run starts ([`memory`]), data-parallel training over several
//! GPUs ([`distributed`]) and the
//! [`Trainer`] that ties them to a [`crate::models::Transformer`].
//!
//! ```no_run
//! use candle_core::Device;
//! use flare::train::{TrainConfig, Trainer};
//! # fn encoder() -> Box<dyn flare::train::Encoder> { unimplemented!() }
//! let cfg = TrainConfig {
//!     model: "models/tiny".into(),
//!     data: "data/train.jsonl".into(),
//!     output_dir: "out".into(),
//!     ..Default::default()
//! };
//! let mut trainer = Trainer::new(cfg, &Device::Cpu, encoder())?;
//! trainer.run(|event| println!("{event:?}"))?;
//! # Ok::<(), flare::Error>(())
//! ```

pub mod config;
pub mod data;
pub mod distributed;
pub mod export;
pub mod identity;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod step_graph;
pub mod trainer;

pub use config::Checkpointing;
pub use data::{BadLines, Batch, DataConfig, Encoder, Example, Message, Tokenized};
pub use distributed::{Collective, Rendezvous, World};
pub use export::{merge_adapter_to_dir, merge_adapter_to_dir_with, MergeProgress};
pub use identity::{Difference, RunIdentity};
pub use optim::{clip_scale, global_grad_norm, AdamW, AdamWConfig, Schedule};
pub use step_graph::{eager_grads, eager_pass, Pass, StepGraphs};
pub use trainer::{batch_nll_sum, DataStats, Event, StepMetrics, TrainConfig, TrainState, Trainer};
