//! `flare::ops::matmul`: forward against a float64 triple loop, transposed and other
//! non-contiguous operands, batched and broadcast batch dims, empty dims, TF32 on CUDA,
//! backward against finite differences and Candle's autograd, frozen operands, every output
//! element written, and clear errors.
//!
//! Derivatives, with `c = a @ b` and upstream `dc`: `da = dc @ bᵀ`, `db = aᵀ @ dc`, each summed
//! over the batch dims its operand was broadcast along.

use candle_core::{DType, Device, Tensor};
use flare::ops::matmul;
use flare::Error;

use crate::common::*;

/// Broadcast batch dims of `[..., m, k] @ [..., k, n]` (the shapes are assumed valid).
fn batch_dims(ad: &[usize], bd: &[usize]) -> Vec<usize> {
    let (ab, bb) = (&ad[..ad.len() - 2], &bd[..bd.len() - 2]);
    let rank = ab.len().max(bb.len());
    (0..rank)
        .map(|i| {
            let x = if i + ab.len() >= rank {
                ab[i + ab.len() - rank]
            } else {
                1
            };
            let y = if i + bb.len() >= rank {
                bb[i + bb.len() - rank]
            } else {
                1
            };
            if x == 1 {
                y
            } else {
                x
            }
        })
        .collect()
}

/// The float64 reference: a plain triple loop on the CPU over the broadcast operands (no
/// GEMM library involved).
fn matmul_f64(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (f64_cpu(a)?, f64_cpu(b)?);
    let (ad, bd) = (a.dims().to_vec(), b.dims().to_vec());
    let (m, k, n) = (ad[ad.len() - 2], ad[ad.len() - 1], bd[bd.len() - 1]);
    assert_eq!(bd[bd.len() - 2], k, "matmul_f64: inner dims");
    let batch = batch_dims(&ad, &bd);
    let nb: usize = batch.iter().product();
    let mut af = batch.clone();
    af.extend([m, k]);
    let mut bf = batch.clone();
    bf.extend([k, n]);
    let av = a
        .broadcast_as(af)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let bv = b
        .broadcast_as(bf)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut out = vec![0.0; nb * m * n];
    for p in 0..nb {
        for i in 0..m {
            for l in 0..k {
                let x = av[p * m * k + i * k + l];
                let brow = &bv[p * k * n + l * n..p * k * n + (l + 1) * n];
                let orow = &mut out[p * m * n + i * n..p * m * n + (i + 1) * n];
                for (o, &y) in orow.iter_mut().zip(brow) {
                    *o += x * y;
                }
            }
        }
    }
    let mut od = batch;
    od.extend([m, n]);
    Ok(Tensor::from_vec(out, od, &Device::Cpu)?)
}

/// Runs flare's matmul on `(a, b)`, checks dtype, device and shape, and compares against the
/// float64 reference within `bound`.
fn check_forward(a: &Tensor, b: &Tensor, bound: f64, what: &str) -> Result<Tensor> {
    let c = matmul(a, b)?;
    assert_eq!(c.dtype(), a.dtype(), "{what}: output dtype");
    assert!(c.device().same_device(a.device()), "{what}: output device");
    assert_close(&c, &matmul_f64(a, b)?, bound, what)?;
    Ok(c)
}

/// Shapes of `a` and `b`: square, odd (last dims 1, 7, 33, 1000, 4097), batched, broadcast.
const CASES: &[(&[usize], &[usize])] = &[
    (&[64, 64], &[64, 64]),
    (&[1, 1], &[1, 1]),
    (&[7, 33], &[33, 1]),
    (&[33, 7], &[7, 4097]),
    (&[1000, 33], &[33, 7]),
    (&[3, 1000], &[1000, 5]),
    (&[3, 5, 7], &[3, 7, 9]),
    (&[2, 3, 5, 7], &[7, 9]),
    (&[5, 7], &[4, 7, 9]),
    (&[4, 1, 5, 7], &[3, 7, 9]),
    (&[2, 3, 5, 7], &[2, 3, 7, 9]),
    (&[1, 5, 7], &[3, 7, 9]),
    (&[2, 1, 5, 7], &[1, 3, 7, 9]),
    (&[4, 1, 33], &[4, 33, 1]),
];

fn forward(dev: &Device) -> Result<()> {
    let mut failures = Failures::default();
    for &dtype in &dtypes(dev) {
        for (ash, bsh) in CASES {
            let what = format!("matmul {ash:?} @ {bsh:?} {}", dt(dtype));
            let a = randn(ash, dtype, dev, seed(&format!("{what} a")))?;
            let b = randn(bsh, dtype, dev, seed(&format!("{what} b")))?;
            let reference = matmul_f64(&a, &b)?;
            let c = matmul(&a, &b)?;
            assert_eq!(c.dtype(), dtype, "{what}: output dtype");
            assert!(c.device().same_device(dev), "{what}: output device");
            failures.check(&c, &reference, tol(dtype), &what)?;
            let r = flare::ops::matmul::matmul_reference(&a, &b)?;
            failures.check(&r, &reference, tol(dtype), &format!("{what} (ref)"))?;
        }
    }
    failures.finish();
    Ok(())
}

/// Transposed operands (`a.t()`, `b.t()`), narrowed and broadcast views, and permuted batch
/// dims give the reference's result and the result of their contiguous copies.
fn non_contiguous(dev: &Device) -> Result<()> {
    let mut failures = Failures::default();
    for &dtype in &dtypes(dev) {
        let r = |shape: &[usize], name: &str| {
            randn(
                shape,
                dtype,
                dev,
                seed(&format!("matmul views {name} {}", dt(dtype))),
            )
        };
        let mut cases: Vec<(String, Tensor, Tensor)> = Vec::new();
        for &(m, k, n) in &[
            (64usize, 64usize, 64usize),
            (33, 7, 40),
            (5, 1000, 3),
            (7, 1, 9),
        ] {
            let s = format!("{m}x{k}x{n}");
            let at = r(&[k, m], &format!("{s} at"))?.t()?;
            let bt = r(&[n, k], &format!("{s} bt"))?.t()?;
            let a = r(&[m, k], &format!("{s} a"))?;
            let b = r(&[k, n], &format!("{s} b"))?;
            cases.push((format!("a.t() @ b, {s}"), at.clone(), b.clone()));
            cases.push((format!("a @ b.t(), {s}"), a.clone(), bt.clone()));
            cases.push((format!("a.t() @ b.t(), {s}"), at, bt));
        }
        cases.extend([
            (
                "[3,7,5].transpose(1,2) @ [3,9,7].transpose(1,2)".to_string(),
                r(&[3, 7, 5], "bt a")?.transpose(1, 2)?,
                r(&[3, 9, 7], "bt b")?.transpose(1, 2)?,
            ),
            (
                "[2,3,7,5].transpose(2,3) @ [7,9]".to_string(),
                r(&[2, 3, 7, 5], "b4t a")?.transpose(2, 3)?,
                r(&[7, 9], "b4t b")?,
            ),
            (
                "[3,7,5].transpose(1,2) @ [7,9]".to_string(),
                r(&[3, 7, 5], "b3t a")?.transpose(1, 2)?,
                r(&[7, 9], "b3t b")?,
            ),
            (
                "[3,7,5].transpose(1,2) @ [1,7,9]".to_string(),
                r(&[3, 7, 5], "b31t a")?.transpose(1, 2)?,
                r(&[1, 7, 9], "b31t b")?,
            ),
            (
                "[5,12].narrow(1,2,7) @ [10,9].narrow(0,1,7)".to_string(),
                r(&[5, 12], "nk a")?.narrow(1, 2, 7)?,
                r(&[10, 9], "nk b")?.narrow(0, 1, 7)?,
            ),
            (
                "[12,7].narrow(0,3,5) @ [7,13].narrow(1,2,9)".to_string(),
                r(&[12, 7], "nr a")?.narrow(0, 3, 5)?,
                r(&[7, 13], "nr b")?.narrow(1, 2, 9)?,
            ),
            (
                "[3,5,7] @ [1,7,9] broadcast_as [3,7,9]".to_string(),
                r(&[3, 5, 7], "bc a")?,
                r(&[1, 7, 9], "bc b")?.broadcast_as((3, 7, 9))?,
            ),
            (
                "[5,7] broadcast_as [3,5,7] @ [3,7,9]".to_string(),
                r(&[5, 7], "bca a")?.broadcast_as((3, 5, 7))?,
                r(&[3, 7, 9], "bca b")?,
            ),
            (
                "[5,3,7].transpose(0,1) @ [3,7,9] (permuted batch)".to_string(),
                r(&[5, 3, 7], "pb a")?.transpose(0, 1)?,
                r(&[3, 7, 9], "pb b")?,
            ),
            (
                "[3,2,5,7].transpose(0,1) @ [2,3,7,9] (permuted batch, rank 4)".to_string(),
                r(&[3, 2, 5, 7], "pb4 a")?.transpose(0, 1)?,
                r(&[2, 3, 7, 9], "pb4 b")?,
            ),
            (
                "[2,5,20].narrow(2,4,7) @ [3,7,9].narrow(0,1,2) (offset batch views)".to_string(),
                r(&[2, 5, 20], "nb a")?.narrow(2, 4, 7)?,
                r(&[3, 7, 9], "nb b")?.narrow(0, 1, 2)?,
            ),
        ]);
        for (name, a, b) in cases {
            let what = format!("matmul {name} {}", dt(dtype));
            let c = matmul(&a, &b)?;
            assert_eq!(c.dtype(), dtype, "{what}: output dtype");
            failures.check(&c, &matmul_f64(&a, &b)?, tol(dtype), &what)?;
            let cc = matmul(&a.contiguous()?, &b.contiguous()?)?;
            failures.check(&c, &cc, tol(dtype), &format!("{what} vs contiguous"))?;
        }
    }
    failures.finish();
    Ok(())
}

/// Empty dims: `k = 0` gives zeros (every element written, even though nothing is summed);
/// `m = 0` or `n = 0` give empty outputs.
fn empty(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for (ash, bsh) in [
            (&[3usize, 0][..], &[0usize, 4][..]),
            (&[2, 3, 0], &[2, 0, 4]),
            (&[2, 3, 0], &[0, 4]),
            (&[0, 5], &[5, 4]),
            (&[3, 5], &[5, 0]),
            (&[0, 3, 5], &[5, 4]),
        ] {
            let what = format!("matmul {ash:?} @ {bsh:?} {}", dt(dtype));
            let a = Tensor::zeros(ash, dtype, dev)?;
            let b = Tensor::zeros(bsh, dtype, dev)?;
            let n_out = ash[..ash.len() - 1].iter().product::<usize>() * bsh[bsh.len() - 1];
            poison(dev, dtype, &[n_out.max(1), 4 * n_out.max(1)])?;
            let c = matmul(&a, &b)?;
            let reference = matmul_f64(&a, &b)?;
            assert_eq!(c.dims(), reference.dims(), "{what}: shape");
            let v = to_f64_vec(&c)?;
            assert!(
                v.iter().all(|&x| x == 0.0),
                "{what}: expected zeros, got {v:?}"
            );
        }
    }
    Ok(())
}

/// f32 with TF32 allowed stays within 5e-3 on CUDA and is bit-identical on the CPU (where the
/// switch has no effect); switching it off again restores full f32 accuracy (a plan cached
/// with TF32 must not be reused without it).
fn tf32(dev: &Device) -> Result<()> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            flare::runtime::set_allow_tf32(false);
        }
    }
    let _reset = Reset;
    for (ash, bsh) in [
        (&[64usize, 64][..], &[64usize, 64][..]),
        (&[256, 512], &[512, 128]),
        (&[3, 33, 100], &[100, 7]),
    ] {
        let what = format!("matmul f32 {ash:?} @ {bsh:?}");
        let a = randn(ash, DType::F32, dev, seed(&format!("{what} a")))?;
        let b = randn(bsh, DType::F32, dev, seed(&format!("{what} b")))?;
        flare::runtime::set_allow_tf32(false);
        let c0 = check_forward(&a, &b, 1e-5, &format!("{what}, tf32 off"))?;
        flare::runtime::set_allow_tf32(true);
        let c1 = check_forward(&a, &b, 5e-3, &format!("{what}, tf32 on"))?;
        if dev.is_cpu() {
            assert_eq!(
                to_f64_vec(&c0)?,
                to_f64_vec(&c1)?,
                "{what}: TF32 changed a CPU result"
            );
        } else {
            println!(
                "{what}: TF32 on vs off, relative difference {:.3e}",
                rel_err(&c1, &c0)?
            );
        }
        flare::runtime::set_allow_tf32(false);
        check_forward(&a, &b, 1e-5, &format!("{what}, tf32 off again"))?;
    }
    Ok(())
}

/// Analytic gradients of both operands against central finite differences of the f64 CPU op.
/// On CUDA they are computed in f32 on the device from the same (f32-exact) inputs.
fn grad_fd(dev: &Device) -> Result<()> {
    // (a shape, b shape, transpose a, transpose b); transposed operands are stored [k, m]/[n, k].
    for (ash, bsh, ta, tb) in [
        (&[3usize, 7][..], &[7usize, 5][..], false, false),
        (&[2, 3, 4], &[2, 4, 5], false, false),
        (&[2, 3, 4], &[4, 5], false, false),
        (&[3, 4], &[2, 4, 5], false, false),
        (&[2, 1, 3, 4], &[3, 4, 2], false, false),
        (&[7, 3], &[7, 5], true, false),
        (&[3, 7], &[5, 7], false, true),
        (&[2, 4, 3], &[2, 5, 4], true, true),
    ] {
        let fd = FdCheck::new(
            dev,
            format!("matmul grad fd {ash:?}{} @ {bsh:?}{}", t(ta), t(tb)),
        );
        let (a, b) = (fd.input(ash, "a")?, fd.input(bsh, "b")?);
        let view = |x: &Tensor, tr: bool| -> Result<Tensor> {
            Ok(if tr {
                x.transpose(x.rank() - 2, x.rank() - 1)?
            } else {
                x.clone()
            })
        };
        let out_dims = matmul_f64(&view(&a, ta)?, &view(&b, tb)?)?.dims().to_vec();
        let r = fd.constant(&fd.input(&out_dims, "r")?)?;
        fd.check(&[("da", &a), ("db", &b)], |t| {
            let c = matmul(&view(&t[0], ta)?, &view(&t[1], tb)?)?;
            weighted_loss(&c, r.like(&t[0]))
        })?;
    }
    Ok(())
}

fn t(transposed: bool) -> &'static str {
    if transposed {
        ".t()"
    } else {
        ""
    }
}

/// flare's gradients against the gradients of Candle's `broadcast_matmul` in f64 (autograd),
/// at every dtype, including broadcast and transposed operands.
fn grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for (ash, bsh, ta, tb) in [
            (&[64usize, 64][..], &[64usize, 64][..], false, false),
            (&[33, 7], &[7, 1000], false, false),
            (&[3, 5, 7], &[3, 7, 9], false, false),
            (&[2, 3, 5, 7], &[7, 9], false, false),
            (&[5, 7], &[4, 7, 9], false, false),
            (&[4, 1, 5, 7], &[3, 7, 9], false, false),
            (&[33, 20], &[40, 33], true, true),
            (&[3, 7, 5], &[9, 7], true, true),
        ] {
            let what = format!(
                "matmul grad {ash:?}{} @ {bsh:?}{} {}",
                t(ta),
                t(tb),
                dt(dtype)
            );
            let a = randn(ash, dtype, dev, seed(&format!("{what} a")))?;
            let b = randn(bsh, dtype, dev, seed(&format!("{what} b")))?;
            let view = |x: &Tensor, tr: bool| -> Result<Tensor> {
                Ok(if tr {
                    x.transpose(x.rank() - 2, x.rank() - 1)?
                } else {
                    x.clone()
                })
            };
            let (av, bv) = (var(&a)?, var(&b)?);
            let c = matmul(&view(av.as_tensor(), ta)?, &view(bv.as_tensor(), tb)?)?;
            let r = randn(c.dims(), dtype, dev, seed(&format!("{what} r")))?;
            let grads = c.mul(&r)?.sum_all()?.backward()?;

            let (ar, br) = (var(&f64_cpu(&a)?)?, var(&f64_cpu(&b)?)?);
            let cr = view(ar.as_tensor(), ta)?.broadcast_matmul(&view(br.as_tensor(), tb)?)?;
            let grads_r = cr.mul(&f64_cpu(&r)?)?.sum_all()?.backward()?;
            for (name, x, xr) in [("da", &av, &ar), ("db", &bv, &br)] {
                let what = format!("{what} {name}");
                let g = grad_of(&grads, x.as_tensor(), &what);
                assert_eq!(g.dtype(), dtype, "{what}: gradient dtype");
                assert_eq!(g.dims(), x.dims(), "{what}: gradient shape");
                let gr = grad_of(&grads_r, xr.as_tensor(), &what);
                assert_close(&g, &gr, tol(dtype), &what)?;
            }
        }
    }
    Ok(())
}

/// `matmul(x_var, w_frozen)`: only x gets a gradient; and the other way round.
fn frozen_operands(dev: &Device) -> Result<()> {
    let dtype = if dev.is_cpu() { DType::F64 } else { DType::F32 };
    for (ash, bsh) in [(&[4usize, 6][..], &[6usize, 3][..]), (&[2, 4, 6], &[6, 3])] {
        let what = format!("matmul frozen {ash:?} @ {bsh:?}");
        let x = randn(ash, dtype, dev, seed(&format!("{what} x")))?;
        let w = randn(bsh, dtype, dev, seed(&format!("{what} w")))?;
        let out_dims = matmul_f64(&x, &w)?.dims().to_vec();
        let r = randn(&out_dims, dtype, dev, seed(&format!("{what} r")))?;
        let (xr, wr) = (var(&f64_cpu(&x)?)?, var(&f64_cpu(&w)?)?);
        let gr = xr
            .as_tensor()
            .broadcast_matmul(wr.as_tensor())?
            .mul(&f64_cpu(&r)?)?
            .sum_all()?
            .backward()?;

        let xv = var(&x)?;
        let g = matmul(xv.as_tensor(), &w)?.mul(&r)?.sum_all()?.backward()?;
        assert!(g.get(&w).is_none(), "{what}: frozen w got a gradient");
        let gx = grad_of(&g, xv.as_tensor(), &what);
        assert_close(
            &gx,
            &grad_of(&gr, xr.as_tensor(), &what),
            tol(dtype),
            &format!("{what} dx"),
        )?;

        let wv = var(&w)?;
        let g = matmul(&x, wv.as_tensor())?.mul(&r)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_none(), "{what}: frozen x got a gradient");
        let gw = grad_of(&g, wv.as_tensor(), &what);
        assert_close(
            &gw,
            &grad_of(&gr, wr.as_tensor(), &what),
            tol(dtype),
            &format!("{what} dw"),
        )?;

        // A frozen, transposed weight (the linear-layer layout).
        let wt = w.t()?.contiguous()?;
        let xv = var(&x)?;
        let g = matmul(xv.as_tensor(), &wt.t()?)?
            .mul(&r)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&wt).is_none(), "{what}: frozen w.t() got a gradient");
        let gx = grad_of(&g, xv.as_tensor(), &what);
        assert_close(
            &gx,
            &grad_of(&gr, xr.as_tensor(), &what),
            tol(dtype),
            &format!("{what} dx (wt)"),
        )?;
    }
    Ok(())
}

/// Every output element is written, forward and backward. See [`poison`] for why this is only
/// meaningful on CUDA.
fn every_element_written(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for (ash, bsh) in [
            (&[64usize, 64][..], &[64usize, 64][..]),
            (&[33, 7], &[7, 4097]),
            (&[1000, 33], &[33, 7]),
            (&[4, 1, 5, 7], &[3, 7, 9]),
            (&[2, 3, 5, 7], &[7, 9]),
        ] {
            let what = format!("matmul poisoned {ash:?} @ {bsh:?} {}", dt(dtype));
            let a = randn(ash, dtype, dev, seed(&format!("{what} a")))?;
            let b = randn(bsh, dtype, dev, seed(&format!("{what} b")))?;
            let (av, bv) = (var(&a)?, var(&b)?);
            let out_dims = matmul_f64(&a, &b)?.dims().to_vec();
            let n_out: usize = out_dims.iter().product();
            let sizes = [n_out, n_out, a.elem_count(), b.elem_count(), 4 * n_out];
            poison(dev, dtype, &sizes)?;
            let c = matmul(av.as_tensor(), bv.as_tensor())?;
            assert_no_nan(&c, &what)?;
            let r = randn(&out_dims, dtype, dev, seed(&format!("{what} r")))?;
            poison(dev, dtype, &sizes)?;
            let g = c.mul(&r)?.sum_all()?.backward()?;
            assert_no_nan(&grad_of(&g, av.as_tensor(), &what), &format!("{what} da"))?;
            assert_no_nan(&grad_of(&g, bv.as_tensor(), &what), &format!("{what} db"))?;
        }
    }
    Ok(())
}

fn assert_matmul_err(e: &Error) {
    assert!(
        e.to_string().contains("matmul"),
        "error `{e}` does not name matmul"
    );
}

/// Bad input returns the right error variant, naming the op; never a panic.
fn errors(dev: &Device) -> Result<()> {
    let m = |shape: &[usize]| randn(shape, DType::F32, dev, 7);
    let s = Tensor::new(1f32, dev)?;
    let v = m(&[7])?;
    let a = m(&[5, 7])?;
    let b = m(&[7, 9])?;

    for (name, x, y) in [
        ("rank 0 @ 2", &s, &b),
        ("2 @ rank 0", &a, &s),
        ("rank 1 @ 2", &v, &b),
        ("2 @ rank 1", &a, &v),
        ("rank 1 @ 1", &v, &v),
    ] {
        let e = matmul(x, y).unwrap_err();
        assert!(matches!(e, Error::Rank { min: 2, .. }), "{name}: {e:?}");
        assert_matmul_err(&e);
    }

    for (name, ash, bsh) in [
        ("inner dims", &[5usize, 7][..], &[6usize, 9][..]),
        ("inner dims, batched", &[3, 5, 7], &[3, 8, 9]),
        ("batch 2 vs 3", &[2, 5, 7], &[3, 7, 9]),
        ("batch [2,3] vs [3,2]", &[2, 3, 5, 7], &[3, 2, 7, 9]),
        ("batch [4,2] vs [3]", &[4, 2, 5, 7], &[3, 7, 9]),
    ] {
        let e = matmul(&m(ash)?, &m(bsh)?).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e:?}");
        assert_matmul_err(&e);
    }

    let e = matmul(&a, &b.to_dtype(DType::F16)?).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "f32 @ f16: {e:?}");
    assert_matmul_err(&e);
    let e = matmul(&a.to_dtype(DType::BF16)?, &b.to_dtype(DType::F16)?).unwrap_err();
    assert!(
        matches!(e, Error::DTypeMismatch { .. }),
        "bf16 @ f16: {e:?}"
    );

    for dtype in [DType::U32, DType::I64, DType::U8] {
        let e = matmul(&a.to_dtype(dtype)?, &b.to_dtype(dtype)?).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedDType { dtype: d, .. } if d == dtype),
            "{dtype:?}: {e:?}"
        );
        assert_matmul_err(&e);
    }
    if !dev.is_cpu() {
        let e = matmul(&a.to_dtype(DType::F64)?, &b.to_dtype(DType::F64)?).unwrap_err();
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
        let e = matmul(&a, &b.to_device(&Device::Cpu)?).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "devices: {e:?}");
        assert_matmul_err(&e);
    }
    Ok(())
}

device_test!(
    forward,
    non_contiguous,
    grad_fd,
    grad_vs_reference,
    frozen_operands,
    errors
);
device_test!(exclusive: empty, tf32, every_element_written);
