//! flare's integration tests, compiled as one binary and split by theme: one module per op and
//! one for the runtime. Every test body runs on the CPU and, with the `cuda` feature and a GPU,
//! on CUDA device 0 (see `common`).

mod adapter;
mod backprop;
mod checkpointing;
mod common;
mod decode_graph;
mod decode_ops;
mod flash_attention;
mod fuzz;
mod generate;
mod generate_text;
mod hardening_data;
mod linear_cross_entropy;
mod lora;
mod matmul;
mod models;
mod packing;
mod peft;
mod rms_norm;
mod runtime;
mod softmax;
mod softmax_masked;
mod step_graph;
mod text;
mod train;
mod validation;
