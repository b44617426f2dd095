//! `flare::ops::flash_attention`: forward against an explicit float64 loop and against the
//! composed reference, gradients by finite differences (f64) and against the reference's
//! autograd (every dtype), a packed batch against each document run alone, the padded
//! convenience, CUDA against CPU, and clear errors.
//!
//! With `S = scale · q kᵀ + mask`, `P = softmax(S)`, `O = P v` and upstream gradient `dO`:
//!   `D_i = Σ_c dO_ic O_ic`, `dS = P ∘ (dO vᵀ − D)`,
//!   `dq = scale · dS k`, `dk = scale · dSᵀ q`, `dv = Pᵀ dO`, summed over a kv head's query heads.

use candle_core::{DType, Device, Tensor};
use flare::ops::flash_attention::flash_attention_reference;
use flare::ops::{
    flash_attention, flash_attention_padded, flash_attention_qkvpacked, rope_tokens,
    FlashAttnParams,
};
use flare::Error;

use crate::common::*;

/// One case: per-document query and key lengths, heads, head dim, mask.
struct Case {
    sq: &'static [usize],
    sk: &'static [usize],
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    window: Option<usize>,
}

const fn case(
    sq: &'static [usize],
    sk: &'static [usize],
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    window: Option<usize>,
) -> Case {
    Case {
        sq,
        sk,
        hq,
        hkv,
        d,
        causal,
        window,
    }
}

/// Lengths {1, 17, 33}; seqlen_q < seqlen_k (prefill after a prefix) and > (rows that see
/// nothing under a causal mask); empty documents; a window with and without causal; more than
/// one 64-key tile (70, 130).
const CASES: &[Case] = &[
    case(&[1, 17, 33], &[1, 17, 33], 4, 2, 8, true, None),
    case(&[1, 17, 33], &[1, 17, 33], 3, 1, 16, false, None),
    case(&[1, 17, 33], &[1, 17, 33], 4, 2, 8, true, Some(5)),
    case(&[3, 17, 1], &[5, 17, 40], 3, 1, 16, true, Some(7)),
    case(&[9, 4], &[4, 9], 4, 2, 8, true, None),
    case(&[6, 0, 5], &[0, 3, 5], 2, 2, 8, false, Some(2)),
    case(&[10], &[13], 4, 1, 8, false, Some(3)),
    case(&[70, 130], &[70, 130], 2, 1, 16, true, None),
];

fn cu(lens: &[usize]) -> Vec<u32> {
    let mut c = vec![0u32];
    for &l in lens {
        c.push(c.last().unwrap() + l as u32);
    }
    c
}

impl Case {
    fn params(&self) -> FlashAttnParams {
        FlashAttnParams::varlen(cu(self.sq), cu(self.sk))
            .causal(self.causal)
            .window_left(self.window)
    }

    fn name(&self) -> String {
        format!(
            "sq {:?} sk {:?} h {}/{} d {} causal {} window {:?}",
            self.sq, self.sk, self.hq, self.hkv, self.d, self.causal, self.window
        )
    }

    fn shapes(&self) -> ([usize; 3], [usize; 3]) {
        let tq: usize = self.sq.iter().sum();
        let tk: usize = self.sk.iter().sum();
        ([tq, self.hq, self.d], [tk, self.hkv, self.d])
    }

    /// Random `q`, `k`, `v` (scaled so that softmaxes are neither flat nor one-hot).
    fn inputs(&self, dtype: DType, dev: &Device, what: &str) -> Result<[Tensor; 3]> {
        let (qs, ks) = self.shapes();
        Ok([
            randn_scaled(&qs, 0.0, 1.5, dtype, dev, seed(&format!("{what} q")))?,
            randn_scaled(&ks, 0.0, 1.5, dtype, dev, seed(&format!("{what} k")))?,
            randn(&ks, dtype, dev, seed(&format!("{what} v")))?,
        ])
    }
}

/// The explicit float64 loop: for every document, head and query row, the visible keys by the
/// bottom-right rule, a softmax over their scores, the weighted sum of values (0 if none).
fn loop_reference(c: &Case, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (hq, hkv, d) = (c.hq, c.hkv, c.d);
    let scale = 1.0 / (d as f64).sqrt();
    let tq: usize = c.sq.iter().sum();
    let mut o = vec![0.0; tq * hq * d];
    let (mut q0, mut k0) = (0, 0);
    for (&sq, &sk) in c.sq.iter().zip(c.sk) {
        for h in 0..hq {
            let hk = h / (hq / hkv);
            for i in 0..sq {
                let diag = i as i64 + sk as i64 - sq as i64;
                let vis: Vec<usize> = (0..sk)
                    .filter(|&j| {
                        let j = j as i64;
                        (!c.causal || j <= diag) && c.window.is_none_or(|w| j >= diag - w as i64)
                    })
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let qi = &q[((q0 + i) * hq + h) * d..][..d];
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let kj = &k[((k0 + j) * hkv + hk) * d..][..d];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let oi = &mut o[((q0 + i) * hq + h) * d..][..d];
                for (&j, &sj) in vis.iter().zip(&s) {
                    let pj = (sj - m).exp() / z;
                    let vj = &v[((k0 + j) * hkv + hk) * d..][..d];
                    for (x, y) in oi.iter_mut().zip(vj) {
                        *x += pj * y;
                    }
                }
            }
        }
        q0 += sq;
        k0 += sk;
    }
    o
}

/// The relative-error bound of outputs and gradients: the dtype's own. These cases use head
/// dims 8 and 16, which the CUDA kernel is not built for, so on CUDA they take the composed
/// path (matmul, `softmax_masked`, matmul), which rounds the scores and the probabilities to a
/// half dtype before the next product: half types get twice the bound there. The kernel's
/// head dims (64, 128) are tested by `kernel_cases` below.
fn bound(dev: &Device, dtype: DType) -> f64 {
    match dtype {
        DType::F16 | DType::BF16 if !dev.is_cpu() => 2.0 * tol(dtype),
        _ => tol(dtype),
    }
}

fn forward(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for c in CASES {
            let what = format!("flash_attention {} {}", c.name(), dt(dtype));
            let [q, k, v] = c.inputs(dtype, dev, &what)?;
            let o = flash_attention(&q, &k, &v, &c.params())?;
            assert_eq!(o.dtype(), dtype, "{what}: output dtype");
            assert_eq!(o.dims(), q.dims(), "{what}: output shape");
            assert_no_nan(&o, &what)?;
            let want = loop_reference(c, &to_f64_vec(&q)?, &to_f64_vec(&k)?, &to_f64_vec(&v)?);
            let want = Tensor::from_vec(want, q.dims(), &Device::Cpu)?;
            assert_close(&o, &want, bound(dev, dtype), &what)?;
            // The composed f64 reference agrees with the loop.
            let r = flash_attention_reference(
                &f64_cpu(&q)?,
                &f64_cpu(&k)?,
                &f64_cpu(&v)?,
                &c.params(),
            )?;
            assert_close(&r, &want, tol(DType::F64), &format!("{what} (reference)"))?;
        }
    }
    Ok(())
}

/// Small cases for finite differences (every input element is perturbed twice).
const FD_CASES: &[Case] = &[
    case(&[1, 4, 3], &[1, 4, 3], 4, 2, 4, true, Some(1)),
    case(&[3, 1], &[5, 2], 3, 1, 8, true, None),
    case(&[4, 2], &[6, 0], 2, 1, 4, false, Some(2)),
    case(&[5], &[3], 2, 2, 4, true, None),
];

/// The analytic gradients of q, k, v against central finite differences of the f64 CPU op (on
/// CUDA: f32 on the device from the same f32-exact inputs).
fn grad_fd(dev: &Device) -> Result<()> {
    for c in FD_CASES {
        let fd = FdCheck::new(dev, format!("flash_attention grad fd {}", c.name()));
        let (qs, ks) = c.shapes();
        let q = fd.input(&qs, "q")?;
        let k = fd.input(&ks, "k")?;
        let v = fd.input(&ks, "v")?;
        let r = fd.constant(&fd.input(&qs, "r")?)?;
        let p = c.params();
        fd.check(&[("dq", &q), ("dk", &k), ("dv", &v)], |t| {
            weighted_loss(&flash_attention(&t[0], &t[1], &t[2], &p)?, r.like(&t[0]))
        })?;
    }
    Ok(())
}

/// The attention `f` (the op or its reference) on fresh variables of `q`, `k`, `v`, and the
/// gradients of `Σ r ∘ O` with respect to them: `[O, dq, dk, dv]`.
fn output_and_grads(
    f: fn(&Tensor, &Tensor, &Tensor, &FlashAttnParams) -> Result<Tensor>,
    [q, k, v]: [&Tensor; 3],
    p: &FlashAttnParams,
    r: &Tensor,
    what: &str,
) -> Result<[Tensor; 4]> {
    let vars = [var(q)?, var(k)?, var(v)?];
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        p,
    )?;
    let g = weighted_loss(&o, r)?.backward()?;
    let [dq, dk, dv] = vars.map(|x| grad_of(&g, x.as_tensor(), what));
    Ok([o, dq, dk, dv])
}

/// flare's gradients against the composed reference's autograd in f64, at every dtype.
fn grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for c in CASES {
            let what = format!("flash_attention grad {} {}", c.name(), dt(dtype));
            let [q, k, v] = c.inputs(dtype, dev, &what)?;
            let r = randn(q.dims(), dtype, dev, seed(&format!("{what} r")))?;
            let [_, grads @ ..] =
                output_and_grads(flash_attention, [&q, &k, &v], &c.params(), &r, &what)?;
            let (qr, kr, vr) = (f64_cpu(&q)?, f64_cpu(&k)?, f64_cpu(&v)?);
            let [_, grads_r @ ..] = output_and_grads(
                flash_attention_reference,
                [&qr, &kr, &vr],
                &c.params(),
                &f64_cpu(&r)?,
                &what,
            )?;
            let tol_g = bound(dev, dtype);
            for ((name, g), gr) in ["dq", "dk", "dv"].iter().zip(&grads).zip(&grads_r) {
                let w = format!("{what} {name}");
                assert_eq!(g.dtype(), dtype, "{w}: gradient dtype");
                assert_close(g, gr, tol_g, &w)?;
            }
        }
    }
    Ok(())
}

/// A packed batch equals each document run alone, forward and gradients: a packed row never
/// attends across documents, and no gradient crosses them.
fn packed_equals_alone(dev: &Device) -> Result<()> {
    let dtype = if dev.is_cpu() { DType::F64 } else { DType::F32 };
    for c in &CASES[..6] {
        let what = format!("flash_attention packed/alone {}", c.name());
        let [q, k, v] = c.inputs(dtype, dev, &what)?;
        let r = randn(q.dims(), dtype, dev, seed(&format!("{what} r")))?;
        let vars = [var(&q)?, var(&k)?, var(&v)?];
        let o = flash_attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            &c.params(),
        )?;
        let grads = weighted_loss(&o, &r)?.backward()?;
        let g: Vec<Tensor> = vars
            .iter()
            .map(|x| grad_of(&grads, x.as_tensor(), &what))
            .collect();
        let (mut q0, mut k0) = (0, 0);
        for (b, (&sq, &sk)) in c.sq.iter().zip(c.sk).enumerate() {
            let w = format!("{what} doc {b}");
            let p = FlashAttnParams::varlen(vec![0, sq as u32], vec![0, sk as u32])
                .causal(c.causal)
                .window_left(c.window);
            let qa = var(&q.narrow(0, q0, sq)?)?;
            let ka = var(&k.narrow(0, k0, sk)?)?;
            let va = var(&v.narrow(0, k0, sk)?)?;
            let oa = flash_attention(qa.as_tensor(), ka.as_tensor(), va.as_tensor(), &p)?;
            let eps = if dev.is_cpu() { 1e-14 } else { tol(dtype) };
            assert_close(&o.narrow(0, q0, sq)?, &f64_cpu(&oa)?, eps, &w)?;
            if sq > 0 && sk > 0 {
                let ga = weighted_loss(&oa, &r.narrow(0, q0, sq)?)?.backward()?;
                for (name, x, full, r0, n) in [
                    ("dq", &qa, &g[0], q0, sq),
                    ("dk", &ka, &g[1], k0, sk),
                    ("dv", &va, &g[2], k0, sk),
                ] {
                    let gw = format!("{w} {name}");
                    let alone = grad_of(&ga, x.as_tensor(), &gw);
                    assert_close(&full.narrow(0, r0, n)?, &f64_cpu(&alone)?, eps, &gw)?;
                }
            }
            q0 += sq;
            k0 += sk;
        }
    }
    Ok(())
}

/// `[B, S, H, D]` through `flash_attention_padded` equals the packed call with offsets
/// `0, S, 2S, …`.
fn padded(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let what = format!("flash_attention padded {}", dt(dtype));
        let (b, sq, sk, hq, hkv, d) = (3, 7, 11, 4, 2, 8);
        let q = randn(&[b, sq, hq, d], dtype, dev, seed(&format!("{what} q")))?;
        let k = randn(&[b, sk, hkv, d], dtype, dev, seed(&format!("{what} k")))?;
        let v = randn(&[b, sk, hkv, d], dtype, dev, seed(&format!("{what} v")))?;
        let p = FlashAttnParams::default().causal(true).window_left(Some(4));
        let o = flash_attention_padded(&q, &k, &v, &p)?;
        assert_eq!(o.dims(), q.dims(), "{what}: shape");
        let pp = FlashAttnParams::padded(b, sq, sk)
            .causal(true)
            .window_left(Some(4));
        let packed = flash_attention(
            &q.reshape((b * sq, hq, d))?,
            &k.reshape((b * sk, hkv, d))?,
            &v.reshape((b * sk, hkv, d))?,
            &pp,
        )?;
        assert_eq!(
            to_f64_vec(&o)?,
            to_f64_vec(&packed)?,
            "{what}: padded vs packed"
        );
        // A custom scale is honoured.
        let half = flash_attention_padded(&q, &k, &v, &p.clone().softmax_scale(0.5))?;
        let half_r = flash_attention_reference(
            &f64_cpu(&q.reshape((b * sq, hq, d))?)?,
            &f64_cpu(&k.reshape((b * sk, hkv, d))?)?,
            &f64_cpu(&v.reshape((b * sk, hkv, d))?)?,
            &pp.clone().softmax_scale(0.5),
        )?;
        assert_close(
            &half.reshape((b * sq, hq, d))?,
            &half_r,
            bound(dev, dtype),
            &what,
        )?;
    }
    Ok(())
}

/// The op on `dev` against the same op on the CPU at the same dtype (on the CPU: trivially).
fn device_vs_cpu(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for c in CASES {
            let what = format!("flash_attention dev/cpu {} {}", c.name(), dt(dtype));
            let [q, k, v] = c.inputs(dtype, dev, &what)?;
            let o = flash_attention(&q, &k, &v, &c.params())?;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let oc = flash_attention(&cpu(&q)?, &cpu(&k)?, &cpu(&v)?, &c.params())?;
            assert_close(&o, &f64_cpu(&oc)?, bound(dev, dtype), &what)?;
        }
    }
    Ok(())
}

fn expect_invalid(r: Result<Tensor>, needle: &str, what: &str) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("flash_attention"),
                "{what}: {s} should name the op"
            );
            assert!(s.contains(needle), "{what}: {s} should name {needle}");
        }
        other => panic!("{what}: expected an invalid-argument error, got {other:?}"),
    }
}

fn errors(dev: &Device) -> Result<()> {
    let f = DType::F32;
    let q = randn(&[5, 4, 8], f, dev, 1)?;
    let k = randn(&[6, 2, 8], f, dev, 2)?;
    let v = randn(&[6, 2, 8], f, dev, 3)?;
    let p = FlashAttnParams::varlen(vec![0, 2, 5], vec![0, 3, 6]).causal(true);
    assert!(flash_attention(&q, &k, &v, &p).is_ok());

    // Heads: 4 query heads over 3 kv heads.
    let k3 = randn(&[6, 3, 8], f, dev, 4)?;
    match flash_attention(&q, &k3, &k3, &p) {
        Err(e @ Error::ShapeMismatch { .. }) => assert!(e.to_string().contains("heads"), "{e}"),
        other => panic!("heads: expected a shape error, got {other:?}"),
    }
    // Head dims, and k against v.
    let k16 = randn(&[6, 2, 16], f, dev, 5)?;
    match flash_attention(&q, &k16, &k16, &p) {
        Err(e @ Error::ShapeMismatch { .. }) => assert!(e.to_string().contains("head_dim"), "{e}"),
        other => panic!("head_dim: expected a shape error, got {other:?}"),
    }
    match flash_attention(&q, &k, &randn(&[6, 1, 8], f, dev, 6)?, &p) {
        Err(e @ Error::ShapeMismatch { .. }) => assert!(e.to_string().contains("k and v"), "{e}"),
        other => panic!("k/v: expected a shape error, got {other:?}"),
    }
    // Offsets.
    for (cq, ck, needle) in [
        (vec![0, 3, 2, 5], vec![0, 3, 3, 6], "cu_seqlens_q"),
        (vec![0, 2, 4], vec![0, 3, 6], "cu_seqlens_q"),
        (vec![1, 2, 5], vec![0, 3, 6], "cu_seqlens_q"),
        (vec![0, 2, 5], vec![0, 3, 7], "cu_seqlens_k"),
        (vec![0, 2, 5], vec![0, 6], "cu_seqlens_k"),
        (vec![5], vec![6], "cu_seqlens_q"),
    ] {
        let bad = FlashAttnParams::varlen(cq.clone(), ck.clone());
        expect_invalid(
            flash_attention(&q, &k, &v, &bad),
            needle,
            &format!("{cq:?} {ck:?}"),
        );
    }
    // Rank, naming the tensor.
    let q4 = q.unsqueeze(0)?;
    expect_invalid(flash_attention(&q4, &k, &v, &p), "q must be", "rank of q");
    expect_invalid(
        flash_attention(&q, &k, &v.flatten_all()?, &p),
        "v must be",
        "rank of v",
    );
    expect_invalid(
        flash_attention_padded(&q, &k, &v, &p),
        "q must be",
        "padded rank",
    );
    // Dtypes.
    match flash_attention(&q, &k.to_dtype(DType::F16)?, &v, &p) {
        Err(e @ Error::DTypeMismatch { .. }) => {
            assert!(e.to_string().contains("k against q"), "{e}")
        }
        other => panic!("dtype: expected a dtype error, got {other:?}"),
    }
    let qi = q.to_dtype(DType::U8)?;
    match flash_attention(&qi, &k.to_dtype(DType::U8)?, &v.to_dtype(DType::U8)?, &p) {
        Err(e @ Error::UnsupportedDType { .. }) => {
            assert!(e.to_string().contains("flash_attention"), "{e}")
        }
        other => panic!("u8: expected an unsupported-dtype error, got {other:?}"),
    }
    expect_invalid(
        flash_attention(&q, &k, &v, &p.clone().softmax_scale(f64::NAN)),
        "softmax_scale",
        "scale",
    );
    Ok(())
}

/// Cases at the CUDA kernel's head dims (64, 128), with its tile sizes in mind (64 keys per
/// tile, 64 or 128 queries per forward block, 64 keys per backward block): odd lengths over
/// several tiles, varlen batches with seqlen_q != seqlen_k both ways, a document with queries
/// and no keys, one with keys and no queries, GQA 14/2, causal, windows with and without
/// causal, a diagonal-only window.
const KERNEL_CASES: &[Case] = &[
    case(
        &[1, 17, 127, 0, 33],
        &[1, 17, 127, 5, 40],
        14,
        2,
        64,
        true,
        None,
    ),
    case(&[70, 3, 129], &[70, 0, 100], 4, 4, 128, true, Some(48)),
    case(&[65, 130], &[65, 130], 6, 2, 128, false, Some(31)),
    case(&[200], &[333], 2, 1, 64, false, None),
    case(&[50, 17], &[50, 17], 8, 2, 64, true, Some(0)),
    case(&[96, 1], &[160, 9], 4, 1, 128, true, None),
];

/// The fused op at the kernel's head dims, bf16 and f16, forward and dQ / dK / dV (through
/// Candle's autograd, under a random upstream gradient) against the float64 reference run on
/// the same rounded inputs. On CUDA this is the flash-attention kernel (`cu/flash_attention.cu`:
/// forward, `bwd_pre`, `bwd`, `bwd_convert`, with the forward's `L` carried to the backward);
/// on the CPU the fused CPU op. Bound: relative error 1e-2, as `bench/dev`'s validator (the
/// kernel rounds P to the input dtype before `P V` and the backward products).
fn kernel_cases(dev: &Device) -> Result<()> {
    for c in KERNEL_CASES {
        let engine = engine_of(c, dev)?;
        assert!(
            matches!(engine, "kernel" | "cpu"),
            "{}: ran on {engine}, expected flare's kernel",
            c.name()
        );
    }
    fused_cases(dev, KERNEL_CASES, "kernel")
}

/// Which implementation runs case `c` on `dev` (bf16).
fn engine_of(c: &Case, dev: &Device) -> Result<&'static str> {
    let [q, k, v] = c.inputs(DType::BF16, dev, "engine")?;
    flare::ops::flash_attention_engine(&q, &k, &v, &c.params())
}

/// Geometries cuDNN's fused attention takes (equal lengths, multiples of 128, no window):
/// MHA and GQA / MQA, head dims 64 and 128, causal or not, one to three sequences.
const CUDNN_CASES: &[Case] = &[
    case(&[128, 128], &[128, 128], 4, 2, 64, true, None),
    case(&[256], &[256], 4, 4, 128, true, None),
    case(&[128, 128, 128], &[128, 128, 128], 6, 2, 128, false, None),
    case(&[384], &[384], 8, 1, 64, true, None),
];

/// On CUDA with cuDNN, `FLARE_ATTENTION_CUDNN` on (the default; set here so that the test does
/// not depend on the environment): the cases run on cuDNN (checked), forward and gradients against
/// the float64 reference, and against flare's kernel on the same inputs (the switch off);
/// without cuDNN they run on the kernel and the test says so. On the CPU: the fused CPU op at
/// these lengths.
fn cudnn_cases(dev: &Device) -> Result<()> {
    let on = flare::runtime::Settings {
        attention_cudnn: true,
        ..flare::runtime::settings()
    };
    let _guard = on.apply();
    if dev.is_cuda() {
        match flare::runtime::cudnn_version() {
            Ok(v) => {
                for c in CUDNN_CASES {
                    assert_eq!(
                        engine_of(c, dev)?,
                        "cudnn",
                        "{}: cuDNN {v} is loaded",
                        c.name()
                    );
                }
                cudnn_vs_kernel(dev)?;
            }
            Err(why) => eprintln!("skipped: cuDNN not found ({why}); the cases run on the kernel"),
        }
    }
    fused_cases(dev, CUDNN_CASES, "cudnn")
}

/// cuDNN's forward and gradients against flare's kernel on the same bf16 inputs.
fn cudnn_vs_kernel(dev: &Device) -> Result<()> {
    let off = flare::runtime::Settings {
        attention_cudnn: false,
        ..flare::runtime::settings()
    };
    for c in CUDNN_CASES {
        let what = format!("flash_attention cudnn vs kernel {}", c.name());
        let [q, k, v] = c.inputs(DType::BF16, dev, &what)?;
        let r = randn(q.dims(), DType::BF16, dev, seed(&format!("{what} r")))?;
        let run = || output_and_grads(flash_attention, [&q, &k, &v], &c.params(), &r, &what);
        let a = run()?;
        let b = {
            let _guard = off.apply();
            assert_eq!(
                engine_of(c, dev)?,
                "kernel",
                "{what}: the switch turns cuDNN off"
            );
            run()?
        };
        for (name, x, y) in ["O", "dq", "dk", "dv"]
            .iter()
            .zip(&a)
            .zip(&b)
            .map(|((n, x), y)| (n, x, y))
        {
            assert_close(x, &f64_cpu(y)?, 1e-2, &format!("{what} {name}"))?;
        }
    }
    Ok(())
}

/// Forward and dQ / dK / dV of the fused op against the float64 reference, bf16 and f16.
fn fused_cases(dev: &Device, cases: &[Case], label: &str) -> Result<()> {
    const BOUND: f64 = 1e-2;
    for &dtype in &[DType::BF16, DType::F16] {
        for c in cases {
            let what = format!("flash_attention {label} {} {}", c.name(), dt(dtype));
            let [q, k, v] = c.inputs(dtype, dev, &what)?;
            let r = randn(q.dims(), dtype, dev, seed(&format!("{what} r")))?;
            let (qs, ks) = c.shapes();
            let (nq, nk) = (qs.iter().product(), ks.iter().product());
            // Freed NaN buffers of the outputs' sizes: an element the kernels never write
            // shows up as a NaN (on CUDA, whose pool reuses freed blocks).
            poison(dev, dtype, &[nq, nq, nk, nk, nq + 2 * nk])?;
            let [o, grads @ ..] =
                output_and_grads(flash_attention, [&q, &k, &v], &c.params(), &r, &what)?;
            assert_eq!(o.dtype(), dtype, "{what}: output dtype");
            let (qr, kr, vr) = (f64_cpu(&q)?, f64_cpu(&k)?, f64_cpu(&v)?);
            let [or, grads_r @ ..] = output_and_grads(
                flash_attention_reference,
                [&qr, &kr, &vr],
                &c.params(),
                &f64_cpu(&r)?,
                &what,
            )?;
            assert_close(&o, &or, BOUND, &format!("{what} O"))?;
            for (((name, x), g), gr) in ["dq", "dk", "dv"]
                .iter()
                .zip([&q, &k, &v])
                .zip(&grads)
                .zip(&grads_r)
            {
                let w = format!("{what} {name}");
                assert_eq!(g.dtype(), dtype, "{w}: gradient dtype");
                assert_eq!(g.dims(), x.dims(), "{w}: gradient shape");
                assert_close(g, gr, BOUND, &w)?;
            }
        }
    }
    Ok(())
}

/// Strided inputs (a transposed `[heads, rows, d]` view, as attention projections produce)
/// and an output gradient that is not contiguous give the same result as contiguous ones: the
/// op makes its inputs contiguous for the kernel.
fn kernel_strided_inputs(dev: &Device) -> Result<()> {
    let c = &KERNEL_CASES[0];
    let dtype = DType::BF16;
    let what = format!("flash_attention strided {}", c.name());
    let [q, k, v] = c.inputs(dtype, dev, &what)?;
    // The same values through [heads, rows, d] -> transpose back (a strided view).
    let strided =
        |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(0, 1)?.contiguous()?.transpose(0, 1)?) };
    let (qt, kt, vt) = (strided(&q)?, strided(&k)?, strided(&v)?);
    assert!(!qt.is_contiguous(), "{what}: the view should be strided");
    let p = c.params();
    let o = flash_attention(&q, &k, &v, &p)?;
    let ot = flash_attention(&qt, &kt, &vt, &p)?;
    assert_eq!(
        to_f64_vec(&o)?,
        to_f64_vec(&ot)?,
        "{what}: strided vs contiguous"
    );
    // A strided upstream gradient: the loss reads the output through a transpose, so the
    // gradient reaching the op is a transposed view.
    let r = randn(q.dims(), dtype, dev, seed(&format!("{what} r")))?;
    let [qa, qb] = [var(&q)?, var(&q)?];
    let ga = weighted_loss(&flash_attention(qa.as_tensor(), &k, &v, &p)?, &r)?.backward()?;
    let ob = flash_attention(qb.as_tensor(), &kt, &vt, &p)?.transpose(0, 1)?;
    let gb = weighted_loss(&ob, &r.transpose(0, 1)?.contiguous()?)?.backward()?;
    // dQ sums by atomics on CUDA: the order, and so the last bit, may differ between calls.
    assert_close(
        &grad_of(&gb, qb.as_tensor(), &what),
        &f64_cpu(&grad_of(&ga, qa.as_tensor(), &what))?,
        tol(dtype),
        &format!("{what}: dq, strided vs contiguous"),
    )?;
    Ok(())
}

/// `flash_attention_qkvpacked` against its composition (three narrows of `qkv`, `rope_tokens`
/// on q and k, `flash_attention`): the output and the gradient of `qkv`, at every dtype, on
/// shapes that take the CPU op, cuDNN (d 64, 128 tokens per sequence), flare's kernel (d 128,
/// 33 tokens) and the composed path (d 8 on CUDA); and its error for a wrong head count.
fn qkvpacked(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for &(b, s, hq, hkv, d) in &[(2, 7, 4, 2, 8), (1, 128, 4, 2, 64), (2, 33, 2, 1, 128)] {
            let what = format!(
                "qkvpacked b {b} s {s} hq {hq} hkv {hkv} d {d} {}",
                dt(dtype)
            );
            let sd = |tag: &str| seed(&format!("{what} {tag}"));
            let h = hq + 2 * hkv;
            let qkv = randn(&[b, s, h, d], dtype, dev, sd("qkv"))?;
            let angle = (randn(&[s, d / 2], DType::F32, &Device::Cpu, sd("angle"))? * 3.0)?;
            let cos = angle.cos()?.to_dtype(dtype)?.to_device(dev)?;
            let sin = angle.sin()?.to_dtype(dtype)?.to_device(dev)?;
            let lens: Vec<usize> = vec![s; b];
            let p = FlashAttnParams::varlen(cu(&lens), cu(&lens)).causal(true);
            let r = randn(&[b * s, hq, d], dtype, dev, sd("r"))?;
            let q_scale = 1.0 / (d as f64).sqrt();
            let run = |packed: bool| -> Result<(Tensor, Tensor)> {
                let x = var(&qkv)?;
                let t = x.as_tensor();
                let o = if packed {
                    flash_attention_qkvpacked(t, &cos, &sin, q_scale, hq, hkv, &p)?
                } else {
                    let rows = |x: &Tensor, heads: usize| x.reshape((b * s, heads, d));
                    let q = rows(&rope_tokens(&t.narrow(2, 0, hq)?, &cos, &sin, q_scale)?, hq)?;
                    let k = rows(&rope_tokens(&t.narrow(2, hq, hkv)?, &cos, &sin, 1.0)?, hkv)?;
                    let v = rows(&t.narrow(2, hq + hkv, hkv)?.contiguous()?, hkv)?;
                    flash_attention(&q, &k, &v, &p)?
                };
                let g = weighted_loss(&o, &r)?.backward()?;
                Ok((o, grad_of(&g, t, &what)))
            };
            let (o, dqkv) = run(true)?;
            let (o_ref, dqkv_ref) = run(false)?;
            assert_eq!(o.dims(), &[b * s, hq, d], "{what}: output shape");
            assert_eq!(dqkv.dims(), qkv.dims(), "{what}: gradient shape");
            assert_no_nan(&dqkv, &what)?;
            assert_close(&o, &f64_cpu(&o_ref)?, tol(dtype), &format!("{what} o"))?;
            assert_close(
                &dqkv,
                &f64_cpu(&dqkv_ref)?,
                tol(dtype),
                &format!("{what} dqkv"),
            )?;
        }
    }
    let qkv = randn(&[1, 4, 5, 8], DType::F32, dev, 1)?;
    let t = randn(&[4, 4], DType::F32, dev, 2)?;
    let p = FlashAttnParams::varlen(cu(&[4]), cu(&[4])).causal(true);
    expect_invalid(
        flash_attention_qkvpacked(&qkv, &t, &t, 1.0, 2, 2, &p),
        "heads",
        "5 heads as 2 + 2 x 2",
    );
    Ok(())
}

device_test!(
    kernel_cases,
    cudnn_cases,
    kernel_strided_inputs,
    forward,
    grad_fd,
    grad_vs_reference,
    packed_equals_alone,
    padded,
    device_vs_cpu,
    errors,
    qkvpacked
);
