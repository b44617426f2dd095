//! The decode-path ops: `rope_heads` (RoPE fused with the seq/head transposition) and
//! `rope_tokens` (RoPE in the token layout, for flash attention), `swiglu` and
//! `argmax_last_dim`, against f64 references written out here, with finite-difference
//! gradients on the CPU and CUDA-vs-CPU checks through `device_test!`.

use candle_core::{DType, Device, Tensor, D};
use flare::ops::{argmax_last_dim, rope_heads, rope_tokens, swiglu};

use crate::common::{
    device_test, dtypes, f64_cpu, grad_of, randn, seed, shared_lock, to_f64_vec, tol, var,
    weighted_loss, Failures, FdCheck, Result,
};

/// The f64 reference of `rope_heads`: `x` `[b, s, h, d]`, tables `[rows, d/2]` (rows `s` or
/// `b*s`), output `[b, h, s, d]` as a flat vector.
fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Vec<f64>> {
    let (b, s, h, d) = x.dims4()?;
    let half = d / 2;
    let xv = to_f64_vec(&x.contiguous()?)?;
    let (cv, sv) = (to_f64_vec(cos)?, to_f64_vec(sin)?);
    let per_row = cos.dim(0)? == b * s && b > 1;
    let mut y = vec![0.0; b * h * s * d];
    for bb in 0..b {
        for t in 0..s {
            let row = if per_row { bb * s + t } else { t };
            for hh in 0..h {
                let xo = ((bb * s + t) * h + hh) * d;
                let yo = ((bb * h + hh) * s + t) * d;
                for i in 0..half {
                    let (x1, x2) = (xv[xo + i], xv[xo + i + half]);
                    let (c, sn) = (cv[row * half + i], sv[row * half + i]);
                    y[yo + i] = (x1 * c - x2 * sn) * scale;
                    y[yo + i + half] = (x2 * c + x1 * sn) * scale;
                }
            }
        }
    }
    Ok(y)
}

/// Tables of random angles, `[rows, half]`, in `dtype` on `dev`.
fn tables(
    rows: usize,
    half: usize,
    dtype: DType,
    dev: &Device,
    sd: u64,
) -> Result<(Tensor, Tensor)> {
    let angle = randn(&[rows, half], DType::F64, &Device::Cpu, sd)?;
    let c = angle.cos()?.to_dtype(dtype)?.to_device(dev)?;
    let s = angle.sin()?.to_dtype(dtype)?.to_device(dev)?;
    Ok((c, s))
}

/// Forward on odd shapes, shared and per-row tables, contiguous and transposed inputs.
fn rope_forward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        // d = 32 and 128: the kernel's 16-byte pack path on CUDA (the others take its element path).
        for &(b, s, h, d) in &[
            (1, 1, 1, 2),
            (2, 7, 3, 6),
            (1, 5, 2, 66),
            (3, 2, 4, 8),
            (2, 5, 3, 32),
            (1, 9, 2, 128),
        ] {
            for per_row in [false, true] {
                for transposed in [false, true] {
                    let what =
                        format!("rope {b}x{s}x{h}x{d} {dtype:?} per_row={per_row} t={transposed}");
                    let sd = seed(&what);
                    let x = if transposed {
                        // A [b, h, s, d] tensor viewed as [b, s, h, d]: non-contiguous.
                        randn(&[b, h, s, d], dtype, dev, sd)?.transpose(1, 2)?
                    } else {
                        randn(&[b, s, h, d], dtype, dev, sd)?
                    };
                    let rows = if per_row { b * s } else { s };
                    let (c, sn) = tables(rows, d / 2, dtype, dev, sd + 1)?;
                    let scale = 0.125;
                    let y = rope_heads(&x, &c, &sn, scale)?;
                    assert!(y.is_contiguous());
                    let want = rope_ref(&x, &c, &sn, scale)?;
                    let want = Tensor::from_vec(want, (b, h, s, d), &Device::Cpu)?;
                    fails.check(&f64_cpu(&y)?, &want, tol(dtype), &what)?;
                }
            }
        }
    }
    fails.finish();
    Ok(())
}

/// The backward on the device against the f64 CPU backward (itself checked by finite
/// differences in `rope_fd_gradient`).
fn rope_backward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for &(b, s, h, d) in &[(1, 1, 1, 2), (2, 7, 3, 6), (1, 3, 2, 66), (2, 5, 3, 32)] {
            let what = format!("rope bwd {b}x{s}x{h}x{d} {dtype:?}");
            let sd = seed(&what);
            let x = randn(&[b, s, h, d], dtype, dev, sd)?;
            let (c, sn) = tables(b * s, d / 2, dtype, dev, sd + 1)?;
            let r = randn(&[b, h, s, d], dtype, dev, sd + 2)?;
            let xv = var(&x)?;
            let y = rope_heads(xv.as_tensor(), &c, &sn, 0.5)?;
            let g = (y * &r)?.sum_all()?.backward()?;
            let dx = grad_of(&g, xv.as_tensor(), &what);
            let x64 = var(&f64_cpu(&x)?)?;
            let y64 = rope_heads(x64.as_tensor(), &f64_cpu(&c)?, &f64_cpu(&sn)?, 0.5)?;
            let g64 = (y64 * f64_cpu(&r)?)?.sum_all()?.backward()?;
            let want = grad_of(&g64, x64.as_tensor(), &what);
            fails.check(&f64_cpu(&dx)?, &want, tol(dtype), &what)?;
        }
    }
    fails.finish();
    Ok(())
}

device_test!(rope_forward, rope_backward);

#[test]
fn rope_fd_gradient() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    let x = randn(&[2, 3, 2, 6], DType::F64, &dev, 1)?;
    let (c, s) = tables(6, 3, DType::F64, &dev, 2)?;
    let r = randn(&[2, 2, 3, 6], DType::F64, &dev, 3)?;
    FdCheck::new(&dev, "rope vs finite differences").check(&[("dx", &x)], |t| {
        weighted_loss(&rope_heads(&t[0], &c, &s, 0.7)?, &r)
    })?;
    // The composite reference agrees.
    let composite = flare::ops::rope::rope_heads_reference(&x, &c, &s, 0.7)?;
    crate::common::assert_close(
        &rope_heads(&x, &c, &s, 0.7)?,
        &composite,
        1e-12,
        "rope vs composite",
    )?;
    // Bad shapes are errors, not panics.
    assert!(rope_heads(&x, &c.narrow(1, 0, 2)?, &s, 1.0).is_err());
    assert!(rope_heads(&x.narrow(3, 0, 5)?, &c, &s, 1.0).is_err());
    assert!(rope_heads(&x.flatten_all()?, &c, &s, 1.0).is_err());
    // A table that takes part in autograd is refused by the backward.
    let (xv, cv) = (var(&x)?, var(&c)?);
    let y = rope_heads(xv.as_tensor(), cv.as_tensor(), &s, 1.0)?;
    assert!(y.sum_all()?.backward().is_err());
    Ok(())
}

/// The ways the model hands `x: [b, s, h, d]` to RoPE: contiguous (separate projections), a
/// narrow of the heads of a wider tensor at a non-zero offset (a fused q/k/v projection), and a
/// `[b, h, s, d]` tensor viewed transposed.
fn rope_input(
    kind: &str,
    (b, s, h, d): (usize, usize, usize, usize),
    dtype: DType,
    dev: &Device,
    sd: u64,
) -> Result<Tensor> {
    Ok(match kind {
        "contiguous" => randn(&[b, s, h, d], dtype, dev, sd)?,
        "narrow" => randn(&[b, s, h + 3, d], dtype, dev, sd)?.narrow(2, 2, h)?,
        "transposed" => randn(&[b, h, s, d], dtype, dev, sd)?.transpose(1, 2)?,
        other => panic!("no rope input kind {other}"),
    })
}

/// `rope_tokens` on odd shapes, shared and per-row tables and every input layout, against the
/// f64 reference of `rope_heads` transposed back to `[b, s, h, d]`.
fn rope_tokens_forward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        // The last: more tokens than a grid's y dimension (65,535) on CUDA.
        for &dims in &[
            (1, 1, 1, 2),
            (2, 7, 3, 6),
            (1, 5, 2, 66),
            (3, 2, 4, 8),
            (2, 5, 3, 32),
            (1, 9, 2, 128),
            (1, 66_000, 1, 2),
        ] {
            let (b, s, h, d) = dims;
            for per_row in [false, true] {
                for kind in ["contiguous", "narrow", "transposed"] {
                    let what =
                        format!("rope_tokens {b}x{s}x{h}x{d} {dtype:?} per_row={per_row} {kind}");
                    let sd = seed(&what);
                    let x = rope_input(kind, dims, dtype, dev, sd)?;
                    let rows = if per_row { b * s } else { s };
                    let (c, sn) = tables(rows, d / 2, dtype, dev, sd + 1)?;
                    let scale = 0.125;
                    let y = rope_tokens(&x, &c, &sn, scale)?;
                    assert!(y.is_contiguous(), "{what}: output not contiguous");
                    assert_eq!(y.dims(), &[b, s, h, d], "{what}: output shape");
                    let want = rope_ref(&x, &c, &sn, scale)?;
                    let want = Tensor::from_vec(want, (b, h, s, d), &Device::Cpu)?
                        .transpose(1, 2)?
                        .contiguous()?;
                    fails.check(&f64_cpu(&y)?, &want, tol(dtype), &what)?;
                }
            }
        }
    }
    fails.finish();
    Ok(())
}

/// The backward of `rope_tokens` on the device (strided input, strided output gradient)
/// against the f64 CPU backward (itself checked by finite differences in
/// `rope_tokens_fd_gradient`).
fn rope_tokens_backward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for &(b, s, h, d) in &[(1, 1, 1, 2), (2, 7, 3, 6), (1, 3, 2, 66), (2, 5, 3, 32)] {
            for per_row in [false, true] {
                let what = format!("rope_tokens bwd {b}x{s}x{h}x{d} {dtype:?} per_row={per_row}");
                let sd = seed(&what);
                let wide = randn(&[b, s, h + 2, d], dtype, dev, sd)?;
                let rows = if per_row { b * s } else { s };
                let (c, sn) = tables(rows, d / 2, dtype, dev, sd + 1)?;
                let r = randn(&[b, h, s, d], dtype, dev, sd + 2)?;
                // The loss reads y transposed, so the op's backward gets a strided gradient.
                let grad = |wide: &Tensor, c: &Tensor, sn: &Tensor, r: &Tensor| -> Result<Tensor> {
                    let wv = var(wide)?;
                    let y = rope_tokens(&wv.as_tensor().narrow(2, 1, h)?, c, sn, 0.5)?;
                    let g = (y.transpose(1, 2)? * r)?.sum_all()?.backward()?;
                    Ok(grad_of(&g, wv.as_tensor(), &what))
                };
                let dx = grad(&wide, &c, &sn, &r)?;
                let want = grad(
                    &f64_cpu(&wide)?,
                    &f64_cpu(&c)?,
                    &f64_cpu(&sn)?,
                    &f64_cpu(&r)?,
                )?;
                fails.check(&f64_cpu(&dx)?, &want, tol(dtype), &what)?;
                // The heads outside the narrow get exactly zero.
                let outside = f64_cpu(&dx.narrow(2, 0, 1)?)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
                assert_eq!(outside, 0.0, "{what}: gradient outside the narrow");
            }
        }
    }
    fails.finish();
    Ok(())
}

device_test!(rope_tokens_forward, rope_tokens_backward);

#[test]
fn rope_tokens_fd_gradient() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    let (b, s, h, d) = (2, 3, 3, 10);
    let wide = randn(&[b, s, h + 2, d], DType::F64, &dev, 11)?;
    let (c, sn) = tables(b * s, d / 2, DType::F64, &dev, 12)?;
    let r = randn(&[b, s, h, d], DType::F64, &dev, 13)?;
    // Through a narrow of a wider tensor (the fused q/k/v projection), per-row tables.
    FdCheck::new(&dev, "rope_tokens vs finite differences").check(&[("dx", &wide)], |t| {
        weighted_loss(&rope_tokens(&t[0].narrow(2, 1, h)?, &c, &sn, 0.7)?, &r)
    })?;
    // The composite reference agrees, forward (with rope_heads' reference transposed) and
    // through its autograd.
    let x = wide.narrow(2, 1, h)?;
    let y = rope_tokens(&x, &c, &sn, 0.7)?;
    let heads_ref = flare::ops::rope::rope_heads_reference(&x, &c, &sn, 0.7)?.transpose(1, 2)?;
    crate::common::assert_close(&y, &heads_ref, 1e-12, "rope_tokens vs rope_heads_reference")?;
    crate::common::assert_close(
        &y,
        &rope_heads(&x, &c, &sn, 0.7)?.transpose(1, 2)?,
        1e-12,
        "rope_tokens vs rope_heads",
    )?;
    let autograd = |f: &dyn Fn(&Tensor) -> flare::Result<Tensor>| -> Result<Tensor> {
        let wv = var(&wide)?;
        let y = f(&wv.as_tensor().narrow(2, 1, h)?)?;
        let g = weighted_loss(&y, &r)?.backward()?;
        Ok(grad_of(&g, wv.as_tensor(), "rope_tokens autograd"))
    };
    crate::common::assert_close(
        &autograd(&|x| rope_tokens(x, &c, &sn, 0.7))?,
        &autograd(&|x| flare::ops::rope::rope_tokens_reference(x, &c, &sn, 0.7))?,
        1e-12,
        "rope_tokens backward vs the composite's autograd",
    )?;
    // Bad shapes are errors naming the op, not panics.
    for bad in [
        rope_tokens(&x, &c.narrow(1, 0, 2)?, &sn, 1.0),
        rope_tokens(&x.narrow(3, 0, 5)?, &c, &sn, 1.0),
        rope_tokens(&x.flatten_all()?, &c, &sn, 1.0),
        rope_tokens(&x, &c.narrow(0, 0, 5)?, &sn.narrow(0, 0, 5)?, 1.0),
    ] {
        let err = bad.expect_err("a bad shape must be refused").to_string();
        assert!(
            err.contains("rope_tokens"),
            "error does not name the op: {err}"
        );
    }
    // A table that takes part in autograd is refused by the backward.
    let (xv, cv) = (var(&x)?, var(&c)?);
    let y = rope_tokens(xv.as_tensor(), cv.as_tensor(), &sn, 1.0)?;
    assert!(y.sum_all()?.backward().is_err());
    Ok(())
}

/// f64 reference of swiglu and its gradients.
fn swiglu_ref(g: &[f64], u: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let y = g.iter().zip(u).map(|(&g, &u)| g * sig(g) * u).collect();
    let dg = (0..g.len())
        .map(|i| dy[i] * u[i] * sig(g[i]) * (1.0 + g[i] * (1.0 - sig(g[i]))))
        .collect();
    let du = (0..g.len()).map(|i| dy[i] * g[i] * sig(g[i])).collect();
    (y, dg, du)
}

fn swiglu_forward_backward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        // Odd widths (element-wise CUDA path), widths of whole 16-byte packs (one access per
        // pack), more rows than a grid's y dimension (65,535), and more packs than the flat
        // backward's grid holds threads (its grid-stride loop and tail, odd width).
        for shape in [
            vec![1],
            vec![7],
            vec![3, 33],
            vec![2, 3, 5],
            vec![5, 48],
            vec![2, 3, 264],
            vec![70_000, 8],
            vec![1_100, 4_099],
        ] {
            for transposed in [false, true] {
                if transposed && shape.len() < 2 {
                    continue;
                }
                let what = format!("swiglu {shape:?} {dtype:?} t={transposed}");
                let sd = seed(&what);
                let mk = |k: u64| -> Result<Tensor> {
                    if transposed {
                        let mut s = shape.clone();
                        let n = s.len();
                        s.swap(n - 2, n - 1);
                        Ok(randn(&s, dtype, dev, sd + k)?.transpose(D::Minus2, D::Minus1)?)
                    } else {
                        randn(&shape, dtype, dev, sd + k)
                    }
                };
                let (g, u) = (mk(0)?, mk(1)?);
                let dy = randn(&shape, dtype, dev, sd + 2)?;
                let (gv, uv) = (var(&g)?, var(&u)?);
                let y = swiglu(gv.as_tensor(), uv.as_tensor())?;
                let grads = (&y * &dy)?.sum_all()?.backward()?;
                let (ry, rdg, rdu) =
                    swiglu_ref(&to_f64_vec(&g)?, &to_f64_vec(&u)?, &to_f64_vec(&dy)?);
                let t = |v: Vec<f64>| Tensor::from_vec(v, shape.as_slice(), &Device::Cpu);
                fails.check(&f64_cpu(&y)?, &t(ry)?, tol(dtype), &format!("{what} y"))?;
                let dg = grad_of(&grads, gv.as_tensor(), &what);
                let du = grad_of(&grads, uv.as_tensor(), &what);
                fails.check(&f64_cpu(&dg)?, &t(rdg)?, tol(dtype), &format!("{what} dg"))?;
                fails.check(&f64_cpu(&du)?, &t(rdu)?, tol(dtype), &format!("{what} du"))?;
            }
        }
    }
    fails.finish();
    Ok(())
}

device_test!(swiglu_forward_backward);

/// `swiglu_grad_in_place` gives `swiglu`'s values and gradients bit for bit, and on CUDA its
/// backward really writes the gradients over its (fresh, contiguous) inputs; elsewhere the
/// inputs keep their values.
fn swiglu_grad_in_place_matches_swiglu(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for shape in [
            vec![7],
            vec![3, 33],
            vec![5, 48],
            vec![2, 3, 264],
            vec![70_000, 8],
            vec![1_100, 4_099],
        ] {
            let what = format!("swiglu_grad_in_place {shape:?} {dtype:?}");
            let sd = seed(&what);
            let (g0, u0) = (
                randn(&shape, dtype, dev, sd)?,
                randn(&shape, dtype, dev, sd + 1)?,
            );
            let dy = randn(&shape, dtype, dev, sd + 2)?;
            let (gv, uv) = (var(&g0)?, var(&u0)?);
            // Fresh tensors in front of the op, as the model's projections give it.
            let fresh = |v: &candle_core::Var| v.as_tensor().affine(1.0, 0.0);
            let (g1, u1) = (fresh(&gv)?, fresh(&uv)?);
            let y1 = swiglu(&g1, &u1)?;
            let want = (&y1 * &dy)?.sum_all()?.backward()?;
            let (g2, u2) = (fresh(&gv)?, fresh(&uv)?);
            let y2 = flare::ops::swiglu_grad_in_place(&g2, &u2)?;
            assert_eq!(
                to_f64_vec(&y1)?,
                to_f64_vec(&y2)?,
                "{what}: forward differs"
            );
            let got = (&y2 * &dy)?.sum_all()?.backward()?;
            let dg = grad_of(&got, gv.as_tensor(), &what);
            let du = grad_of(&got, uv.as_tensor(), &what);
            assert_eq!(
                to_f64_vec(&dg)?,
                to_f64_vec(&grad_of(&want, gv.as_tensor(), &what))?,
                "{what}: dg differs from swiglu's"
            );
            assert_eq!(
                to_f64_vec(&du)?,
                to_f64_vec(&grad_of(&want, uv.as_tensor(), &what))?,
                "{what}: du differs from swiglu's"
            );
            let (_, rdg, rdu) = swiglu_ref(&to_f64_vec(&g0)?, &to_f64_vec(&u0)?, &to_f64_vec(&dy)?);
            let t = |v: Vec<f64>| Tensor::from_vec(v, shape.as_slice(), &Device::Cpu);
            fails.check(&f64_cpu(&dg)?, &t(rdg)?, tol(dtype), &format!("{what} dg"))?;
            fails.check(&f64_cpu(&du)?, &t(rdu)?, tol(dtype), &format!("{what} du"))?;
            // Where the backward wrote: over g2 and u2 on CUDA, nowhere visible elsewhere.
            let (g_after, u_after) = (to_f64_vec(&g2)?, to_f64_vec(&u2)?);
            if dev.is_cuda() {
                assert_eq!(
                    g_after,
                    to_f64_vec(&dg)?,
                    "{what}: dg was not written over g"
                );
                assert_eq!(
                    u_after,
                    to_f64_vec(&du)?,
                    "{what}: du was not written over u"
                );
            } else {
                assert_eq!(g_after, to_f64_vec(&g0)?, "{what}: g changed on {dev:?}");
                assert_eq!(u_after, to_f64_vec(&u0)?, "{what}: u changed on {dev:?}");
            }
        }
    }
    fails.finish();
    Ok(())
}

device_test!(swiglu_grad_in_place_matches_swiglu);

#[test]
fn swiglu_fd_gradient() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    let g = randn(&[3, 7], DType::F64, &dev, 11)?;
    let u = randn(&[3, 7], DType::F64, &dev, 12)?;
    let r = randn(&[3, 7], DType::F64, &dev, 13)?;
    FdCheck::new(&dev, "swiglu vs finite differences").check(&[("dg", &g), ("du", &u)], |t| {
        weighted_loss(&swiglu(&t[0], &t[1])?, &r)
    })?;
    assert!(swiglu(&g, &u.narrow(1, 0, 6)?).is_err());
    Ok(())
}

/// Argmax against the host's `sampling::argmax` on the same (rounded) values, with ties, NaN
/// and all-NaN rows, odd widths and a transposed view.
fn argmax_matches_host(dev: &Device) -> Result<()> {
    for dtype in dtypes(dev) {
        for &(rows, cols) in &[(1, 1), (1, 7), (3, 33), (2, 5000), (4, 151_936)] {
            let sd = seed(&format!("argmax {rows}x{cols} {dtype:?}"));
            let x = randn(&[rows, cols], dtype, dev, sd)?;
            let got = argmax_last_dim(&x)?.to_vec1::<u32>()?;
            let host = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (r, row) in host.iter().enumerate() {
                let want = flare::generate::sampling::argmax(row)?;
                assert_eq!(got[r], want, "{rows}x{cols} {dtype:?} row {r}");
            }
        }
        // Ties take the first index; NaN is skipped; an all-NaN row gives u32::MAX.
        let nan = f64::NAN;
        let x = Tensor::new(
            &[
                [1.0f64, 3.0, 3.0, -1.0],
                [nan, -2.0, nan, -2.0],
                [nan, nan, nan, nan],
            ],
            &Device::Cpu,
        )?
        .to_dtype(dtype)?
        .to_device(dev)?;
        assert_eq!(argmax_last_dim(&x)?.to_vec1::<u32>()?, vec![1, 1, u32::MAX]);
        // A transposed view and a batch dim.
        let x = randn(&[2, 9, 3], dtype, dev, 5)?.transpose(1, 2)?; // [2, 3, 9]
        let got = argmax_last_dim(&x)?;
        assert_eq!(got.dims(), &[2, 3]);
        let want = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .to_device(&Device::Cpu)?;
        let host = want.reshape((6, 9))?.to_vec2::<f32>()?;
        let got = got.flatten_all()?.to_vec1::<u32>()?;
        for (r, row) in host.iter().enumerate() {
            assert_eq!(
                got[r],
                flare::generate::sampling::argmax(row)?,
                "transposed row {r}"
            );
        }
    }
    Ok(())
}

device_test!(argmax_matches_host);

/// Skinny products `x @ w.T` (the decode-time linear layers; `gemv_*` on CUDA by
/// default, cuBLASLt / gemm_small with `FLARE_GEMV=0`) against an f64
/// reference: 1..=8 rows and a 9-row control, odd k and n, strided rows of `x` and of `w`
/// (narrowed views, ld > k) and offsets that rule out 16-byte accesses, a rank-3 `x`.
fn skinny_matmul(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 33),
            (3, 33, 7),
            (8, 64, 129),
            (9, 40, 17),
            (2, 896, 300),
            (1, 7, 1),
            (1, 33, 7),
            (1, 896, 896),
            (5, 4864, 33),
            (1, 64, 151_936),
        ] {
            for strided in [false, true] {
                let what = format!("x[{m},{k}] @ w[{n},{k}].T {dtype:?} strided={strided}");
                let sd = seed(&what);
                let (x, w) = if strided {
                    let xw = randn(&[m, k + 3], dtype, dev, sd)?;
                    let ww = randn(&[n, k + 5], dtype, dev, sd + 1)?;
                    (xw.narrow(1, 1, k)?, ww.narrow(1, 2, k)?)
                } else {
                    (
                        randn(&[m, k], dtype, dev, sd)?,
                        randn(&[n, k], dtype, dev, sd + 1)?,
                    )
                };
                let y = flare::ops::matmul(&x, &w.t()?)?;
                let want = f64_cpu(&x)?.matmul(&f64_cpu(&w)?.t()?)?;
                fails.check(&f64_cpu(&y)?, &want, tol(dtype), &what)?;
            }
        }
        // A rank-3 x (batch 2 x 1 token), as a linear layer sees one decode step.
        let x = randn(&[2, 1, 96], dtype, dev, 77)?;
        let w = randn(&[40, 96], dtype, dev, 78)?;
        let y = flare::ops::matmul(&x, &w.t()?)?;
        let want = f64_cpu(&x)?.broadcast_matmul(&f64_cpu(&w)?.t()?)?;
        fails.check(
            &f64_cpu(&y)?,
            &want,
            tol(dtype),
            &format!("rank-3 {dtype:?}"),
        )?;
    }
    fails.finish();
    Ok(())
}

device_test!(skinny_matmul);

/// `swiglu_packed` (gate and up as the two halves of one row) against the f64 reference,
/// forward and gradient, odd widths and batch dims, on every device; FD-checked on the CPU.
fn swiglu_packed_forward_backward(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for shape in [
            vec![1, 2],
            vec![7, 66],
            vec![2, 3, 10],
            vec![5, 96],
            vec![4, 528],
            // More packs than the backward's grid-stride grid holds threads.
            vec![600, 16_400],
        ] {
            let what = format!("swiglu_packed {shape:?} {dtype:?}");
            let sd = seed(&what);
            let gu = randn(&shape, dtype, dev, sd)?;
            let last = shape.len() - 1;
            let i = shape[last] / 2;
            let mut out_shape = shape.clone();
            out_shape[last] = i;
            let dy = randn(&out_shape, dtype, dev, sd + 1)?;
            let v = var(&gu)?;
            let y = flare::ops::swiglu_packed(v.as_tensor())?;
            let grads = (&y * &dy)?.sum_all()?.backward()?;
            let g64 = f64_cpu(&gu)?;
            let (g, u) = (g64.narrow(last, 0, i)?, g64.narrow(last, i, i)?);
            let (ry, rdg, rdu) = swiglu_ref(
                &to_f64_vec(&g.contiguous()?)?,
                &to_f64_vec(&u.contiguous()?)?,
                &to_f64_vec(&dy)?,
            );
            let t = |v: Vec<f64>| Tensor::from_vec(v, out_shape.as_slice(), &Device::Cpu);
            fails.check(&f64_cpu(&y)?, &t(ry)?, tol(dtype), &format!("{what} y"))?;
            let want = Tensor::cat(&[t(rdg)?, t(rdu)?], last)?;
            let got = grad_of(&grads, v.as_tensor(), &what);
            fails.check(&f64_cpu(&got)?, &want, tol(dtype), &format!("{what} d(gu)"))?;
        }
    }
    fails.finish();
    Ok(())
}

device_test!(swiglu_packed_forward_backward);

#[test]
fn swiglu_packed_fd_gradient() -> Result<()> {
    let _g = shared_lock();
    let gu = randn(&[3, 10], DType::F64, &Device::Cpu, 21)?;
    let r = randn(&[3, 5], DType::F64, &Device::Cpu, 22)?;
    FdCheck::new(&Device::Cpu, "swiglu_packed vs finite differences")
        .check(&[("d(gu)", &gu)], |t| {
            weighted_loss(&flare::ops::swiglu_packed(&t[0])?, &r)
        })?;
    assert!(flare::ops::swiglu_packed(&gu.narrow(1, 0, 9)?).is_err());
    Ok(())
}

/// The fused q/k/v and gate/up projections give the logits of the separate ones: an adapter
/// with a zero `B` (so the same function) sends every group back to the separate path.
fn fused_projections_match_separate(dev: &Device) -> Result<()> {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let model = flare::models::Transformer::from_dir(&fixture, DType::F32, dev)?;
    let ids = Tensor::new(&[[3u32, 17, 42, 9, 100]], dev)?;
    let fused = model.forward(&ids)?;
    let mut separate = model.clone();
    let cfg = flare::lora::LoraConfig {
        r: 2,
        ..Default::default()
    };
    for (i, (_, lin)) in separate.lora_modules_mut().into_iter().enumerate() {
        lin.add_adapter("zero", &cfg, i as u64)?;
        lin.set_active(Some("zero"))?;
    }
    let sep = separate.forward(&ids)?;
    crate::common::assert_close(
        &f64_cpu(&sep)?,
        &f64_cpu(&fused)?,
        1e-5,
        "fused vs separate",
    )?;
    Ok(())
}

device_test!(fused_projections_match_separate);

/// f64 reference of `attention_decode`.
fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (q, k, v) = (f64_cpu(q)?, f64_cpu(k)?, f64_cpu(v)?);
    let s = q.matmul(&k.t()?)?;
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(p.matmul(&v)?)
}

/// The fused decode attention against the f64 reference: odd sizes, keys read from strided
/// views of a larger cache (batch stride > t * d, an offset), and the autograd fallback.
fn attention_decode_matches(dev: &Device) -> Result<()> {
    let mut fails = Failures::default();
    for dtype in dtypes(dev) {
        for &(b, g, t, d) in &[
            (1, 1, 1, 2),
            (2, 7, 1, 64),
            (1, 7, 7, 64),
            (3, 7, 33, 64),
            (2, 7, 600, 64),
            (2, 7, 4097, 64),
            (1, 2, 5, 66),
            (2, 3, 130, 128),
        ] {
            let what = format!("attention_decode b{b} g{g} t{t} d{d} {dtype:?}");
            let sd = seed(&what);
            let q = (randn(&[b, g, d], dtype, dev, sd)? * 0.3)?;
            // A cache of 2t + 3 positions, viewed from position 2 for t positions.
            let kc = randn(&[b, 2 * t + 3, d], dtype, dev, sd + 1)?;
            let vc = randn(&[b, 2 * t + 3, d], dtype, dev, sd + 2)?;
            let (k, v) = (kc.narrow(1, 2, t)?, vc.narrow(1, 2, t)?);
            let y = flare::ops::attention_decode(&q, &k, &v)?;
            // On CUDA with FLARE_ATTENTION_DECODE=0 (or off by default) the composite path
            // runs: it rounds the scores and the probabilities to the half dtype before the
            // second product (as transformers does), which costs about one more rounding step
            // (measured 1.08e-2 in bf16 at t = 600 on an H100). Either path must pass.
            let composite = dev.is_cuda() && dtype != DType::F32;
            let tl = if composite {
                2.0 * tol(dtype)
            } else {
                tol(dtype)
            };
            fails.check(&f64_cpu(&y)?, &attention_ref(&q, &k, &v)?, tl, &what)?;
        }
    }
    fails.finish();
    // With autograd the differentiable path runs, and gradients flow.
    let q = var(&randn(&[2, 3, 8], DType::F32, dev, 1)?)?;
    let k = randn(&[2, 5, 8], DType::F32, dev, 2)?;
    let v = randn(&[2, 5, 8], DType::F32, dev, 3)?;
    let y = flare::ops::attention_decode(q.as_tensor(), &k, &v)?;
    crate::common::assert_close(
        &f64_cpu(&y)?,
        &attention_ref(q.as_tensor(), &k, &v)?,
        1e-5,
        "tracked",
    )?;
    let g = y.sum_all()?.backward()?;
    assert!(g.get(q.as_tensor()).is_some());
    assert!(flare::ops::attention_decode(&k, &q.as_tensor().narrow(2, 0, 4)?, &v).is_err());
    Ok(())
}

device_test!(attention_decode_matches);
