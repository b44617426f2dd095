//! `flare::ops::rms_norm` and `flare::ops::add_rms_norm`: forward against a float64 composite,
//! backward against finite differences and the composite's autograd, non-contiguous views,
//! frozen operands, every output element written, and clear errors.
//!
//! Derivatives, per row of length `n`, with `r = 1/sqrt(mean(x²) + eps)`, `x̂ = x·r`,
//! `y = x̂ ⊙ w` and upstream `dy`:
//!   `dx = r · (dy⊙w − x̂ · mean(dy⊙w⊙x̂))`, `dw = Σ_rows dy ⊙ x̂`.
//! For `add_rms_norm`, `h = x + residual`, outputs `(rms_norm(h), h)` with upstream `(dy, dh)`:
//!   `dx = dresidual = rms_norm_bwd(h, dy) + dh`.

use candle_core::{DType, Device, Tensor, D};
use flare::ops::{add_rms_norm, rms_norm};
use flare::Error;

use crate::common::*;

const EPS: f32 = 1e-6;

/// The float64 reference from plain Candle ops; inputs must be f64 on the CPU (they may be
/// `Var`s).
fn rms_norm_f64(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    assert_eq!(x.dtype(), DType::F64);
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (ms + eps as f64)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(w)?)
}

/// Shapes with last dims 1, 7, 33, 1000, 4097, ranks 2 to 4.
const SHAPES: &[&[usize]] = &[
    &[4, 1],
    &[5, 7],
    &[3, 33],
    &[2, 1000],
    &[2, 4097],
    &[2, 3, 33],
    &[3, 1, 1000],
    &[2, 3, 4, 7],
    &[1, 2, 2, 4097],
];

fn forward(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in SHAPES {
            let what = format!("rms_norm {shape:?} {}", dt(dtype));
            let n = *shape.last().unwrap_or(&1);
            let x = randn_scaled(shape, 0.5, 2.0, dtype, dev, seed(&what))?;
            let w = randn_scaled(&[n], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
            for eps in [EPS, 1e-2] {
                let what = format!("{what} eps {eps}");
                let y = rms_norm(&x, &w, eps)?;
                assert_eq!(y.dtype(), dtype, "{what}: output dtype");
                assert!(y.device().same_device(dev), "{what}: output device");
                let reference = rms_norm_f64(&f64_cpu(&x)?, &f64_cpu(&w)?, eps)?;
                assert_close(&y, &reference, tol(dtype), &what)?;
                let flare_ref = flare::ops::rms_norm::rms_norm_reference(&x, &w, eps)?;
                assert_close(&flare_ref, &reference, tol(dtype), &format!("{what} (ref)"))?;
            }
        }
    }
    Ok(())
}

fn add_forward(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in SHAPES {
            let what = format!("add_rms_norm {shape:?} {}", dt(dtype));
            let n = *shape.last().unwrap_or(&1);
            let x = randn(shape, dtype, dev, seed(&what))?;
            let res = randn_scaled(shape, 0.3, 2.0, dtype, dev, seed(&format!("{what} res")))?;
            let w = randn_scaled(&[n], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
            let (y, h) = add_rms_norm(&x, &res, &w, EPS)?;
            assert_eq!((y.dtype(), h.dtype()), (dtype, dtype), "{what}: dtypes");
            let h_ref = (f64_cpu(&x)? + f64_cpu(&res)?)?;
            assert_close(&h, &h_ref, tol(dtype), &format!("{what} sum"))?;
            // The norm of the exact sum (the op may round the sum to the dtype first: that is
            // within the dtype's tolerance).
            let y_ref = rms_norm_f64(&h_ref, &f64_cpu(&w)?, EPS)?;
            assert_close(&y, &y_ref, tol(dtype), &format!("{what} normed"))?;
            let (fy, fh) = flare::ops::rms_norm::add_rms_norm_reference(&x, &res, &w, EPS)?;
            assert_close(&fy, &y_ref, tol(dtype), &format!("{what} (ref) normed"))?;
            assert_close(&fh, &h_ref, tol(dtype), &format!("{what} (ref) sum"))?;
        }
    }
    Ok(())
}

/// Non-contiguous `x`, `residual` and `weight` views give the reference's result.
fn non_contiguous(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let r = |shape: &[usize], name: &str| {
            randn(
                shape,
                dtype,
                dev,
                seed(&format!("rms views {name} {}", dt(dtype))),
            )
        };
        let xs: Vec<(&str, Tensor)> = vec![
            ("[33,7].t()", r(&[33, 7], "t")?.t()?),
            (
                "[4,7,5].transpose(1,2)",
                r(&[4, 7, 5], "t3")?.transpose(1, 2)?,
            ),
            (
                "[5,40].narrow(1,3,33)",
                r(&[5, 40], "nc")?.narrow(1, 3, 33)?,
            ),
            (
                "[2,4100].narrow(1,2,4097)",
                r(&[2, 4100], "nc2")?.narrow(1, 2, 4097)?,
            ),
            (
                "[10,33].narrow(0,2,5)",
                r(&[10, 33], "nr")?.narrow(0, 2, 5)?,
            ),
            (
                "[1,33] broadcast to [6,33]",
                r(&[1, 33], "b")?.broadcast_as((6, 33))?,
            ),
            (
                "[2,7,3,5].transpose(1,3)",
                r(&[2, 7, 3, 5], "t4")?.transpose(1, 3)?,
            ),
        ];
        for (name, x) in xs {
            let n = x.dim(D::Minus1)?;
            // The weight as a column of a matrix (strided) and as an offset slice.
            let wm = r(&[n, 3], &format!("{name} wm"))?;
            let w_strided = wm.narrow(1, 1, 1)?.squeeze(1)?;
            let w_offset = r(&[n + 4], &format!("{name} wo"))?.narrow(0, 3, n)?;
            for (wname, w) in [("strided weight", &w_strided), ("offset weight", &w_offset)] {
                let what = format!("rms_norm view {name}, {wname}, {}", dt(dtype));
                let y = rms_norm(&x, w, EPS)?;
                let reference = rms_norm_f64(&f64_cpu(&x)?, &f64_cpu(w)?, EPS)?;
                assert_close(&y, &reference, tol(dtype), &what)?;
                let yc = rms_norm(&x.contiguous()?, &w.contiguous()?, EPS)?;
                assert_close(&y, &yc, tol(dtype), &format!("{what} vs contiguous"))?;

                // add_rms_norm with a non-contiguous residual too (a transposed copy).
                let res = r(x.dims(), &format!("{name} res"))?;
                let res_t = res.t()?.contiguous()?.t()?;
                let (ya, ha) = add_rms_norm(&x, &res_t, w, EPS)?;
                let h_ref = (f64_cpu(&x)? + f64_cpu(&res)?)?;
                assert_close(&ha, &h_ref, tol(dtype), &format!("add {what} sum"))?;
                let y_ref = rms_norm_f64(&h_ref, &f64_cpu(w)?, EPS)?;
                assert_close(&ya, &y_ref, tol(dtype), &format!("add {what} normed"))?;
            }
        }
    }
    Ok(())
}

/// Analytic gradients of x and weight against central finite differences of the f64 CPU op. On
/// CUDA the gradients are computed in f32 on the device from the same (f32-exact) inputs.
fn grad_fd(dev: &Device) -> Result<()> {
    for shape in [&[3usize, 7][..], &[2, 3, 5], &[4, 1]] {
        let fd = FdCheck::new(dev, format!("rms_norm grad fd {shape:?}"));
        let n = *shape.last().unwrap_or(&1);
        let (x, w) = (fd.input(shape, "x")?, fd.input(&[n], "w")?);
        let r = fd.constant(&fd.input(shape, "r")?)?;
        let eps = 1e-3; // large enough that the [4,1] case is smooth at the FD step
        fd.check(&[("dx", &x), ("dw", &w)], |t| {
            weighted_loss(&rms_norm(&t[0], &t[1], eps)?, r.like(&t[0]))
        })?;
    }
    Ok(())
}

/// add_rms_norm's gradients of x, residual and weight, with a loss that uses both outputs,
/// against central finite differences of the f64 CPU op.
fn add_grad_fd(dev: &Device) -> Result<()> {
    for shape in [&[3usize, 7][..], &[2, 3, 5]] {
        let fd = FdCheck::new(dev, format!("add_rms_norm grad fd {shape:?}"));
        let n = *shape.last().unwrap_or(&1);
        let (x, res, w) = (
            fd.input(shape, "x")?,
            fd.input(shape, "res")?,
            fd.input(&[n], "w")?,
        );
        let (r1, r2) = (
            fd.constant(&fd.input(shape, "r1")?)?,
            fd.constant(&fd.input(shape, "r2")?)?,
        );
        fd.check(&[("dx", &x), ("dresidual", &res), ("dw", &w)], |t| {
            let (y, h) = add_rms_norm(&t[0], &t[1], &t[2], EPS)?;
            Ok((weighted_loss(&y, r1.like(&t[0]))? + weighted_loss(&h, r2.like(&t[0]))?)?)
        })?;
    }
    Ok(())
}

/// flare's gradients against the f64 composite's autograd gradients at every dtype.
fn grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in [
            &[4usize, 33][..],
            &[2, 3, 7],
            &[3, 1000],
            &[2, 4097],
            &[5, 1],
        ] {
            let what = format!("rms_norm grad {shape:?} {}", dt(dtype));
            let n = *shape.last().unwrap_or(&1);
            let x = randn_scaled(shape, 0.2, 1.5, dtype, dev, seed(&what))?;
            let w = randn_scaled(&[n], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
            let r = randn(shape, dtype, dev, seed(&format!("{what} r")))?;
            // With one column, dx = w·eps/(x² + eps)^(3/2) is the difference of two nearly
            // equal terms (dx ≈ 0 for eps ≪ x²), so any rounding in the op's dtype is a large
            // relative error of a tiny number: a larger eps makes the case well conditioned.
            let eps = if n == 1 { 0.1 } else { EPS };
            let (xv, wv) = (var(&x)?, var(&w)?);
            let loss = rms_norm(xv.as_tensor(), wv.as_tensor(), eps)?
                .mul(&r)?
                .sum_all()?;
            let grads = loss.backward()?;

            let (xr, wr) = (var(&f64_cpu(&x)?)?, var(&f64_cpu(&w)?)?);
            let loss_r = rms_norm_f64(xr.as_tensor(), wr.as_tensor(), eps)?
                .mul(&f64_cpu(&r)?)?
                .sum_all()?;
            let grads_r = loss_r.backward()?;
            for (name, t, tr) in [("dx", &xv, &xr), ("dw", &wv, &wr)] {
                let what = format!("{what} {name}");
                let g = grad_of(&grads, t.as_tensor(), &what);
                assert_eq!(g.dtype(), dtype, "{what}: gradient dtype");
                let gr = grad_of(&grads_r, tr.as_tensor(), &what);
                assert_close(&g, &gr, tol(dtype), &what)?;
            }
        }
    }
    Ok(())
}

/// add_rms_norm's gradients (loss on both outputs) against the f64 composite's, every dtype.
fn add_grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in [&[4usize, 33][..], &[2, 3, 7], &[3, 1000], &[2, 4097]] {
            let what = format!("add_rms_norm grad {shape:?} {}", dt(dtype));
            let n = *shape.last().unwrap_or(&1);
            let x = randn(shape, dtype, dev, seed(&format!("{what} x")))?;
            let res = randn(shape, dtype, dev, seed(&format!("{what} res")))?;
            let w = randn_scaled(&[n], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
            let r1 = randn(shape, dtype, dev, seed(&format!("{what} r1")))?;
            let r2 = randn(shape, dtype, dev, seed(&format!("{what} r2")))?;
            let (xv, resv, wv) = (var(&x)?, var(&res)?, var(&w)?);
            let (y, h) = add_rms_norm(xv.as_tensor(), resv.as_tensor(), wv.as_tensor(), EPS)?;
            let loss = (y.mul(&r1)?.sum_all()? + h.mul(&r2)?.sum_all()?)?;
            let grads = loss.backward()?;

            let (xr, resr, wr) = (
                var(&f64_cpu(&x)?)?,
                var(&f64_cpu(&res)?)?,
                var(&f64_cpu(&w)?)?,
            );
            let hr = (xr.as_tensor() + resr.as_tensor())?;
            let yr = rms_norm_f64(&hr, wr.as_tensor(), EPS)?;
            let loss_r =
                (yr.mul(&f64_cpu(&r1)?)?.sum_all()? + hr.mul(&f64_cpu(&r2)?)?.sum_all()?)?;
            let grads_r = loss_r.backward()?;
            for (name, t, tr) in [
                ("dx", &xv, &xr),
                ("dresidual", &resv, &resr),
                ("dw", &wv, &wr),
            ] {
                let what = format!("{what} {name}");
                let g = grad_of(&grads, t.as_tensor(), &what);
                let gr = grad_of(&grads_r, tr.as_tensor(), &what);
                assert_close(&g, &gr, tol(dtype), &what)?;
            }
        }
    }
    Ok(())
}

/// A frozen operand (a plain tensor, not a `Var`) gets no gradient entry; the others get the
/// right one.
fn frozen_operands(dev: &Device) -> Result<()> {
    // (1300, 4100): more rows than the CUDA backward's persistent grid holds, with rows of
    // several packs per thread. With the weight frozen, CUDA takes the block-per-row backward
    // (`rms_norm_bwd_rows`) on whole 16-byte packs: a row of fewer packs than its 32 threads
    // hold (5x64), a block not filled by its last packs (1300x4100 in f32: 1025 packs on 544
    // threads), the largest block (4x8192 in f32: 1024 threads) and, past it, the fallback
    // (3x16384 in f32).
    let dtypes = if dev.is_cpu() {
        vec![DType::F64]
    } else {
        vec![DType::F32, DType::BF16]
    };
    for dtype in dtypes {
        for (rows, cols) in [(3, 7), (5, 64), (1_300, 4_100), (4, 8_192), (3, 16_384)] {
            frozen_operands_of(dev, dtype, rows, cols)?;
        }
    }
    Ok(())
}

fn frozen_operands_of(dev: &Device, dtype: DType, rows: usize, cols: usize) -> Result<()> {
    let what = format!("rms_norm frozen {rows}x{cols} {dtype:?}");
    let what = what.as_str();
    let x = randn(&[rows, cols], dtype, dev, seed(&format!("{what} x")))?;
    let res = randn(&[rows, cols], dtype, dev, seed(&format!("{what} res")))?;
    let w = randn_scaled(&[cols], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
    let r = randn(&[rows, cols], dtype, dev, seed(&format!("{what} r")))?;
    let reference = |x: &Tensor, w: &Tensor| -> Result<(Tensor, Tensor)> {
        let (xr, wr) = (var(&f64_cpu(x)?)?, var(&f64_cpu(w)?)?);
        let l = rms_norm_f64(xr.as_tensor(), wr.as_tensor(), EPS)?
            .mul(&f64_cpu(&r)?)?
            .sum_all()?;
        let g = l.backward()?;
        Ok((
            grad_of(&g, xr.as_tensor(), "ref dx"),
            grad_of(&g, wr.as_tensor(), "ref dw"),
        ))
    };
    let (gx_ref, gw_ref) = reference(&x, &w)?;
    let bound = tol(dtype);

    // Trainable x, frozen weight.
    let xv = var(&x)?;
    let g = rms_norm(xv.as_tensor(), &w, EPS)?
        .mul(&r)?
        .sum_all()?
        .backward()?;
    assert!(g.get(&w).is_none(), "frozen weight got a gradient");
    assert_close(
        &grad_of(&g, xv.as_tensor(), what),
        &gx_ref,
        bound,
        "dx, w frozen",
    )?;

    // Frozen x, trainable weight.
    let wv = var(&w)?;
    let g = rms_norm(&x, wv.as_tensor(), EPS)?
        .mul(&r)?
        .sum_all()?
        .backward()?;
    assert!(g.get(&x).is_none(), "frozen x got a gradient");
    assert_close(
        &grad_of(&g, wv.as_tensor(), what),
        &gw_ref,
        bound,
        "dw, x frozen",
    )?;

    // add_rms_norm: frozen residual and weight, trainable x; then frozen x and weight.
    let h = (&x + &res)?;
    let (gh_ref, _) = reference(&h, &w)?;
    let xv = var(&x)?;
    let (y, _) = add_rms_norm(xv.as_tensor(), &res, &w, EPS)?;
    let g = y.mul(&r)?.sum_all()?.backward()?;
    assert!(g.get(&res).is_none(), "frozen residual got a gradient");
    assert!(g.get(&w).is_none(), "frozen weight got a gradient (add)");
    assert_close(&grad_of(&g, xv.as_tensor(), what), &gh_ref, bound, "add dx")?;
    let resv = var(&res)?;
    let (y, _) = add_rms_norm(&x, resv.as_tensor(), &w, EPS)?;
    let g = y.mul(&r)?.sum_all()?.backward()?;
    assert!(g.get(&x).is_none(), "frozen x got a gradient (add)");
    assert_close(
        &grad_of(&g, resv.as_tensor(), what),
        &gh_ref,
        bound,
        "add dres",
    )?;
    Ok(())
}

/// Every output element is written, forward and backward, for both ops. See [`poison`] for why
/// this is only meaningful on CUDA.
fn every_element_written(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in [&[64usize, 4097][..], &[300, 33], &[513, 1], &[2, 3, 1000]] {
            let what = format!("rms_norm poisoned {shape:?} {}", dt(dtype));
            let n: usize = shape.iter().product();
            let cols = *shape.last().unwrap_or(&1);
            let x = randn(shape, dtype, dev, seed(&what))?;
            let res = randn(shape, dtype, dev, seed(&format!("{what} res")))?;
            let w = randn_scaled(&[cols], 1.0, 0.5, dtype, dev, seed(&format!("{what} w")))?;
            let r = randn(shape, dtype, dev, seed(&format!("{what} r")))?;
            let (xv, resv, wv) = (var(&x)?, var(&res)?, var(&w)?);
            let sizes = [n, n + cols, 2 * n, n, cols];

            poison(dev, dtype, &sizes)?;
            let y = rms_norm(xv.as_tensor(), wv.as_tensor(), EPS)?;
            assert_no_nan(&y, &what)?;
            poison(dev, dtype, &sizes)?;
            let g = y.mul(&r)?.sum_all()?.backward()?;
            assert_no_nan(&grad_of(&g, xv.as_tensor(), &what), &format!("{what} dx"))?;
            assert_no_nan(&grad_of(&g, wv.as_tensor(), &what), &format!("{what} dw"))?;

            poison(dev, dtype, &sizes)?;
            let (y, h) = add_rms_norm(xv.as_tensor(), resv.as_tensor(), wv.as_tensor(), EPS)?;
            assert_no_nan(&y, &format!("{what} add normed"))?;
            assert_no_nan(&h, &format!("{what} add sum"))?;
            poison(dev, dtype, &sizes)?;
            let g = (y.mul(&r)?.sum_all()? + h.mul(&r)?.sum_all()?)?.backward()?;
            for (name, t) in [("dx", &xv), ("dres", &resv), ("dw", &wv)] {
                let gt = grad_of(&g, t.as_tensor(), &what);
                assert_no_nan(&gt, &format!("{what} add {name}"))?;
            }
        }
    }
    Ok(())
}

/// Zero-size inputs give zero-size outputs.
fn empty(dev: &Device) -> Result<()> {
    for shape in [&[0usize, 5][..], &[2, 0, 7]] {
        let x = Tensor::zeros(shape, DType::F32, dev)?;
        let w = Tensor::ones(shape[shape.len() - 1], DType::F32, dev)?;
        assert_eq!(
            rms_norm(&x, &w, EPS)?.dims(),
            shape,
            "rms_norm of {shape:?}"
        );
        let (y, h) = add_rms_norm(&x, &x, &w, EPS)?;
        assert_eq!(
            (y.dims(), h.dims()),
            (shape, shape),
            "add_rms_norm of {shape:?}"
        );
    }
    Ok(())
}

fn assert_names_op(e: &Error, op: &str) {
    assert!(e.to_string().contains(op), "error `{e}` does not name {op}");
}

/// Bad input returns the right error variant, naming the op; never a panic.
fn errors(dev: &Device) -> Result<()> {
    let x = randn(&[3, 7], DType::F32, dev, 1)?;
    let w = Tensor::ones(7, DType::F32, dev)?;
    let res = randn(&[3, 7], DType::F32, dev, 2)?;

    // Weight length != last dim; a 2-D weight.
    let w6 = Tensor::ones(6, DType::F32, dev)?;
    let e = rms_norm(&x, &w6, EPS).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "weight len: {e:?}"
    );
    assert_names_op(&e, "rms_norm");
    let e = add_rms_norm(&x, &res, &w6, EPS).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "add weight len: {e:?}"
    );
    assert_names_op(&e, "add_rms_norm");
    let e = rms_norm(&x, &w.reshape((1, 7))?, EPS).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }),
        "2-D weight: {e:?}"
    );

    // Residual shape != x shape (same element count, and a broadcastable one).
    for rshape in [&[7usize, 3][..], &[1, 7], &[2, 3, 7]] {
        let r = Tensor::zeros(rshape, DType::F32, dev)?;
        let e = add_rms_norm(&x, &r, &w, EPS).unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { .. }),
            "residual {rshape:?}: {e:?}"
        );
        assert_names_op(&e, "add_rms_norm");
    }

    // Dtype mismatches.
    let e = rms_norm(&x, &w.to_dtype(DType::F16)?, EPS).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "x f32, w f16: {e:?}"
    );
    assert_names_op(&e, "rms_norm");
    let e = add_rms_norm(&x, &res.to_dtype(DType::BF16)?, &w, EPS).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "residual bf16: {e:?}"
    );
    assert_names_op(&e, "add_rms_norm");
    let e = add_rms_norm(&x, &res, &w.to_dtype(DType::BF16)?, EPS).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "add w bf16: {e:?}"
    );

    // Unsupported dtypes.
    for dtype in [DType::U32, DType::I64, DType::U8] {
        let (xi, wi) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?);
        let e = rms_norm(&xi, &wi, EPS).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedDType { dtype: d, .. } if d == dtype),
            "{dtype:?}: {e:?}"
        );
        assert_names_op(&e, "rms_norm");
        let e = add_rms_norm(&xi, &xi, &wi, EPS).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedDType { .. }),
            "add {dtype:?}: {e:?}"
        );
    }
    if !dev.is_cpu() {
        let (xd, wd) = (x.to_dtype(DType::F64)?, w.to_dtype(DType::F64)?);
        let e = rms_norm(&xd, &wd, EPS).unwrap_err();
        assert!(
            matches!(
                e,
                Error::UnsupportedDType {
                    dtype: DType::F64,
                    ..
                }
            ),
            "f64 on {dev:?}: {e:?}"
        );
        // Device mismatch.
        let e = rms_norm(&x, &w.to_device(&Device::Cpu)?, EPS).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "devices: {e:?}");
        let e = add_rms_norm(&x, &res.to_device(&Device::Cpu)?, &w, EPS).unwrap_err();
        assert!(
            matches!(e, Error::DeviceMismatch { .. }),
            "add devices: {e:?}"
        );
    }

    // Bad eps.
    for eps in [-1e-6f32, f32::NAN] {
        let e = rms_norm(&x, &w, eps).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }),
            "eps {eps}: {e:?}"
        );
        assert_names_op(&e, "rms_norm");
        let e = add_rms_norm(&x, &res, &w, eps).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }),
            "add eps {eps}: {e:?}"
        );
        assert_names_op(&e, "add_rms_norm");
    }
    // eps = 0 is valid.
    rms_norm(&x, &w, 0.0)?;

    // Rank 0.
    let s = Tensor::new(1f32, dev)?;
    let e = rms_norm(&s, &Tensor::ones(1, DType::F32, dev)?, EPS).unwrap_err();
    assert!(matches!(e, Error::Rank { .. }), "rank 0: {e:?}");
    assert_names_op(&e, "rms_norm");
    Ok(())
}

device_test!(
    forward,
    add_forward,
    non_contiguous,
    grad_fd,
    add_grad_fd,
    grad_vs_reference,
    add_grad_vs_reference,
    frozen_operands,
    empty,
    errors
);
device_test!(exclusive: every_element_written);
