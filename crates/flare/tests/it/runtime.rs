//! flare's per-device runtime: nothing expensive (runtime, cuBLASLt handle, kernel module,
//! function handle, GEMM plan) is created per call.
//!
//! These tests read process-wide counters, so they run alone (see `common::exclusive_lock`).
//! All CUDA tests of this binary share one Candle device, so over the whole process flare may
//! create at most one runtime and one cuBLASLt handle.

use candle_core::{DType, Device, Tensor};
use flare::ops::{matmul, rms_norm, softmax_last_dim};
use flare::runtime::{stats, RuntimeStats};

use crate::common::*;

/// The objects of `d` created, without the GEMMs launched (work, not objects).
fn created(d: RuntimeStats) -> RuntimeStats {
    RuntimeStats {
        gemms_launched: 0,
        ..d
    }
}

/// `after − before`, per counter.
fn delta(before: &RuntimeStats, after: &RuntimeStats) -> RuntimeStats {
    RuntimeStats {
        runtimes_created: after.runtimes_created - before.runtimes_created,
        blas_handles_created: after.blas_handles_created - before.blas_handles_created,
        modules_loaded: after.modules_loaded - before.modules_loaded,
        functions_loaded: after.functions_loaded - before.functions_loaded,
        gemm_plans_created: after.gemm_plans_created - before.gemm_plans_created,
        gemms_launched: after.gemms_launched - before.gemms_launched,
    }
}

struct Inputs {
    a: Tensor,
    b: Tensor,
    a16: Tensor,
    b16: Tensor,
    x: Tensor,
    w: Tensor,
    big_a: Tensor,
    big_b: Tensor,
}

impl Inputs {
    fn new(dev: &Device) -> Result<Inputs> {
        let s = |tag: &str| seed(&format!("runtime {tag}"));
        Ok(Inputs {
            a: randn(&[64, 64], DType::F32, dev, s("a"))?,
            b: randn(&[64, 64], DType::F32, dev, s("b"))?,
            a16: randn(&[64, 64], DType::BF16, dev, s("a16"))?,
            b16: randn(&[64, 64], DType::BF16, dev, s("b16"))?,
            x: randn(&[64, 1000], DType::F32, dev, s("x"))?,
            w: randn(&[1000], DType::F32, dev, s("w"))?,
            big_a: randn(&[256, 256], DType::BF16, dev, s("big_a"))?,
            big_b: randn(&[256, 256], DType::BF16, dev, s("big_b"))?,
        })
    }

    /// Op number `i` of a mixed sequence: f32 and bf16 matmul 64^3 (flare's small-GEMM kernel
    /// on CUDA), softmax, rms_norm, and a bf16 matmul 256^3 (cuBLASLt, through a cached plan).
    fn op(&self, i: usize) -> Result<Tensor> {
        match i % 5 {
            0 => matmul(&self.a, &self.b),
            1 => softmax_last_dim(&self.x),
            2 => rms_norm(&self.x, &self.w, 1e-6),
            3 => matmul(&self.a16, &self.b16),
            _ => matmul(&self.big_a, &self.big_b),
        }
    }
}

/// At most this many GEMM plans for the distinct GEMMs of the mixed sequence (the 64^3 ones
/// need none on CUDA; 256^3 bf16 needs one).
const DISTINCT_GEMMS: usize = 3;

/// 1000 mixed forward ops: on the CPU nothing is created at all; on CUDA the first op of each
/// kind may create the runtime (once per process) and one GEMM plan per distinct GEMM, the
/// following 1000 create nothing.
fn no_per_call_resources(dev: &Device) -> Result<()> {
    let inputs = Inputs::new(dev)?;
    let s0 = stats();
    for i in 0..5 {
        inputs.op(i)?;
    }
    dev.synchronize()?;
    let s1 = stats();
    let mut last = None;
    for i in 0..1000 {
        last = Some(inputs.op(i)?);
    }
    dev.synchronize()?;
    let s2 = stats();
    if let Some(t) = last {
        assert_no_nan(&t, "last op")?;
    }
    let warm = delta(&s0, &s1);
    let steady = delta(&s1, &s2);
    println!("stats before {s0:?}\nwarm-up delta {warm:?}\n1000-op delta {steady:?}");

    assert_eq!(
        created(steady),
        RuntimeStats::default(),
        "1000 ops after warm-up created {steady:?}"
    );
    if dev.is_cpu() {
        assert_eq!(warm, RuntimeStats::default(), "CPU ops created {warm:?}");
        assert_eq!(steady.gemms_launched, 0, "CPU ops launched cuBLASLt GEMMs");
    } else {
        assert!(
            s2.runtimes_created <= 1,
            "runtimes created in this process: {s2:?}"
        );
        assert!(
            s2.blas_handles_created <= 1,
            "cuBLASLt handles in this process: {s2:?}"
        );
        assert!(
            s2.runtimes_created >= 1,
            "no runtime was created by CUDA ops: {s2:?}"
        );
        assert!(
            warm.gemm_plans_created <= DISTINCT_GEMMS,
            "warm-up built {} GEMM plans for {DISTINCT_GEMMS} distinct GEMMs",
            warm.gemm_plans_created
        );
        assert!(
            warm.runtimes_created <= 1 && warm.blas_handles_created <= 1,
            "{warm:?}"
        );
    }
    Ok(())
}

/// Backward passes reuse everything too: after one warm-up step, 100 forward + backward steps
/// of a small matmul → rms_norm → softmax chain create nothing.
fn no_per_call_resources_backward(dev: &Device) -> Result<()> {
    let s = |tag: &str| seed(&format!("runtime bwd {tag}"));
    let x = var(&randn(&[32, 64], DType::F32, dev, s("x"))?)?;
    let w = var(&randn(&[64, 48], DType::F32, dev, s("w"))?)?;
    let g = var(&randn(&[48], DType::F32, dev, s("g"))?)?;
    let r = randn(&[32, 48], DType::F32, dev, s("r"))?;
    let step = || -> Result<()> {
        let h = matmul(x.as_tensor(), w.as_tensor())?;
        let h = rms_norm(&h, g.as_tensor(), 1e-6)?;
        let y = softmax_last_dim(&h)?;
        let grads = y.mul(&r)?.sum_all()?.backward()?;
        for v in [&x, &w, &g] {
            grad_of(&grads, v.as_tensor(), "runtime backward");
        }
        Ok(())
    };
    step()?;
    dev.synchronize()?;
    let s1 = stats();
    for _ in 0..100 {
        step()?;
    }
    dev.synchronize()?;
    let d = delta(&s1, &stats());
    assert_eq!(
        created(d),
        RuntimeStats::default(),
        "100 training steps after warm-up created {d:?}"
    );
    Ok(())
}

/// The TF32 switch reads back what was set, and is off by default.
fn tf32_switch(_dev: &Device) -> Result<()> {
    assert!(!flare::runtime::allow_tf32(), "TF32 must be off by default");
    flare::runtime::set_allow_tf32(true);
    let on = flare::runtime::allow_tf32();
    flare::runtime::set_allow_tf32(false);
    assert!(on, "set_allow_tf32(true) did not stick");
    assert!(!flare::runtime::allow_tf32());
    Ok(())
}

device_test!(exclusive: no_per_call_resources, no_per_call_resources_backward, tf32_switch);

/// Every `FLARE_*` switch is read in one place (`runtime/settings.rs`) and documented in the
/// README's table; no other source file of the library or the CLI reads one by name.
#[test]
fn switches_have_one_reader_and_one_table() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let vars: Vec<&str> = flare::runtime::Settings::variables().collect();
    assert_eq!(vars.len(), 12);
    for v in &vars {
        assert!(
            readme.contains(&format!("| `{v}` |")),
            "{v} is missing from the README's table"
        );
    }
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root.join("crates/flare/src"), &mut files);
    walk(&root.join("crates/flare-cli/src"), &mut files);
    assert!(files.len() > 20);
    for f in files {
        if f.ends_with("runtime/settings.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("env::var(\"FLARE_"),
            "{} reads a FLARE_* variable itself",
            f.display()
        );
        for v in &vars {
            assert!(
                !text.contains(&format!("\"{v}\"")),
                "{} names {v} in a string",
                f.display()
            );
        }
    }
}
