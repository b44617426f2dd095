//! `flare::lora::lora_linear` and `flare::lora::LoraLinear`: the fused forward against a float64
//! composite on odd shapes at every dtype (and f32 adapters on a half base), gradients of `x`,
//! `A` and `B` against the composite's autograd and finite differences, the frozen weight never
//! getting a gradient, partial tracking, f32 factors on an f32 / bf16 / f16 base (their
//! gradients f32 and not rounded to the half type; CUDA against the CPU op), dropout, adapter
//! switching, merge / unmerge, PEFT's initialisation, every output element written, and clear
//! errors.
//!
//! Derivatives, with `y = x Wᵀ + bias + s (x Aᵀ) Bᵀ`, upstream `dy`, `G = s dy B`:
//!   `dx = dy W + G A`, `dA = Gᵀ x`, `dB = s dyᵀ (x Aᵀ)`.

use candle_core::{DType, Device, Tensor};
use flare::lora::op::{lora_swiglu_mlp, stack_rows, LoraMlp, MlpWeights};
use flare::lora::{
    lora_linear, lora_linear_grouped, lora_linear_reference, LoraConfig, LoraLinear,
};
use flare::Error;

use crate::common::*;

const IN: usize = 33;
const OUT: usize = 7;
/// Token shapes `[..., in]`: 1, 7 and 33 tokens, and batch dims.
const X_SHAPES: &[&[usize]] = &[&[1, IN], &[7, IN], &[33, IN], &[2, 3, IN]];
const RANKS: &[usize] = &[1, 4];

/// The float64 reference from plain Candle ops, on f64 CPU copies of the operands (which may
/// be `Var`s of f64 CPU tensors, for autograd).
fn reference_f64(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Result<Tensor> {
    let up = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.dtype() == DType::F64 && t.device().is_cpu() {
            t.clone()
        } else {
            f64_cpu(t)?
        })
    };
    let (x, w, a, b) = (up(x)?, up(w)?, up(a)?, up(b)?);
    let mut y = x.broadcast_matmul(&w.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&up(bias)?)?;
    }
    let low = (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?;
    Ok((y + low)?)
}

/// One case's operands: x, W, bias, A, B (A and B of `adapter_dtype`), scale.
struct Case {
    x: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    s: f64,
}

fn case(
    xsh: &[usize],
    r: usize,
    with_bias: bool,
    dtype: DType,
    adapter_dtype: DType,
    dev: &Device,
    what: &str,
) -> Result<Case> {
    let sd = |tag: &str| seed(&format!("{what} {tag}"));
    Ok(Case {
        x: randn(xsh, dtype, dev, sd("x"))?,
        w: randn_scaled(&[OUT, IN], 0.0, 0.2, dtype, dev, sd("w"))?,
        bias: if with_bias {
            Some(randn(&[OUT], dtype, dev, sd("bias"))?)
        } else {
            None
        },
        a: randn_scaled(&[r, IN], 0.0, 0.2, adapter_dtype, dev, sd("a"))?,
        b: randn(&[OUT, r], adapter_dtype, dev, sd("b"))?,
        s: 8.0 / (3.0 * r as f64),
    })
}

fn out_dims(xsh: &[usize]) -> Vec<usize> {
    let mut d = xsh.to_vec();
    *d.last_mut().unwrap() = OUT;
    d
}

/// The fused forward (and flare's composite reference) against the float64 composite.
fn forward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    let mut combos: Vec<(DType, DType)> = dtypes(dev).into_iter().map(|d| (d, d)).collect();
    combos.push((DType::BF16, DType::F32));
    combos.push((DType::F16, DType::F32));
    for (dtype, adt) in combos {
        for xsh in X_SHAPES {
            for &r in RANKS {
                for with_bias in [false, true] {
                    let what = format!(
                        "lora_linear {xsh:?} r {r} bias {with_bias} {} (adapters {})",
                        dt(dtype),
                        dt(adt)
                    );
                    let c = case(xsh, r, with_bias, dtype, adt, dev, &what)?;
                    let y = lora_linear(&c.x, &c.w, c.bias.as_ref(), &c.a, &c.b, c.s)?;
                    assert_eq!(y.dtype(), dtype, "{what}: output dtype");
                    assert!(y.device().same_device(dev), "{what}: output device");
                    assert_eq!(y.dims(), out_dims(xsh).as_slice(), "{what}: output shape");
                    // The op computes on A and B cast to the base dtype (documented): so does
                    // the reference.
                    let (ab, bb) = (c.a.to_dtype(dtype)?, c.b.to_dtype(dtype)?);
                    let reference = reference_f64(&c.x, &c.w, c.bias.as_ref(), &ab, &bb, c.s)?;
                    fails.check(&y, &reference, tol(dtype), &what)?;
                    let yr = lora_linear_reference(&c.x, &c.w, c.bias.as_ref(), &c.a, &c.b, c.s)?;
                    fails.check(&yr, &reference, tol(dtype), &format!("{what} (reference)"))?;
                }
            }
        }
    }
    fails.finish();
    Ok(())
}

/// A non-contiguous input (a transposed view) gives the same output as its contiguous copy,
/// and degenerate shapes (no tokens) give empty outputs.
fn views_and_empty(dev: &Device) -> Result<()> {
    let dtype = DType::F32;
    let c = case(&[7, IN], 4, true, dtype, dtype, dev, "lora views")?;
    let xt = randn(&[IN, 7], dtype, dev, seed("lora views xt"))?.t()?;
    assert!(!xt.is_contiguous());
    let y = lora_linear(&xt, &c.w, c.bias.as_ref(), &c.a, &c.b, c.s)?;
    let y2 = lora_linear(&xt.contiguous()?, &c.w, c.bias.as_ref(), &c.a, &c.b, c.s)?;
    assert_eq!(to_f64_vec(&y)?, to_f64_vec(&y2)?, "transposed x");
    for xsh in [&[0usize, IN][..], &[2, 0, IN]] {
        let x = Tensor::zeros(xsh, dtype, dev)?;
        let y = lora_linear(&x, &c.w, c.bias.as_ref(), &c.a, &c.b, c.s)?;
        assert_eq!(y.dims(), out_dims(xsh).as_slice(), "empty {xsh:?}");
    }
    Ok(())
}

/// Gradients of `x`, `A` and `B` against the float64 composite's autograd at every dtype (and
/// f32 adapters on a half base, whose gradients must come back in f32); `W` never gets one.
fn grads_vs_reference(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    let mut combos: Vec<(DType, DType)> = dtypes(dev).into_iter().map(|d| (d, d)).collect();
    combos.push((DType::BF16, DType::F32));
    for (dtype, adt) in combos {
        for xsh in X_SHAPES {
            for &r in RANKS {
                let with_bias = r == 4;
                let what = format!(
                    "lora_linear grad {xsh:?} r {r} bias {with_bias} {} (adapters {})",
                    dt(dtype),
                    dt(adt)
                );
                let c = case(xsh, r, with_bias, dtype, adt, dev, &what)?;
                let (xv, av, bv) = (var(&c.x)?, var(&c.a)?, var(&c.b)?);
                let y = lora_linear(
                    xv.as_tensor(),
                    &c.w,
                    c.bias.as_ref(),
                    av.as_tensor(),
                    bv.as_tensor(),
                    c.s,
                )?;
                let rr = randn(y.dims(), dtype, dev, seed(&format!("{what} r")))?;
                let grads = y.mul(&rr)?.sum_all()?.backward()?;
                assert!(grads.get(&c.w).is_none(), "{what}: W got a gradient");
                if let Some(bias) = &c.bias {
                    assert!(grads.get(bias).is_none(), "{what}: bias got a gradient");
                }

                // The reference runs on A and B rounded to the base dtype, as the op does:
                // with f32 adapters on a bf16 base, the rounding of A alone can move a short
                // dot product like `x Aᵀ` (one token, rank 1) by more than the bf16 tolerance.
                let (xr, ar, br) = (
                    var(&f64_cpu(&c.x)?)?,
                    var(&f64_cpu(&c.a.to_dtype(dtype)?)?)?,
                    var(&f64_cpu(&c.b.to_dtype(dtype)?)?)?,
                );
                let yr = reference_f64(
                    xr.as_tensor(),
                    &c.w,
                    c.bias.as_ref(),
                    ar.as_tensor(),
                    br.as_tensor(),
                    c.s,
                )?;
                let grads_r = yr.mul(&f64_cpu(&rr)?)?.sum_all()?.backward()?;
                for (name, v, vr, want_dt) in [
                    ("dx", &xv, &xr, dtype),
                    ("dA", &av, &ar, adt),
                    ("dB", &bv, &br, adt),
                ] {
                    let what = format!("{what} {name}");
                    let g = grad_of(&grads, v.as_tensor(), &what);
                    assert_eq!(g.dtype(), want_dt, "{what}: gradient dtype");
                    assert_eq!(g.dims(), v.dims(), "{what}: gradient shape");
                    assert!(g.device().same_device(dev), "{what}: gradient device");
                    let gr = grad_of(&grads_r, vr.as_tensor(), &what);
                    fails.check(&g, &gr, tol(dtype), &what)?;
                }
            }
        }
    }
    fails.finish();
    Ok(())
}

/// `lora_linear_grouped` against the float64 reference of each projection alone, side by side:
/// the output and the gradients of `x` and of every projection's `A` and `B` (stacked into the
/// op by `Tensor::cat`, as the model does), with and without a bias, 2 and 3 projections of
/// unequal widths, every dtype (and f32 factors on a bf16 base), `x` tracked or frozen; and its
/// errors.
fn grouped(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    let mut combos: Vec<(DType, DType)> = dtypes(dev).into_iter().map(|d| (d, d)).collect();
    combos.push((DType::BF16, DType::F32));
    for (dtype, adt) in combos {
        for splits in [&[5usize, 3, 9][..], &[OUT, OUT][..]] {
            for &(xsh, r, with_bias, track_x) in &[
                (&[7, IN][..], 4, true, true),
                (&[2, 3, IN][..], 1, false, true),
                (&[33, IN][..], 4, false, false),
            ] {
                let what = format!(
                    "lora_linear_grouped {splits:?} {xsh:?} r {r} bias {with_bias} x {track_x} {} \
                     (adapters {})",
                    dt(dtype),
                    dt(adt)
                );
                let sd = |tag: &str| seed(&format!("{what} {tag}"));
                let x = randn(xsh, dtype, dev, sd("x"))?;
                let mut parts = Vec::new();
                for (g, &n) in splits.iter().enumerate() {
                    let w = randn_scaled(&[n, IN], 0.0, 0.2, dtype, dev, sd(&format!("w{g}")))?;
                    let bias = if with_bias {
                        Some(randn(&[n], dtype, dev, sd(&format!("bias{g}")))?)
                    } else {
                        None
                    };
                    let a = randn_scaled(&[r, IN], 0.0, 0.2, adt, dev, sd(&format!("a{g}")))?;
                    let b = randn(&[n, r], adt, dev, sd(&format!("b{g}")))?;
                    parts.push((w, bias, var(&a)?, var(&b)?));
                }
                let s = 8.0 / (3.0 * r as f64);
                let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0);
                let w = cat(parts.iter().map(|p| &p.0).collect())?;
                let bias = if with_bias {
                    Some(cat(parts.iter().filter_map(|p| p.1.as_ref()).collect())?)
                } else {
                    None
                };
                let a = cat(parts.iter().map(|p| p.2.as_tensor()).collect())?;
                let b = cat(parts.iter().map(|p| p.3.as_tensor()).collect())?;
                let xv = var(&x)?;
                let xin = if track_x {
                    xv.as_tensor().clone()
                } else {
                    x.clone()
                };
                let y = lora_linear_grouped(&xin, &w, bias.as_ref(), &a, &b, s, splits)?;
                let rr = randn(y.dims(), dtype, dev, sd("r"))?;
                let grads = y.mul(&rr)?.sum_all()?.backward()?;
                assert!(grads.get(&w).is_none(), "{what}: W got a gradient");
                assert_eq!(grads.get(xv.as_tensor()).is_some(), track_x, "{what}: dx");

                // The reference: each projection alone in f64 (A and B rounded to the base
                // dtype first, as the op does), side by side.
                let xr = var(&f64_cpu(&x)?)?;
                let mut refs = Vec::new();
                let mut ys = Vec::new();
                for (w, bias, a, b) in &parts {
                    let ar = var(&f64_cpu(&a.as_tensor().to_dtype(dtype)?)?)?;
                    let br = var(&f64_cpu(&b.as_tensor().to_dtype(dtype)?)?)?;
                    ys.push(reference_f64(
                        xr.as_tensor(),
                        w,
                        bias.as_ref(),
                        ar.as_tensor(),
                        br.as_tensor(),
                        s,
                    )?);
                    refs.push((ar, br));
                }
                let yr = Tensor::cat(&ys, candle_core::D::Minus1)?;
                fails.check(&f64_cpu(&y)?, &yr, tol(dtype), &format!("{what} y"))?;
                let grads_r = yr.mul(&f64_cpu(&rr)?)?.sum_all()?.backward()?;
                if track_x {
                    let g = grad_of(&grads, xv.as_tensor(), &what);
                    let gr = grad_of(&grads_r, xr.as_tensor(), &what);
                    fails.check(&g, &gr, tol(dtype), &format!("{what} dx"))?;
                }
                for (g, ((_, _, av, bv), (ar, br))) in parts.iter().zip(&refs).enumerate() {
                    for (name, v, vr) in [("dA", av, ar), ("dB", bv, br)] {
                        let what = format!("{what} {name}{g}");
                        let gv = grad_of(&grads, v.as_tensor(), &what);
                        assert_eq!(gv.dtype(), adt, "{what}: gradient dtype");
                        assert_eq!(gv.dims(), v.dims(), "{what}: gradient shape");
                        let gr = grad_of(&grads_r, vr.as_tensor(), &what);
                        fails.check(&gv, &gr, tol(dtype), &what)?;
                    }
                }
            }
        }
    }
    fails.finish();

    // Errors: splits that do not sum to the weight's rows or hold a zero; A not G x r rows.
    let dtype = dtypes(dev)[0];
    let x = randn(&[3, IN], dtype, dev, 1)?;
    let w = randn(&[8, IN], dtype, dev, 2)?;
    let a = randn(&[4, IN], dtype, dev, 3)?;
    let b = randn(&[8, 2], dtype, dev, 4)?;
    for bad in [&[5usize, 4][..], &[8, 0][..], &[][..]] {
        let e = lora_linear_grouped(&x, &w, None, &a, &b, 1.0, bad).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }),
            "splits {bad:?}: {e}"
        );
    }
    let e = lora_linear_grouped(&x, &w, None, &a, &b, 1.0, &[2, 3, 3]).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "3 groups of r 2 in 4 rows: {e}"
    );
    assert!(lora_linear_grouped(&x, &w, None, &a, &b, 1.0, &[3, 5]).is_ok());
    Ok(())
}

/// Analytic gradients against central finite differences of the f64 CPU op. On CUDA the
/// analytic gradients are computed in f32 on the device from the same (f32-exact) inputs and
/// compared at the f32 tolerance.
fn grad_fd(dev: &Device) -> Result<()> {
    for (xsh, r, with_bias) in [
        (&[1usize, IN][..], 1usize, false),
        (&[7, IN], 4, true),
        (&[2, 3, IN], 4, false),
    ] {
        let fd = FdCheck::new(
            dev,
            format!("lora_linear grad fd {xsh:?} r {r} bias {with_bias}"),
        );
        let c = case(
            xsh,
            r,
            with_bias,
            DType::F64,
            DType::F64,
            &Device::Cpu,
            fd.what(),
        )?;
        let (x, a, b) = (f32_exact(&c.x)?, f32_exact(&c.a)?, f32_exact(&c.b)?);
        let w = fd.constant(&f32_exact(&c.w)?)?;
        let bias = match &c.bias {
            Some(t) => Some(fd.constant(&f32_exact(t)?)?),
            None => None,
        };
        let rr = fd.constant(&fd.input(&out_dims(xsh), "r")?)?;
        let s = c.s;
        let grads = fd.check(&[("dx", &x), ("dA", &a), ("dB", &b)], |t| {
            let y = lora_linear(
                &t[0],
                w.like(&t[0]),
                bias.as_ref().map(|b| b.like(&t[0])),
                &t[1],
                &t[2],
                s,
            )?;
            weighted_loss(&y, rr.like(&t[0]))
        })?;
        let wd = w.like(&fd.up(&x)?).clone();
        assert!(grads.get(&wd).is_none(), "{}: W got a gradient", fd.what());
    }
    Ok(())
}

/// Every subset of `{x, A, B}` tracked: exactly the tracked ones get gradients, matching the
/// reference; a `Var` weight still gets none.
fn partial_tracking(dev: &Device) -> Result<()> {
    let dtype = if dev.is_cpu() { DType::F64 } else { DType::F32 };
    let what = "lora_linear partial";
    let c = case(&[2, 3, IN], 4, true, dtype, dtype, dev, what)?;
    let rr = randn(&out_dims(&[2, 3, IN]), dtype, dev, seed("lora partial r"))?;
    let (xr, ar, br) = (
        var(&f64_cpu(&c.x)?)?,
        var(&f64_cpu(&c.a)?)?,
        var(&f64_cpu(&c.b)?)?,
    );
    let gr = reference_f64(
        xr.as_tensor(),
        &c.w,
        c.bias.as_ref(),
        ar.as_tensor(),
        br.as_tensor(),
        c.s,
    )?
    .mul(&f64_cpu(&rr)?)?
    .sum_all()?
    .backward()?;
    for mask in 0..8u8 {
        let (tx, ta, tb) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
        let what = format!("{what} x {tx} A {ta} B {tb}");
        let wrap = |t: &Tensor, tracked: bool| -> Result<Tensor> {
            Ok(if tracked {
                var(t)?.as_tensor().clone()
            } else {
                t.clone()
            })
        };
        let (x, a, b) = (wrap(&c.x, tx)?, wrap(&c.a, ta)?, wrap(&c.b, tb)?);
        let wv = var(&c.w)?;
        let y = lora_linear(&x, wv.as_tensor(), c.bias.as_ref(), &a, &b, c.s)?;
        assert_eq!(y.track_op(), tx || ta || tb, "{what}: output tracking");
        let grads = y.mul(&rr)?.sum_all()?.backward()?;
        assert!(
            grads.get(wv.as_tensor()).is_none(),
            "{what}: Var W got a gradient"
        );
        for (name, t, tracked, vr) in [
            ("dx", &x, tx, &xr),
            ("dA", &a, ta, &ar),
            ("dB", &b, tb, &br),
        ] {
            let what = format!("{what} {name}");
            match (grads.get(t), tracked) {
                (Some(g), true) => {
                    assert_close(g, &grad_of(&gr, vr.as_tensor(), &what), tol(dtype), &what)?
                }
                (None, false) => {}
                (g, _) => panic!(
                    "{what}: tracked {tracked}, gradient present {}",
                    g.is_some()
                ),
            }
        }
    }
    Ok(())
}

/// The fused op with a tracked subset of `{x, A, B}` (`tracked`): its output and the gradients
/// it gives (`None` where untracked) of `sum(y * rr)`.
#[allow(clippy::too_many_arguments)]
fn run_tracked(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    rr: &Tensor,
    tracked: [bool; 3],
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let wrap = |t: &Tensor, on: bool| -> Result<Tensor> {
        Ok(if on {
            var(t)?.as_tensor().clone()
        } else {
            t.clone()
        })
    };
    let ins = [
        wrap(x, tracked[0])?,
        wrap(a, tracked[1])?,
        wrap(b, tracked[2])?,
    ];
    let y = lora_linear(&ins[0], w, bias, &ins[1], &ins[2], s)?;
    let grads = y.mul(rr)?.sum_all()?.backward()?;
    Ok((y, ins.iter().map(|t| grads.get(t).cloned()).collect()))
}

/// f32 factors go into the fused op as they are, on an f32, bf16 and f16 base, for every
/// tracked subset of `{x, A, B}` on odd shapes: the output and the gradients against the
/// float64 reference (on `A`, `B` rounded to the base dtype, as the op computes), `dx` in the
/// base dtype and `dA`, `dB` in f32. On a half base the factor gradients are not rounded to
/// the half type (the op writes the f32 accumulation): almost none of their elements is
/// representable in it, where a bf16/f16 gradient widened to f32 (the old cast-node path)
/// would be exactly so. On CUDA the CPU op's results on the same inputs are compared too.
fn f32_factors(dev: &Device) -> Result<()> {
    const IN2: usize = 37;
    const OUT2: usize = 13;
    let mut fails = Failures::default();
    for base in [DType::F32, DType::BF16, DType::F16] {
        for (xsh, r, with_bias) in [
            (&[19usize, IN2][..], 3usize, true),
            (&[2, 5, IN2], 5, false),
        ] {
            for mask in 1..8u8 {
                let tracked = [mask & 1 != 0, mask & 2 != 0, mask & 4 != 0];
                let what = format!(
                    "lora_linear f32 factors on {} {xsh:?} r {r} bias {with_bias} tracked \
                     (x, A, B) {tracked:?}",
                    dt(base)
                );
                let sd = |tag: &str| seed(&format!("{what} {tag}"));
                let x = randn(xsh, base, dev, sd("x"))?;
                let w = randn_scaled(&[OUT2, IN2], 0.0, 0.2, base, dev, sd("w"))?;
                let bias = match with_bias {
                    true => Some(randn(&[OUT2], base, dev, sd("bias"))?),
                    false => None,
                };
                let a = randn_scaled(&[r, IN2], 0.0, 0.2, DType::F32, dev, sd("a"))?;
                let b = randn(&[OUT2, r], DType::F32, dev, sd("b"))?;
                let s = 8.0 / (3.0 * r as f64);
                let mut ysh = xsh.to_vec();
                *ysh.last_mut().unwrap() = OUT2;
                let rr = randn(&ysh, base, dev, sd("r"))?;
                let (y, grads) = run_tracked(&x, &w, bias.as_ref(), &a, &b, s, &rr, tracked)?;
                assert_eq!(y.dtype(), base, "{what}: output dtype");
                assert_eq!(y.track_op(), mask != 0, "{what}: output tracking");

                let (xr, ar, br) = (
                    var(&f64_cpu(&x)?)?,
                    var(&f64_cpu(&a.to_dtype(base)?)?)?,
                    var(&f64_cpu(&b.to_dtype(base)?)?)?,
                );
                let yr = reference_f64(
                    xr.as_tensor(),
                    &w,
                    bias.as_ref(),
                    ar.as_tensor(),
                    br.as_tensor(),
                    s,
                )?;
                fails.check(&y, &yr, tol(base), &what)?;
                let grads_r = yr.mul(&f64_cpu(&rr)?)?.sum_all()?.backward()?;
                let names = ["dx", "dA", "dB"];
                let wants = [
                    (base, x.dims()),
                    (DType::F32, a.dims()),
                    (DType::F32, b.dims()),
                ];
                for (i, vr) in [&xr, &ar, &br].into_iter().enumerate() {
                    let what = format!("{what} {}", names[i]);
                    let g = match (&grads[i], tracked[i]) {
                        (Some(g), true) => g,
                        (None, false) => continue,
                        (g, on) => panic!("{what}: tracked {on}, gradient present {}", g.is_some()),
                    };
                    assert_eq!(g.dtype(), wants[i].0, "{what}: gradient dtype");
                    assert_eq!(g.dims(), wants[i].1, "{what}: gradient shape");
                    assert!(g.device().same_device(dev), "{what}: gradient device");
                    fails.check(
                        g,
                        &grad_of(&grads_r, vr.as_tensor(), &what),
                        tol(base),
                        &what,
                    )?;
                    if i > 0 && base != DType::F32 {
                        let v = to_f64_vec(g)?;
                        let half = to_f64_vec(&g.to_dtype(base)?)?;
                        let exact = v.iter().zip(&half).filter(|(p, q)| p == q).count();
                        assert!(
                            exact * 10 < v.len(),
                            "{what}: {exact} of {} elements are exact in {}: rounded to the half \
                             type",
                            v.len(),
                            dt(base)
                        );
                    }
                }

                if !dev.is_cpu() {
                    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
                    let bias_c = bias.as_ref().map(cpu).transpose()?;
                    let (yc, gc) = run_tracked(
                        &cpu(&x)?,
                        &cpu(&w)?,
                        bias_c.as_ref(),
                        &cpu(&a)?,
                        &cpu(&b)?,
                        s,
                        &cpu(&rr)?,
                        tracked,
                    )?;
                    fails.check(&y, &yc, tol(base), &format!("{what} (CUDA vs CPU)"))?;
                    for (i, (g, c)) in grads.iter().zip(&gc).enumerate() {
                        let what = format!("{what} {} (CUDA vs CPU)", names[i]);
                        match (g, c) {
                            (Some(g), Some(c)) => {
                                assert_eq!(g.dtype(), c.dtype(), "{what}: gradient dtype");
                                fails.check(g, c, tol(base), &what)?;
                            }
                            (None, None) => {}
                            _ => panic!("{what}: present on one device only"),
                        }
                    }
                }
            }
        }
    }
    fails.finish();
    Ok(())
}

/// Every output element is written, forward and backward. See [`poison`] for why this is only
/// meaningful on CUDA.
fn every_element_written(dev: &Device) -> Result<()> {
    let mut combos: Vec<(DType, DType)> = dtypes(dev).into_iter().map(|d| (d, d)).collect();
    combos.push((DType::BF16, DType::F32));
    combos.push((DType::F16, DType::F32));
    for (dtype, adt) in combos {
        for with_bias in [false, true] {
            let what = format!(
                "lora_linear poisoned bias {with_bias} {} (adapters {})",
                dt(dtype),
                dt(adt)
            );
            let xsh = [33, IN];
            let c = case(&xsh, 4, with_bias, dtype, adt, dev, &what)?;
            let (xv, av, bv) = (var(&c.x)?, var(&c.a)?, var(&c.b)?);
            let n = 33 * IN + 4 * IN + OUT * 4 + 64;
            let sizes = [33 * OUT, 33 * 4, n, 33 * 4, 33 * 4];
            poison(dev, dtype, &sizes)?;
            poison(dev, adt, &sizes)?;
            let y = lora_linear(
                xv.as_tensor(),
                &c.w,
                c.bias.as_ref(),
                av.as_tensor(),
                bv.as_tensor(),
                c.s,
            )?;
            assert_no_nan(&y, &what)?;
            let rr = randn(y.dims(), dtype, dev, seed(&format!("{what} r")))?;
            poison(dev, dtype, &sizes)?;
            poison(dev, adt, &sizes)?;
            let g = y.mul(&rr)?.sum_all()?.backward()?;
            for (name, v) in [("dx", &xv), ("dA", &av), ("dB", &bv)] {
                assert_no_nan(
                    &grad_of(&g, v.as_tensor(), &what),
                    &format!("{what} {name}"),
                )?;
            }
        }
    }
    Ok(())
}

fn layer_with_bias(dtype: DType, dev: &Device, what: &str) -> Result<(LoraLinear, Tensor, Tensor)> {
    let w = randn_scaled(&[OUT, IN], 0.0, 0.2, dtype, dev, seed(&format!("{what} w")))?;
    let bias = randn(&[OUT], dtype, dev, seed(&format!("{what} bias")))?;
    Ok((LoraLinear::new(w.clone(), Some(bias.clone()))?, w, bias))
}

/// Loads random `A` and `B` into adapter `name` (a fresh adapter's `B` is zero, which would
/// make every adapter output equal to the base one).
fn randomize(layer: &mut LoraLinear, name: &str, what: &str) -> Result<()> {
    let r = layer.adapter(name).unwrap().rank();
    let cpu = &Device::Cpu;
    let a = randn_scaled(
        &[r, IN],
        0.0,
        0.2,
        DType::F64,
        cpu,
        seed(&format!("{what} {name} a")),
    )?;
    let b = randn(
        &[OUT, r],
        DType::F64,
        cpu,
        seed(&format!("{what} {name} b")),
    )?;
    layer.set_adapter_weights(name, &a, &b)
}

/// With no active adapter (never set, or switched off) the layer's output is the base linear
/// `matmul(x, Wᵀ) + bias`, bit for bit, at every dtype.
fn base_exact(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let what = format!("LoraLinear base {}", dt(dtype));
        let (mut layer, w, bias) = layer_with_bias(dtype, dev, &what)?;
        let x = randn(&[2, 3, IN], dtype, dev, seed(&format!("{what} x")))?;
        let base = flare::ops::matmul(&x, &w.t()?)?.broadcast_add(&bias)?;
        let bits = |t: &Tensor| to_f64_vec(t);
        assert_eq!(
            bits(&layer.forward(&x)?)?,
            bits(&base)?,
            "{what}: no adapter"
        );
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            ..Default::default()
        };
        layer.add_adapter("one", &cfg, 1)?;
        randomize(&mut layer, "one", &what)?;
        assert_eq!(
            bits(&layer.forward(&x)?)?,
            bits(&base)?,
            "{what}: added, inactive"
        );
        layer.set_active(Some("one"))?;
        let y = layer.forward(&x)?;
        assert_ne!(
            bits(&y)?,
            bits(&base)?,
            "{what}: active adapter changes nothing"
        );
        layer.set_active(None)?;
        assert_eq!(
            bits(&layer.forward(&x)?)?,
            bits(&base)?,
            "{what}: switched off"
        );
        assert_eq!(bits(layer.weight())?, bits(&w)?, "{what}: weight touched");
    }
    Ok(())
}

/// Two adapters, switched: each gives its own output (matching the reference with its own A, B
/// and scale), and they differ.
fn two_adapters(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let what = format!("LoraLinear two adapters {}", dt(dtype));
        let (mut layer, w, bias) = layer_with_bias(dtype, dev, &what)?;
        layer.add_adapter(
            "one",
            &LoraConfig {
                r: 1,
                alpha: 2.0,
                ..Default::default()
            },
            1,
        )?;
        layer.add_adapter(
            "two",
            &LoraConfig {
                r: 4,
                alpha: 16.0,
                use_rslora: true,
                ..Default::default()
            },
            2,
        )?;
        assert_eq!(layer.adapter_names(), vec!["one", "two"]);
        randomize(&mut layer, "one", &what)?;
        randomize(&mut layer, "two", &what)?;
        let x = randn(&[7, IN], dtype, dev, seed(&format!("{what} x")))?;
        let mut outs = Vec::new();
        for name in ["one", "two", "one"] {
            layer.set_active(Some(name))?;
            let ad = layer.adapter(name).unwrap();
            let y = layer.forward(&x)?;
            let reference = reference_f64(&x, &w, Some(&bias), ad.a(), ad.b(), ad.scale())?;
            assert_close(&y, &reference, tol(dtype), &format!("{what} {name}"))?;
            outs.push(to_f64_vec(&y)?);
        }
        assert_ne!(
            outs[0], outs[1],
            "{what}: the adapters give the same output"
        );
        assert_eq!(
            outs[0], outs[2],
            "{what}: switching back changed the output"
        );
        assert_eq!(
            layer.adapter("two").unwrap().scale(),
            8.0,
            "{what}: rsLoRA scale"
        );
    }
    Ok(())
}

/// Merge, then forward, equals the unmerged fused forward; unmerge restores the weight (up to
/// rounding) and the fused forward. Merge-state errors.
fn merge_unmerge(dev: &Device) -> Result<()> {
    let mut combos = vec![(DType::F32, 1e-5, 1e-6), (DType::BF16, 1e-2, 1e-2)];
    if dev.is_cpu() {
        combos.push((DType::F64, 1e-12, 1e-14));
    }
    for (dtype, fwd_tol, w_tol) in combos {
        let what = format!("LoraLinear merge {}", dt(dtype));
        let (mut layer, w, _bias) = layer_with_bias(dtype, dev, &what)?;
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            ..Default::default()
        };
        layer.add_adapter("one", &cfg, 1)?;
        layer.add_adapter("two", &cfg, 2)?;
        randomize(&mut layer, "one", &what)?;
        let e = layer.merge().unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }),
            "{what}: merge with none active: {e:?}"
        );
        layer.set_active(Some("one"))?;
        let x = randn(&[2, 3, IN], dtype, dev, seed(&format!("{what} x")))?;
        let fused = layer.forward(&x)?;
        layer.merge()?;
        assert_eq!(layer.merged(), Some("one"));
        assert_close(
            &layer.forward(&x)?,
            &fused,
            fwd_tol,
            &format!("{what} merged"),
        )?;
        // A merged layer gives its adapter no gradient (its forward does not use it).
        let xv = var(&x)?;
        let g = layer.forward(xv.as_tensor())?.sum_all()?.backward()?;
        for v in layer.trainable_vars() {
            assert!(
                g.get(v.as_tensor()).is_none(),
                "{what}: merged adapter got a gradient"
            );
        }
        for (name, r) in [
            ("merge twice", layer.merge()),
            ("switch while merged", layer.set_active(Some("two"))),
            ("disable while merged", layer.set_active(None)),
            (
                "load while merged",
                layer.set_adapter_weights(
                    "one",
                    &Tensor::zeros((4, IN), DType::F32, &Device::Cpu)?,
                    &Tensor::zeros((OUT, 4), DType::F32, &Device::Cpu)?,
                ),
            ),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { .. }),
                "{what}: {name}: {e:?}"
            );
        }
        layer.unmerge()?;
        assert_eq!(layer.merged(), None);
        assert_close(
            layer.weight(),
            &w,
            w_tol,
            &format!("{what} restored weight"),
        )?;
        assert_close(
            &layer.forward(&x)?,
            &fused,
            fwd_tol,
            &format!("{what} unmerged"),
        )?;
        let e = layer.unmerge().unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }),
            "{what}: unmerge twice: {e:?}"
        );
        layer.set_active(Some("two"))?;
    }
    Ok(())
}

/// PEFT's initialisation: `A` uniform in `±1/sqrt(in)` with the uniform's variance, `B` zeros,
/// deterministic in the seed, of the requested dtype and device.
fn init(dev: &Device) -> Result<()> {
    use flare::lora::init::{init_adapter, kaiming_uniform_bound};
    let (inf, out, r) = (1024, 7, 16);
    let (a, b) = init_adapter(inf, out, r, 42, DType::F32, dev)?;
    assert_eq!((a.dims(), b.dims()), (&[r, inf][..], &[out, r][..]));
    assert!(a.device().same_device(dev) && b.device().same_device(dev));
    let bound = kaiming_uniform_bound(inf);
    assert_eq!(bound, 1.0 / 32.0);
    let av = to_f64_vec(&a)?;
    assert!(av.iter().all(|v| v.abs() <= bound), "A outside the bound");
    let n = av.len() as f64;
    let mean = av.iter().sum::<f64>() / n;
    let var = av.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let want = bound * bound / 3.0;
    assert!(mean.abs() < 0.05 * bound, "A mean {mean}");
    assert!(
        (var / want - 1.0).abs() < 0.05,
        "A variance {var}, expected {want}"
    );
    assert!(to_f64_vec(&b)?.iter().all(|&v| v == 0.0), "B not zero");
    let (a2, _) = init_adapter(inf, out, r, 42, DType::F32, dev)?;
    assert_eq!(to_f64_vec(&a2)?, av, "same seed, different A");
    let (a3, _) = init_adapter(inf, out, r, 43, DType::F32, dev)?;
    assert_ne!(to_f64_vec(&a3)?, av, "different seeds, same A");
    // The dtype is a cast of the same f32 values; the device does not change them.
    let (ah, bh) = init_adapter(inf, out, r, 42, DType::BF16, dev)?;
    assert_eq!((ah.dtype(), bh.dtype()), (DType::BF16, DType::BF16));
    assert_eq!(to_f64_vec(&ah)?, to_f64_vec(&a.to_dtype(DType::BF16)?)?);
    let (ac, _) = init_adapter(inf, out, r, 42, DType::F32, &Device::Cpu)?;
    assert_eq!(to_f64_vec(&ac)?, av, "CPU and device init differ");

    // Through the layer: the adapter's dtype follows the base.
    let mut layer = LoraLinear::new(Tensor::zeros((out, inf), DType::BF16, dev)?, None)?;
    layer.add_adapter(
        "x",
        &LoraConfig {
            r,
            ..Default::default()
        },
        42,
    )?;
    let ad = layer.adapter("x").unwrap();
    assert_eq!(ad.a().dtype(), DType::F32);
    assert_eq!(
        to_f64_vec(ad.a())?,
        av,
        "layer init differs from init_adapter"
    );
    Ok(())
}

/// LoRA dropout: with `W = 0`, `A = B = I` and `s = 1` the layer computes `dropout(x)`: in
/// training mode every element is 0 or `x / (1 - p)` (both occur), out of it exactly `x`.
fn dropout(dev: &Device) -> Result<()> {
    let n = 16;
    let dtype = DType::F32;
    let mut layer = LoraLinear::new(Tensor::zeros((n, n), dtype, dev)?, None)?;
    let cfg = LoraConfig {
        r: n,
        alpha: n as f64,
        dropout: 0.5,
        ..Default::default()
    };
    layer.add_adapter("d", &cfg, 0)?;
    let eye = Tensor::eye(n, DType::F32, &Device::Cpu)?;
    layer.set_adapter_weights("d", &eye, &eye)?;
    layer.set_active(Some("d"))?;
    let x = randn_scaled(&[64, n], 1.0, 0.1, dtype, dev, seed("lora dropout x"))?;
    assert_eq!(
        to_f64_vec(&layer.forward(&x)?)?,
        to_f64_vec(&x)?,
        "eval mode"
    );
    layer.set_training(true);
    let xv = var(&x)?;
    let y = layer.forward(xv.as_tensor())?;
    let (yv, xs) = (to_f64_vec(&y)?, to_f64_vec(&x)?);
    let mut dropped = 0;
    for (i, (&yi, &xi)) in yv.iter().zip(&xs).enumerate() {
        if yi == 0.0 {
            dropped += 1;
        } else {
            assert!(
                (yi - 2.0 * xi).abs() <= 1e-5 * xi.abs(),
                "y[{i}] = {yi}, x = {xi}"
            );
        }
    }
    assert!(
        dropped > 0 && dropped < yv.len(),
        "{dropped} of {} dropped",
        yv.len()
    );
    let g = y.sum_all()?.backward()?;
    for v in layer.trainable_vars() {
        assert!(
            g.get(v.as_tensor()).is_some(),
            "dropout path: no adapter gradient"
        );
    }
    assert!(
        g.get(xv.as_tensor()).is_some(),
        "dropout path: no input gradient"
    );
    assert!(
        g.get(layer.weight()).is_none(),
        "dropout path: W got a gradient"
    );
    Ok(())
}

fn assert_lora_err(e: &Error, what: &str) {
    let s = e.to_string();
    assert!(
        s.contains("lora_linear"),
        "{what}: error `{s}` does not name lora_linear"
    );
}

/// Bad input returns the right error variant, naming the op; never a panic.
fn errors(dev: &Device) -> Result<()> {
    let m = |shape: &[usize], dtype: DType| randn(shape, dtype, dev, 7);
    let f = DType::F32;
    let (x, w, a, b, bias) = (
        m(&[5, IN], f)?,
        m(&[OUT, IN], f)?,
        m(&[4, IN], f)?,
        m(&[OUT, 4], f)?,
        m(&[OUT], f)?,
    );
    let s = Tensor::new(1f32, dev)?;
    let call = |x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor| {
        lora_linear(x, w, bias, a, b, 2.0).unwrap_err()
    };
    let bad_rank = [
        ("x rank 0", call(&s, &w, None, &a, &b)),
        ("w rank 1", call(&x, &m(&[IN], f)?, None, &a, &b)),
        ("a rank 1", call(&x, &w, None, &m(&[IN], f)?, &b)),
        ("b rank 0", call(&x, &w, None, &a, &s)),
    ];
    for (name, e) in bad_rank {
        assert!(matches!(e, Error::Rank { .. }), "{name}: {e:?}");
        assert_lora_err(&e, name);
    }
    let bad_shape = [
        ("w rank 3", call(&x, &m(&[1, OUT, IN], f)?, None, &a, &b)),
        ("b rank 3", call(&x, &w, None, &a, &m(&[1, OUT, 4], f)?)),
        ("x in", call(&m(&[5, IN + 1], f)?, &w, None, &a, &b)),
        ("a in", call(&x, &w, None, &m(&[4, IN + 1], f)?, &b)),
        ("r of a and b", call(&x, &w, None, &a, &m(&[OUT, 3], f)?)),
        (
            "out of w and b",
            call(&x, &w, None, &a, &m(&[OUT + 1, 4], f)?),
        ),
        (
            "bias length",
            call(&x, &w, Some(&m(&[OUT + 1], f)?), &a, &b),
        ),
        ("bias rank", call(&x, &w, Some(&m(&[1, OUT], f)?), &a, &b)),
    ];
    for (name, e) in bad_shape {
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e:?}");
        assert_lora_err(&e, name);
    }
    let h = DType::BF16;
    let bad_dtype = [
        ("x f32, w bf16", call(&x, &m(&[OUT, IN], h)?, None, &a, &b)),
        ("bias bf16", call(&x, &w, Some(&m(&[OUT], h)?), &a, &b)),
        ("a bf16, b f32", call(&x, &w, None, &m(&[4, IN], h)?, &b)),
        (
            "f16 adapters on bf16",
            call(
                &m(&[5, IN], h)?,
                &m(&[OUT, IN], h)?,
                None,
                &m(&[4, IN], DType::F16)?,
                &m(&[OUT, 4], DType::F16)?,
            ),
        ),
        (
            "bf16 adapters on f32",
            call(&x, &w, None, &m(&[4, IN], h)?, &m(&[OUT, 4], h)?),
        ),
    ];
    for (name, e) in bad_dtype {
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{name}: {e:?}");
        assert_lora_err(&e, name);
    }
    let e = lora_linear(&x, &w, Some(&bias), &a, &b, f64::NAN).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { .. }),
        "NaN scale: {e:?}"
    );
    let e = call(
        &x.to_dtype(DType::U32)?,
        &w.to_dtype(DType::U32)?,
        None,
        &a,
        &b,
    );
    assert!(matches!(e, Error::UnsupportedDType { .. }), "u32: {e:?}");
    if !dev.is_cpu() {
        let cpu = Device::Cpu;
        let e = call(&x, &w.to_device(&cpu)?, None, &a, &b);
        assert!(matches!(e, Error::DeviceMismatch { .. }), "w on cpu: {e:?}");
        let e = call(&x, &w, Some(&bias.to_device(&cpu)?), &a, &b);
        assert!(
            matches!(e, Error::DeviceMismatch { .. }),
            "bias on cpu: {e:?}"
        );
        let e = call(&x, &w, None, &a.to_device(&cpu)?, &b.to_device(&cpu)?);
        assert!(
            matches!(e, Error::DeviceMismatch { .. }),
            "adapters on cpu: {e:?}"
        );
        let d = DType::F64;
        let e = call(
            &x.to_dtype(d)?,
            &w.to_dtype(d)?,
            None,
            &a.to_dtype(d)?,
            &b.to_dtype(d)?,
        );
        assert!(
            matches!(e, Error::UnsupportedDType { .. }),
            "f64 on cuda: {e:?}"
        );
    }

    // The layer.
    let e = LoraLinear::new(m(&[IN], f)?, None).unwrap_err();
    assert!(
        matches!(e, Error::Rank { .. }),
        "layer weight rank 1: {e:?}"
    );
    let e = LoraLinear::new(w.clone(), Some(m(&[OUT + 1], f)?)).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "layer bias: {e:?}"
    );
    let e = LoraLinear::new(w.clone(), Some(m(&[OUT], h)?)).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "layer bias dtype: {e:?}"
    );
    let mut layer = LoraLinear::new(w.clone(), Some(bias.clone()))?;
    let cfg = LoraConfig {
        r: 4,
        ..Default::default()
    };
    layer.add_adapter("a", &cfg, 0)?;
    for (name, e) in [
        ("duplicate", layer.add_adapter("a", &cfg, 1).unwrap_err()),
        (
            "r = 0",
            layer
                .add_adapter(
                    "b",
                    &LoraConfig {
                        r: 0,
                        ..cfg.clone()
                    },
                    1,
                )
                .unwrap_err(),
        ),
        ("unknown active", layer.set_active(Some("zz")).unwrap_err()),
        (
            "unknown load",
            layer.set_adapter_weights("zz", &a, &b).unwrap_err(),
        ),
    ] {
        assert!(matches!(e, Error::InvalidArgument { .. }), "{name}: {e:?}");
    }
    for (name, e) in [
        (
            "load a shape",
            layer
                .set_adapter_weights("a", &m(&[3, IN], f)?, &b)
                .unwrap_err(),
        ),
        (
            "load b shape",
            layer
                .set_adapter_weights("a", &a, &m(&[OUT, 3], f)?)
                .unwrap_err(),
        ),
        (
            "base forward x",
            layer.forward(&m(&[5, IN + 1], f)?).unwrap_err(),
        ),
    ] {
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e:?}");
    }
    let e = layer.forward(&m(&[5, IN], h)?).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "base forward dtype: {e:?}"
    );
    layer.set_active(Some("a"))?;
    let e = layer.forward(&m(&[5, IN + 1], f)?).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "fused forward x: {e:?}"
    );
    assert_lora_err(&e, "fused forward x");
    Ok(())
}

/// An adapter added with its factors (as loading a saved one does) equals one added with random
/// factors and then loaded: same dtype, device, values, scale, and forward; a taken name, a bad
/// config and wrong shapes are refused without touching the layer.
fn add_with_weights(dev: &Device) -> Result<()> {
    for dtype in dtypes(dev) {
        let what = format!("add_adapter_with_weights {}", dt(dtype));
        let cfg = LoraConfig {
            r: 3,
            alpha: 6.0,
            ..Default::default()
        };
        let (mut two_step, _, _) = layer_with_bias(dtype, dev, &what)?;
        let mut direct = two_step.clone();
        two_step.add_adapter("a", &cfg, 7)?;
        randomize(&mut two_step, "a", &what)?;
        let (a, b) = {
            let ad = two_step.adapter("a").unwrap();
            (
                ad.a().to_device(&Device::Cpu)?,
                ad.b().to_device(&Device::Cpu)?,
            )
        };
        direct.add_adapter_with_weights("a", &cfg, &a, &b)?;
        let (x, y) = (two_step.adapter("a").unwrap(), direct.adapter("a").unwrap());
        assert_eq!(x.a().dtype(), y.a().dtype(), "{what}");
        assert!(y.a().device().same_device(dev), "{what}");
        assert_eq!((x.rank(), x.scale()), (y.rank(), y.scale()), "{what}");
        assert_eq!(to_f64_vec(x.a())?, to_f64_vec(y.a())?, "{what}: A");
        assert_eq!(to_f64_vec(x.b())?, to_f64_vec(y.b())?, "{what}: B");
        two_step.set_active(Some("a"))?;
        direct.set_active(Some("a"))?;
        let input = randn(&[2, IN], dtype, dev, seed(&format!("{what} x")))?;
        assert_eq!(
            to_f64_vec(&two_step.forward(&input)?)?,
            to_f64_vec(&direct.forward(&input)?)?,
            "{what}: forward"
        );
        assert!(direct.add_adapter_with_weights("a", &cfg, &a, &b).is_err());
        let bad = LoraConfig {
            r: 0,
            ..cfg.clone()
        };
        assert!(direct.add_adapter_with_weights("b", &bad, &a, &b).is_err());
        assert!(direct.add_adapter_with_weights("b", &cfg, &b, &a).is_err());
        assert_eq!(direct.adapter_names(), vec!["a"], "{what}");
    }
    Ok(())
}

/// `stack_rows` (the grouped factors' stacking, one launch on CUDA) against `Tensor::cat` on
/// the same device: the same values bit for bit (a copy), each part's gradient its rows of the
/// upstream gradient, every output element written (NaN-poisoned pool), for two and three
/// parts of odd shapes and every dtype; the `Tensor::cat` cases (one part, four, an integer
/// dtype) give cat's values and its errors.
fn stack_rows_op(dev: &Device) -> Result<()> {
    let shapes: &[&[&[usize]]] = &[
        &[&[3, 7], &[5, 7]],
        &[&[16, 33], &[1, 33], &[4, 33]],
        &[&[2, 3, 5], &[1, 3, 5], &[3, 3, 5]],
        &[&[0, 9], &[4, 9]],
    ];
    for dtype in dtypes(dev) {
        for (i, parts) in shapes.iter().enumerate() {
            let what = format!("stack_rows case {i} {}", dt(dtype));
            let ts = parts
                .iter()
                .enumerate()
                .map(|(j, sh)| {
                    randn(sh, dtype, dev, seed(&format!("{what} {j}"))).and_then(|t| var(&t))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = ts.iter().map(|v| v.as_tensor()).collect();
            let rows: usize = parts.iter().map(|sh| sh[0]).sum();
            poison(
                dev,
                dtype,
                &[rows * parts[0][1..].iter().product::<usize>()],
            )?;
            let got = stack_rows(&refs)?;
            let want = Tensor::cat(&refs, 0)?;
            assert_eq!(got.dims(), want.dims(), "{what}");
            let (g64, w64) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
            let diff = (&g64 - &w64)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>();
            // An empty result has no max: nothing to compare.
            if got.elem_count() > 0 {
                assert_eq!(diff?, 0.0, "{what}: values differ from Tensor::cat");
            }
            let up = randn(got.dims(), dtype, dev, seed(&format!("{what} up")))?;
            let grads = got.mul(&up)?.sum_all()?.backward()?;
            let mut first = 0;
            for (j, v) in ts.iter().enumerate() {
                let n = parts[j][0];
                if n == 0 {
                    first += n;
                    continue;
                }
                let g = grad_of(&grads, v.as_tensor(), &what).to_dtype(DType::F64)?;
                let want_g = up.narrow(0, first, n)?.to_dtype(DType::F64)?;
                let d = (&g - &want_g)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f64>()?;
                assert_eq!(
                    d, 0.0,
                    "{what}: part {j}'s gradient is not its rows of the upstream"
                );
                first += n;
            }
        }
    }
    // Tensor::cat's cases: one part, four parts, u32.
    let a = randn(&[2, 3], DType::F32, dev, 1)?;
    let four = stack_rows(&[&a, &a, &a, &a])?;
    assert_eq!(four.dims(), &[8, 3]);
    assert_eq!(stack_rows(&[&a])?.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
    let u = Tensor::arange(0u32, 6, dev)?.reshape((2, 3))?;
    assert_eq!(stack_rows(&[&u, &u])?.to_vec2::<u32>()?[3], vec![3, 4, 5]);
    // Mismatched trailing dims: Tensor::cat's error, not a panic.
    let b = randn(&[2, 4], DType::F32, dev, 2)?;
    assert!(
        stack_rows(&[&a, &b]).is_err(),
        "mismatched shapes must be an error"
    );
    Ok(())
}

/// `lora_swiglu_mlp` against a float64 reference from plain Candle ops: the output and the
/// gradients of `x` and of the six factors, every dtype (and f32 factors on half bases), odd
/// token counts, ranks below, at and above the fused op's reach (32), an intermediate size
/// that is not a multiple of 8, `x` tracked or frozen. On CUDA with a half base the in-reach
/// cases run the fused op on padded weights ([`MlpWeights`], whose views hold the weights'
/// values exactly; the others, and the CPU, the composite); a bf16 forward of the fused op
/// issues 4 cuBLASLt GEMMs (gate/up's and down's `x Aᵀ` and base GEMM, the low-rank products
/// folded into the base GEMMs) where the composite issues 7. Then the errors.
fn swiglu_mlp(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    let mut combos: Vec<(DType, DType)> = dtypes(dev).into_iter().map(|d| (d, d)).collect();
    combos.push((DType::BF16, DType::F32));
    combos.push((DType::F16, DType::F32));
    const H: usize = 40;
    for (dtype, adt) in combos {
        for &(xsh, inter, r, r2, track_x) in &[
            (&[37, H][..], 72usize, 16usize, 8usize, true),
            (&[2, 5, H][..], 64, 3, 32, true),
            (&[33, H][..], 136, 24, 16, false),
            (&[9, H][..], 36, 16, 16, true), // I % 8 != 0: composite
            (&[9, H][..], 48, 40, 4, true),  // rank above 32: composite
            // The checkpointing tests' 2-layer model: hidden 128, I 96, ranks 3.
            (&[2, 7, 128][..], 96, 3, 3, true),
        ] {
            let hd = *xsh.last().expect("a hidden size");
            let what = format!(
                "lora_swiglu_mlp {xsh:?} I {inter} r {r}/{r2} x {track_x} {} (adapters {})",
                dt(dtype),
                dt(adt)
            );
            let sd = |tag: &str| seed(&format!("{what} {tag}"));
            let x = randn(xsh, dtype, dev, sd("x"))?;
            let w_gu = randn_scaled(&[2 * inter, hd], 0.0, 0.15, dtype, dev, sd("wgu"))?;
            let w_d = randn_scaled(&[hd, inter], 0.0, 0.15, dtype, dev, sd("wd"))?;
            let f = |rows: usize, cols: usize, tag: &str| -> Result<candle_core::Var> {
                var(&randn_scaled(&[rows, cols], 0.0, 0.3, adt, dev, sd(tag))?)
            };
            let (ag, bg) = (f(r, hd, "ag")?, f(inter, r, "bg")?);
            let (au, bu) = (f(r, hd, "au")?, f(inter, r, "bu")?);
            let (ad, bd) = (f(r2, inter, "ad")?, f(hd, r2, "bd")?);
            let (s_gu, s_d) = (8.0 / (3.0 * r as f64), 2.0 / r2 as f64);
            let weights = MlpWeights::new(&w_gu, &w_d)?;
            let padded = dev.is_cuda()
                && matches!(dtype, DType::BF16 | DType::F16)
                && inter % 8 == 0
                && hd % 8 == 0;
            assert_eq!(weights.is_padded(), padded, "{what}: padded weights");
            for (view, orig) in [(weights.gate_up(), &w_gu), (weights.down(), &w_d)] {
                let diff = (view.to_dtype(DType::F32)? - orig.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{what}: the laid-out weights hold other values");
            }
            let m = LoraMlp {
                weights: &weights,
                gate: (ag.as_tensor(), bg.as_tensor()),
                up: (au.as_tensor(), bu.as_tensor()),
                down: (ad.as_tensor(), bd.as_tensor()),
                scale_gate_up: s_gu,
                scale_down: s_d,
            };
            let xv = var(&x)?;
            let xin = if track_x {
                xv.as_tensor().clone()
            } else {
                x.clone()
            };
            let fused = padded && r <= 32 && r2 <= 64;
            if fused && dtype == DType::BF16 && adt == DType::BF16 {
                dev.synchronize()?;
                let before = flare::runtime::stats().gemms_launched;
                let y = lora_swiglu_mlp(&xin, &m)?;
                dev.synchronize()?;
                let n = flare::runtime::stats().gemms_launched - before;
                assert_eq!(
                    n, 4,
                    "{what}: the fused forward issued {n} GEMMs, expected 4"
                );
                drop(y);
            }
            let y = lora_swiglu_mlp(&xin, &m)?;
            assert_eq!(y.dims(), xsh, "{what}: output shape");
            let rr = randn(y.dims(), dtype, dev, sd("r"))?;
            let grads = y.mul(&rr)?.sum_all()?.backward()?;
            assert_eq!(grads.get(xv.as_tensor()).is_some(), track_x, "{what}: dx");
            assert!(
                grads.get(&w_gu).is_none() && grads.get(&w_d).is_none(),
                "{what}: W grads"
            );

            // The reference: plain f64 ops, the factors rounded to the base dtype first (as the
            // ops do).
            let up64 =
                |t: &Tensor| -> Result<candle_core::Var> { var(&f64_cpu(&t.to_dtype(dtype)?)?) };
            let xr = var(&f64_cpu(&x)?)?;
            let (agr, bgr, aur, bur, adr, bdr) = (
                up64(ag.as_tensor())?,
                up64(bg.as_tensor())?,
                up64(au.as_tensor())?,
                up64(bu.as_tensor())?,
                up64(ad.as_tensor())?,
                up64(bd.as_tensor())?,
            );
            let (wgr, wdr) = (f64_cpu(&w_gu)?, f64_cpu(&w_d)?);
            let proj = |z: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64| -> Result<Tensor> {
                let base = z.broadcast_matmul(&w.t()?)?;
                let low = (z.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?;
                Ok((base + low)?)
            };
            let g = proj(
                xr.as_tensor(),
                &wgr.narrow(0, 0, inter)?,
                agr.as_tensor(),
                bgr.as_tensor(),
                s_gu,
            )?;
            let u = proj(
                xr.as_tensor(),
                &wgr.narrow(0, inter, inter)?,
                aur.as_tensor(),
                bur.as_tensor(),
                s_gu,
            )?;
            let act = (g.silu()? * u)?;
            let yr = proj(&act, &wdr, adr.as_tensor(), bdr.as_tensor(), s_d)?;
            fails.check(&f64_cpu(&y)?, &yr, tol(dtype), &format!("{what} y"))?;
            let grads_r = yr.mul(&f64_cpu(&rr)?)?.sum_all()?.backward()?;
            if track_x {
                let gx = grad_of(&grads, xv.as_tensor(), &what);
                let gr = grad_of(&grads_r, xr.as_tensor(), &what);
                fails.check(&gx, &gr, tol(dtype), &format!("{what} dx"))?;
            }
            for (name, v, vr) in [
                ("dA_gate", &ag, &agr),
                ("dB_gate", &bg, &bgr),
                ("dA_up", &au, &aur),
                ("dB_up", &bu, &bur),
                ("dA_down", &ad, &adr),
                ("dB_down", &bd, &bdr),
            ] {
                let what = format!("{what} {name}");
                let gv = grad_of(&grads, v.as_tensor(), &what);
                assert_eq!(gv.dtype(), adt, "{what}: gradient dtype");
                assert_eq!(gv.dims(), v.dims(), "{what}: gradient shape");
                let gr = grad_of(&grads_r, vr.as_tensor(), &what);
                fails.check(&gv, &gr, tol(dtype), &what)?;
            }
        }
    }
    fails.finish();

    // Errors, before anything runs.
    let dtype = dtypes(dev)[0];
    let x = randn(&[3, 16], dtype, dev, 1)?;
    let w_gu = randn(&[16, 16], dtype, dev, 2)?;
    let w_d = randn(&[16, 8], dtype, dev, 3)?;
    let t = |sh: &[usize], s: u64| randn(sh, dtype, dev, s);
    let (ag, bg, au, bu, ad, bd) = (
        t(&[2, 16], 4)?,
        t(&[8, 2], 5)?,
        t(&[2, 16], 6)?,
        t(&[8, 2], 7)?,
        t(&[2, 8], 8)?,
        t(&[16, 2], 9)?,
    );
    let weights = MlpWeights::new(&w_gu, &w_d)?;
    let ok = LoraMlp {
        weights: &weights,
        gate: (&ag, &bg),
        up: (&au, &bu),
        down: (&ad, &bd),
        scale_gate_up: 1.0,
        scale_down: 1.0,
    };
    lora_swiglu_mlp(&x, &ok)?;
    let w_bad = randn(&[14, 16], dtype, dev, 10)?;
    let e = MlpWeights::new(&w_bad, &w_d).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "w_gate_up rows: {e}"
    );
    let other = if dtype == DType::F32 {
        DType::F16
    } else {
        DType::F32
    };
    let e = MlpWeights::new(&w_gu, &w_d.to_dtype(other)?).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "w_down of another dtype: {e}"
    );
    let (au3, bu3) = (t(&[3, 16], 11)?, t(&[8, 3], 12)?);
    let e = lora_swiglu_mlp(
        &x,
        &LoraMlp {
            up: (&au3, &bu3),
            ..ok
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "up's rank: {e}");
    let e = lora_swiglu_mlp(
        &x,
        &LoraMlp {
            down: (&bd, &ad),
            ..ok
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "down's factors swapped: {e}"
    );
    let x_bad = randn(&[3, 12], dtype, dev, 13)?;
    let e = lora_swiglu_mlp(&x_bad, &ok).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "x's width: {e}");
    let ad64 = ad.to_dtype(DType::F64)?;
    if dev.is_cpu() {
        let e = lora_swiglu_mlp(
            &x,
            &LoraMlp {
                down: (&ad64, &bd),
                ..ok
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::DTypeMismatch { .. }),
            "down's factor dtype: {e}"
        );
    }
    Ok(())
}

device_test!(
    stack_rows_op,
    swiglu_mlp,
    add_with_weights,
    grouped,
    forward,
    views_and_empty,
    grads_vs_reference,
    f32_factors,
    grad_fd,
    partial_tracking,
    every_element_written,
    base_exact,
    two_adapters,
    merge_unmerge,
    init,
    dropout,
    errors,
);
