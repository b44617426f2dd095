//! `flare::ops::softmax_masked`: forward against a float64 loop reference (mask then softmax,
//! rows with nothing kept all zero), the mask broadcast over batch and heads, non-contiguous
//! scores, gradients by finite differences and against the composite's autograd, CUDA against
//! CPU, and clear errors.
//!
//! With `y = softmax` over the kept positions and upstream gradient `dy`:
//!   `dx_i = y_i (dy_i − Σ_j y_j dy_j)`, 0 at masked positions (`y_i = 0` there).

use candle_core::{DType, Device, Tensor};
use flare::ops::softmax::softmax_masked_reference;
use flare::ops::softmax_masked;
use flare::Error;

use crate::common::*;

/// A u8 keep mask `[mb, s, t]` mixing the model's patterns: causal with an offset (a query at
/// position `i` of `s` sees keys `0..=t - s + i`), left padding, a sliding window, random bits,
/// and (when `s > 1`) one fully masked row per batch item.
fn mask(mb: usize, s: usize, t: usize, seed_: u64) -> Vec<u8> {
    let bits = normals(mb * s * t, seed_);
    let mut m = vec![0u8; mb * s * t];
    for b in 0..mb {
        let pad = (b * 3) % t.max(1);
        for i in 0..s {
            let last = (t - s.min(t)) + i.min(t - 1);
            for j in 0..t {
                let idx = (b * s + i) * t + j;
                let keep = match (b + i) % 4 {
                    0 => j <= last,
                    1 => j <= last && j >= pad.min(last),
                    2 => j <= last && last - j < 5,
                    _ => bits[idx] > -0.3,
                };
                m[idx] = keep as u8;
            }
            if s > 1 && i == s - 1 && b % 2 == 0 {
                for j in 0..t {
                    m[(b * s + i) * t + j] = 0;
                }
            }
        }
    }
    m
}

/// The float64 reference: softmax over each row's kept positions, 0 elsewhere, zeros for rows
/// with nothing kept. `x` is `[mb, n, s, t]` flattened; the mask is `[mb, s, t]`.
fn reference(x: &[f64], keep: &[u8], dims: &[usize], mb: usize, s: usize) -> Vec<f64> {
    let t = dims[dims.len() - 1];
    let rows = x.len() / t;
    let per_item = rows / mb;
    let mut y = vec![0.0; x.len()];
    for row in 0..rows {
        let mrow = (row / per_item) * s + row % s;
        let xr = &x[row * t..(row + 1) * t];
        let kr = &keep[mrow * t..(mrow + 1) * t];
        let max = xr
            .iter()
            .zip(kr)
            .filter(|(_, &k)| k != 0)
            .map(|(&v, _)| v)
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let sum: f64 = xr
            .iter()
            .zip(kr)
            .filter(|(_, &k)| k != 0)
            .map(|(&v, _)| (v - max).exp())
            .sum();
        for j in 0..t {
            if kr[j] != 0 {
                y[row * t + j] = (xr[j] - max).exp() / sum;
            }
        }
    }
    y
}

/// (scores shape, mask batch, mask rows s): t = 1, 7, 33, 64, 1024, 4097 and 40000 (the f32
/// streaming path); one, two or no head dims; the mask per batch item or shared; GQA-shaped
/// `[b · kv, group · s, t]` scores (`[2 · 2, 3 · 4, 33]`, `[2 · 2, 7 · 5, 1024]`).
const CASES: &[(&[usize], usize, usize)] = &[
    (&[2, 3, 5, 1], 2, 5),
    (&[1, 2, 7, 7], 1, 7),
    (&[2, 2, 3, 4, 33], 2, 4),
    (&[4, 12, 33], 2, 4),
    (&[3, 9, 64], 3, 9),
    (&[2, 3, 6, 64], 1, 6),
    (&[2, 2, 5, 1024], 2, 5),
    (&[4, 35, 1024], 2, 5),
    (&[2, 1, 3, 4097], 2, 3),
    (&[1, 1, 2, 40000], 1, 2),
];

fn keep_tensor(
    dims: &[usize],
    mb: usize,
    s: usize,
    dev: &Device,
    what: &str,
) -> Result<(Vec<u8>, Tensor)> {
    let t = dims[dims.len() - 1];
    let m = mask(mb, s, t, seed(&format!("{what} mask")));
    let k = Tensor::from_vec(m.clone(), (mb, s, t), dev)?;
    Ok((m, k))
}

fn forward(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for &(dims, mb, s) in CASES {
            let what = format!("softmax_masked {dims:?} mb={mb} s={s} {}", dt(dtype));
            let x = randn_scaled(dims, 0.0, 3.0, dtype, dev, seed(&what))?;
            let (m, keep) = keep_tensor(dims, mb, s, dev, &what)?;
            let y = softmax_masked(&x, &keep)?;
            assert_eq!(y.dtype(), dtype, "{what}: output dtype");
            assert_eq!(y.dims(), dims, "{what}: output shape");
            let xv = to_f64_vec(&x)?;
            let want = reference(&xv, &m, dims, mb, s);
            let got = to_f64_vec(&y)?;
            // Masked positions and rows with nothing kept are exactly 0.
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if w == 0.0 {
                    assert_eq!(g, 0.0, "{what}: element {i} should be exactly 0");
                }
                assert!(g.is_finite(), "{what}: element {i} is {g}");
            }
            let rt = Tensor::from_vec(want, dims, &Device::Cpu)?;
            assert_close(&y, &rt, tol(dtype), &what)?;
            let comp = softmax_masked_reference(&x, &keep)?;
            assert_close(&comp, &rt, tol(dtype), &format!("{what} (composite)"))?;
        }
    }
    Ok(())
}

/// A mask shared by the batch (mb = 1) gives what the same mask repeated per item gives, and
/// non-contiguous scores give what their contiguous copies give.
fn broadcast_and_views(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let what = format!("softmax_masked views {}", dt(dtype));
        let x = randn_scaled(&[3, 2, 5, 7], 0.0, 2.0, dtype, dev, seed(&what))?;
        let (_, k1) = keep_tensor(&[3, 2, 5, 7], 1, 5, dev, &what)?;
        let k3 = Tensor::cat(&[&k1, &k1, &k1], 0)?;
        let a = softmax_masked(&x, &k1)?;
        let b = softmax_masked(&x, &k3)?;
        assert_eq!(to_f64_vec(&a)?, to_f64_vec(&b)?, "{what}: mb=1 vs repeated");

        // [2, 5, 3, 7] transposed to [2, 3, 5, 7]: non-contiguous scores.
        let raw = randn_scaled(
            &[2, 5, 3, 7],
            0.0,
            2.0,
            dtype,
            dev,
            seed(&format!("{what} t")),
        )?;
        let xt = raw.transpose(1, 2)?;
        assert!(!xt.is_contiguous());
        let (_, k) = keep_tensor(&[2, 3, 5, 7], 2, 5, dev, &format!("{what} t"))?;
        let a = softmax_masked(&xt, &k)?;
        let b = softmax_masked(&xt.contiguous()?, &k)?;
        assert_eq!(to_f64_vec(&a)?, to_f64_vec(&b)?, "{what}: view vs copy");
        // A non-contiguous mask (a narrowed wider one) as well.
        let wide = Tensor::cat(&[&k, &k], 2)?.narrow(2, 7, 7)?;
        let c = softmax_masked(&xt, &wide)?;
        assert_eq!(to_f64_vec(&a)?, to_f64_vec(&c)?, "{what}: narrowed mask");
    }
    Ok(())
}

/// The analytic gradient against central finite differences of the f64 CPU op. On CUDA the
/// gradient is computed in f32 on the device from the same (f32-exact) inputs.
fn grad_fd(dev: &Device) -> Result<()> {
    for (dims, mb, s) in [
        (&[2usize, 2, 3, 5][..], 2usize, 3usize),
        (&[1, 3, 4, 1], 1, 4),
        (&[2, 4, 7], 1, 4),
        (&[4, 6, 5], 2, 3),
    ] {
        let fd = FdCheck::new(dev, format!("softmax_masked grad fd {dims:?}"));
        let x = fd.input(dims, "")?;
        let r = fd.constant(&fd.input(dims, "r")?)?;
        let (_, kc) = keep_tensor(dims, mb, s, &Device::Cpu, fd.what())?;
        let keep = fd.constant(&kc)?;
        fd.check(&[("dx", &x)], |t| {
            weighted_loss(&softmax_masked(&t[0], keep.like(&t[0]))?, r.like(&t[0]))
        })?;
    }
    Ok(())
}

/// flare's gradient against the composite reference's autograd in f64, at every dtype.
fn grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for (dims, mb, s) in [
            (&[2usize, 3, 4, 33][..], 2usize, 4usize),
            (&[1, 2, 3, 1024], 1, 3),
            (&[4, 10, 64], 2, 5),
        ] {
            let what = format!("softmax_masked grad {dims:?} {}", dt(dtype));
            let x = randn_scaled(dims, 0.0, 2.0, dtype, dev, seed(&what))?;
            let (_, k) = keep_tensor(dims, mb, s, dev, &what)?;
            let r = randn(dims, dtype, dev, seed(&format!("{what} r")))?;
            let xv = var(&x)?;
            let loss = softmax_masked(xv.as_tensor(), &k)?.mul(&r)?.sum_all()?;
            let g = grad_of(&loss.backward()?, xv.as_tensor(), &what);
            assert_eq!(g.dtype(), dtype, "{what}: gradient dtype");
            let xr = var(&f64_cpu(&x)?)?;
            let kc = k.to_device(&Device::Cpu)?;
            let loss_r = softmax_masked_reference(xr.as_tensor(), &kc)?
                .mul(&f64_cpu(&r)?)?
                .sum_all()?;
            let gr = grad_of(&loss_r.backward()?, xr.as_tensor(), &what);
            assert_close(&g, &gr, tol(dtype), &what)?;
        }
    }
    Ok(())
}

/// The op on `dev` against the same op on the CPU at the same dtype (on the CPU: trivially).
fn device_vs_cpu(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for &(dims, mb, s) in CASES {
            let what = format!("softmax_masked dev/cpu {dims:?} {}", dt(dtype));
            let x = randn_scaled(dims, 0.0, 3.0, dtype, dev, seed(&what))?;
            let (_, k) = keep_tensor(dims, mb, s, dev, &what)?;
            let y = softmax_masked(&x, &k)?;
            let yc = softmax_masked(&x.to_device(&Device::Cpu)?, &k.to_device(&Device::Cpu)?)?;
            assert_close(&y, &f64_cpu(&yc)?, tol(dtype), &what)?;
        }
    }
    Ok(())
}

fn assert_names_op(e: &Error, op: &str) {
    assert!(e.to_string().contains(op), "error {e} should name {op}");
}

fn errors(dev: &Device) -> Result<()> {
    let x = randn(&[2, 3, 4, 5], DType::F32, dev, 1)?;
    let k = Tensor::ones((2, 4, 5), DType::U8, dev)?;
    assert!(softmax_masked(&x, &k).is_ok());
    for (bad, name) in [
        (Tensor::ones((5, 4, 5), DType::U8, dev)?, "mask batch"),
        (Tensor::ones((2, 5, 5), DType::U8, dev)?, "mask rows"),
        (Tensor::ones((2, 4, 6), DType::U8, dev)?, "mask cols"),
        (Tensor::ones((2, 1, 4, 5), DType::U8, dev)?, "mask rank"),
    ] {
        match softmax_masked(&x, &bad) {
            Err(e @ Error::ShapeMismatch { .. }) => assert_names_op(&e, "softmax_masked"),
            other => panic!("{name}: expected a shape error, got {other:?}"),
        }
    }
    match softmax_masked(&x, &k.to_dtype(DType::F32)?) {
        Err(e @ Error::DTypeMismatch { .. }) => assert_names_op(&e, "softmax_masked"),
        other => panic!("f32 mask: expected a dtype error, got {other:?}"),
    }
    match softmax_masked(&randn(&[5], DType::F32, dev, 2)?, &k) {
        Err(e @ Error::Rank { .. }) => assert_names_op(&e, "softmax_masked"),
        other => panic!("rank 1 scores: expected a rank error, got {other:?}"),
    }
    // Rank 2 scores [rows, t] are fine: one mask row group per mask batch item.
    let k1 = Tensor::ones((1, 4, 5), DType::U8, dev)?;
    assert!(softmax_masked(&randn(&[8, 5], DType::F32, dev, 3)?, &k1).is_ok());
    Ok(())
}

device_test!(
    forward,
    broadcast_and_views,
    grad_fd,
    grad_vs_reference,
    device_vs_cpu,
    errors
);
