//! Compiles the CUDA kernels in `src/cu` to PTX with nvcc, only with the `cuda` feature.
//!
//! Environment: `CUDA_COMPUTE_CAP` (the virtual architecture, default 90, e.g. `80`, `90`,
//! `90a`), and `CUDA_ROOT` / `CUDA_PATH` / `CUDA_TOOLKIT_ROOT_DIR` or `PATH` to find nvcc.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, one PTX module each (`src/cu/<name>.cu` -> `$OUT_DIR/<name>.ptx`).
const KERNELS: &[&str] = &[
    "softmax",
    "rms_norm",
    "gemm_small",
    "rope",
    "swiglu",
    "argmax",
    "gemv",
    "cross_entropy",
    "adamw",
    "attention",
    "decode",
];
/// Headers the kernels include.
const HEADERS: &[&str] = &["common.cuh"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for name in KERNELS {
        println!("cargo:rerun-if-changed=src/cu/{name}.cu");
    }
    for name in HEADERS {
        println!("cargo:rerun-if-changed=src/cu/{name}");
    }
    for var in [
        "CUDA_COMPUTE_CAP",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_TOOLKIT_ROOT_DIR",
        "NVCC_CCBIN",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let cap = compute_cap();
    let (nvcc, root) = find_nvcc();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("src")
        .join("cu");

    for name in KERNELS {
        let src = src_dir.join(format!("{name}.cu"));
        let ptx = out_dir.join(format!("{name}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg("-O3")
            .arg(format!("-arch=compute_{cap}"))
            .arg("-std=c++17")
            .arg("-I")
            .arg(&src_dir);
        if let Some(root) = &root {
            let include = root.join("include");
            if include.is_dir() {
                cmd.arg("-I").arg(include);
            }
        }
        if let Ok(ccbin) = env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        cmd.arg(&src).arg("-o").arg(&ptx);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!("flare-kernels: failed to run {}: {e}", nvcc.display());
        });
        if !output.status.success() {
            panic!(
                "flare-kernels: nvcc failed on {} ({})\n--- stdout\n{}\n--- stderr\n{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// The virtual architecture number from `CUDA_COMPUTE_CAP` (digits, optionally followed by a
/// letter such as `90a`), 90 by default.
fn compute_cap() -> String {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_default();
    let cap = raw
        .trim()
        .trim_start_matches("sm_")
        .trim_start_matches("compute_");
    if cap.is_empty() {
        return "90".to_string();
    }
    let digits = cap.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &cap[digits.len()..];
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || suffix.len() > 1 {
        panic!(
            "flare-kernels: CUDA_COMPUTE_CAP={raw:?} is not a compute capability like 80, 90 or 90a"
        );
    }
    cap.to_string()
}

/// nvcc from `CUDA_ROOT`, `CUDA_PATH` or `CUDA_TOOLKIT_ROOT_DIR` (`<root>/bin/nvcc`), else from
/// `PATH`; with the toolkit root when known.
fn find_nvcc() -> (PathBuf, Option<PathBuf>) {
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_TOOLKIT_ROOT_DIR"] {
        if let Some(root) = env::var_os(var).map(PathBuf::from) {
            let nvcc = root.join("bin").join("nvcc");
            if nvcc.is_file() {
                return (nvcc, Some(root));
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                let root = dir.parent().map(Path::to_path_buf);
                return (nvcc, root);
            }
        }
    }
    for root in ["/usr/local/cuda", "/opt/cuda"] {
        let nvcc = Path::new(root).join("bin").join("nvcc");
        if nvcc.is_file() {
            return (nvcc, Some(PathBuf::from(root)));
        }
    }
    panic!(
        "flare-kernels: the `cuda` feature needs nvcc (CUDA toolkit), but none was found. Set \
         CUDA_ROOT (or CUDA_PATH) to the toolkit directory containing bin/nvcc, or put nvcc on \
         PATH (e.g. `eval \"$(scripts/cuda-toolchain.sh)\"`), or build without `--features cuda`."
    );
}
