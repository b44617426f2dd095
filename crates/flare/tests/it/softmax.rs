//! `flare::ops::softmax_last_dim`: forward against a float64 composite, backward against finite
//! differences and against the composite's autograd, non-contiguous views, numerical stability,
//! every output element written, and clear errors.
//!
//! Derivatives: with `y = softmax(x)` over the last dim and upstream gradient `dy`,
//!   `dx_i = y_i (dy_i − Σ_j y_j dy_j)`.

use candle_core::{DType, Device, Tensor, D};
use flare::ops::softmax_last_dim;
use flare::Error;

use crate::common::*;

/// The float64 reference from plain Candle ops; `x` must already be f64 on the CPU (it may be
/// a `Var`, so that its gradients can be taken).
fn softmax_f64(x: &Tensor) -> Result<Tensor> {
    assert_eq!(x.dtype(), DType::F64);
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Shapes with last dims 1, 7, 33, 1000, 4097, ranks 2 to 4, plus the CUDA kernels' path
/// boundaries: 64 and 8192 columns (16-byte register paths, one thread per row for 2-byte types
/// at 64) and 40000 (register path for 2-byte types, streaming path for f32).
const SHAPES: &[&[usize]] = &[
    &[5, 64],
    &[3, 8192],
    &[2, 40000],
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
            let what = format!("softmax {shape:?} {}", dt(dtype));
            let x = randn_scaled(shape, 0.0, 3.0, dtype, dev, seed(&what))?;
            let y = softmax_last_dim(&x)?;
            assert_eq!(y.dtype(), dtype, "{what}: output dtype");
            assert!(y.device().same_device(dev), "{what}: output device");
            let reference = softmax_f64(&f64_cpu(&x)?)?;
            assert_close(&y, &reference, tol(dtype), &what)?;
            // flare's own composite reference agrees with this one too.
            let flare_ref = flare::ops::softmax::softmax_reference(&x)?;
            assert_close(
                &flare_ref,
                &reference,
                tol(dtype),
                &format!("{what} (reference)"),
            )?;
        }
    }
    Ok(())
}

/// Non-contiguous inputs (transposes, `narrow` on rows and on the last dim, broadcasts) give
/// the reference's result and the same result as their contiguous copies.
fn non_contiguous(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        let s = |name: &str| seed(&format!("softmax views {name} {}", dt(dtype)));
        let r = |shape: &[usize], name: &str| randn_scaled(shape, 0.0, 2.0, dtype, dev, s(name));
        let cases: Vec<(&str, Tensor)> = vec![
            ("[33,7].t()", r(&[33, 7], "t")?.t()?),
            (
                "[4,7,5].transpose(1,2)",
                r(&[4, 7, 5], "t3")?.transpose(1, 2)?,
            ),
            (
                "[2,7,3,5].transpose(1,3)",
                r(&[2, 7, 3, 5], "t4")?.transpose(1, 3)?,
            ),
            (
                "[5,40].narrow(1,3,33)",
                r(&[5, 40], "nc")?.narrow(1, 3, 33)?,
            ),
            (
                "[2,4100].narrow(1,1,4097)",
                r(&[2, 4100], "nc2")?.narrow(1, 1, 4097)?,
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
                "[3,1,7] broadcast to [3,4,7]",
                r(&[3, 1, 7], "b3")?.broadcast_as((3, 4, 7))?,
            ),
            (
                "[7] broadcast to [5,7] (stride-0 rows)",
                r(&[7], "b1")?.broadcast_as((5, 7))?,
            ),
        ];
        for (name, x) in cases {
            let what = format!("softmax view {name} {}", dt(dtype));
            let y = softmax_last_dim(&x)?;
            assert_close(&y, &softmax_f64(&f64_cpu(&x)?)?, tol(dtype), &what)?;
            let yc = softmax_last_dim(&x.contiguous()?)?;
            assert_close(&y, &yc, tol(dtype), &format!("{what} vs contiguous"))?;
        }
    }
    Ok(())
}

/// Rows sum to 1; inputs of magnitude ~1e4 and rows with `-inf` entries (not all of them) give
/// finite outputs, exact zeros at `-inf`, and the reference's values.
fn stability(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for &(rows, cols) in &[(6usize, 33usize), (3, 1000), (2, 4097)] {
            let what = format!("softmax stability [{rows},{cols}] {}", dt(dtype));
            let mut v: Vec<f64> = normals(rows * cols, seed(&what))
                .into_iter()
                .map(|x| (x * 1e4).clamp(-6e4, 6e4))
                .collect();
            for r in 0..rows {
                let row = &mut v[r * cols..(r + 1) * cols];
                match r % 3 {
                    // Every 5th entry -inf.
                    0 => row
                        .iter_mut()
                        .step_by(5)
                        .for_each(|x| *x = f64::NEG_INFINITY),
                    // All -inf but one entry: the output is exactly one-hot.
                    1 => {
                        row.iter_mut().for_each(|x| *x = f64::NEG_INFINITY);
                        row[cols / 2] = 1e4;
                    }
                    // A constant large row: uniform output.
                    _ => row.iter_mut().for_each(|x| *x = 1e4),
                }
            }
            let x = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?;
            let y = softmax_last_dim(&x)?;
            let out = to_f64_vec(&y)?;
            let xin = to_f64_vec(&x)?;
            assert!(
                out.iter().all(|v| v.is_finite()),
                "{what}: non-finite output"
            );
            for r in 0..rows {
                let row = &out[r * cols..(r + 1) * cols];
                let sum: f64 = row.iter().sum();
                assert!(
                    (sum - 1.0).abs() <= tol(dtype),
                    "{what}: row {r} sums to {sum}"
                );
                for (c, (&o, &i)) in row.iter().zip(&xin[r * cols..]).enumerate() {
                    if i == f64::NEG_INFINITY {
                        assert_eq!(o, 0.0, "{what}: row {r} col {c}: -inf input gave {o}");
                    }
                }
                if r % 3 == 1 {
                    assert_eq!(row[cols / 2], 1.0, "{what}: one-hot row {r}");
                }
            }
            assert_close(&y, &softmax_f64(&f64_cpu(&x)?)?, tol(dtype), &what)?;
        }
    }
    Ok(())
}

/// The analytic gradient against central finite differences of the f64 CPU op. On CUDA the
/// gradient is computed in f32 on the device from the same (f32-exact) inputs.
fn grad_fd(dev: &Device) -> Result<()> {
    for shape in [&[3usize, 7][..], &[2, 3, 5], &[4, 1]] {
        let fd = FdCheck::new(dev, format!("softmax grad fd {shape:?}"));
        let x = fd.input(shape, "")?;
        let r = fd.constant(&fd.input(shape, "r")?)?;
        fd.check(&[("dx", &x)], |t| {
            weighted_loss(&softmax_last_dim(&t[0])?, r.like(&t[0]))
        })?;
    }
    Ok(())
}

/// flare's gradient against the f64 composite's autograd gradient, at every dtype, for
/// contiguous and non-contiguous inputs.
fn grad_vs_reference(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for (name, shape, transpose) in [
            ("[4,33]", &[4usize, 33][..], false),
            ("[2,3,7]", &[2, 3, 7], false),
            ("[2,1000]", &[2, 1000], false),
            ("[2,4097]", &[2, 4097], false),
            ("[33,5].t()", &[33, 5], true),
        ] {
            let what = format!("softmax grad {name} {}", dt(dtype));
            let x = randn_scaled(shape, 0.0, 2.0, dtype, dev, seed(&what))?;
            let xv = var(&x)?;
            let input = if transpose {
                xv.as_tensor().t()?
            } else {
                xv.as_tensor().clone()
            };
            let r = randn(input.dims(), dtype, dev, seed(&format!("{what} r")))?;
            let loss = softmax_last_dim(&input)?.mul(&r)?.sum_all()?;
            let g = grad_of(&loss.backward()?, xv.as_tensor(), &what);
            assert_eq!(g.dtype(), dtype, "{what}: gradient dtype");

            let xr = var(&f64_cpu(&x)?)?;
            let input_r = if transpose {
                xr.as_tensor().t()?
            } else {
                xr.as_tensor().clone()
            };
            let loss_r = softmax_f64(&input_r)?.mul(&f64_cpu(&r)?)?.sum_all()?;
            let gr = grad_of(&loss_r.backward()?, xr.as_tensor(), &what);
            assert_close(&g, &gr, tol(dtype), &what)?;
        }
    }
    Ok(())
}

/// Every output element is written, forward and backward. See [`poison`] for why this is only
/// meaningful on CUDA.
fn every_element_written(dev: &Device) -> Result<()> {
    for &dtype in &dtypes(dev) {
        for shape in [&[64usize, 4097][..], &[300, 33], &[513, 1], &[2, 3, 1000]] {
            let what = format!("softmax poisoned {shape:?} {}", dt(dtype));
            let n: usize = shape.iter().product();
            let x = randn(shape, dtype, dev, seed(&what))?;
            let r = randn(shape, dtype, dev, seed(&format!("{what} r")))?;
            let xv = var(&x)?;
            poison(dev, dtype, &[n, n, 2 * n, n])?;
            let y = softmax_last_dim(xv.as_tensor())?;
            assert_no_nan(&y, &what)?;
            poison(dev, dtype, &[n, n, 2 * n, n])?;
            let grads = y.mul(&r)?.sum_all()?.backward()?;
            assert_no_nan(
                &grad_of(&grads, xv.as_tensor(), &what),
                &format!("{what} dx"),
            )?;
        }
    }
    Ok(())
}

/// Zero-size inputs give zero-size outputs (no error, no panic, no kernel launched with an empty
/// grid).
fn empty(dev: &Device) -> Result<()> {
    for shape in [&[0usize, 5][..], &[3, 0], &[2, 0, 7]] {
        let x = Tensor::zeros(shape, DType::F32, dev)?;
        let y = softmax_last_dim(&x)?;
        assert_eq!(y.dims(), shape, "softmax of empty {shape:?}");
    }
    Ok(())
}

fn assert_names_op(e: &Error, op: &str) {
    assert!(e.to_string().contains(op), "error `{e}` does not name {op}");
}

/// Bad input returns the right error variant, naming the op; never a panic.
fn errors(dev: &Device) -> Result<()> {
    let e = softmax_last_dim(&Tensor::new(1f32, dev)?).unwrap_err();
    assert!(matches!(e, Error::Rank { .. }), "rank 0: {e:?}");
    assert_names_op(&e, "softmax");

    let e = softmax_last_dim(&Tensor::new(&[[1u32, 2, 3]], dev)?).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                dtype: DType::U32,
                ..
            }
        ),
        "u32: {e:?}"
    );
    assert_names_op(&e, "softmax");

    let e = softmax_last_dim(&Tensor::new(&[[1i64, 2, 3]], dev)?).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                dtype: DType::I64,
                ..
            }
        ),
        "i64: {e:?}"
    );

    if !dev.is_cpu() {
        // f64 is a CPU-only dtype for flare's ops.
        let x = Tensor::new(&[[1f64, 2., 3.]], dev)?;
        let e = softmax_last_dim(&x).unwrap_err();
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
    }
    Ok(())
}

device_test!(
    forward,
    non_contiguous,
    stability,
    grad_fd,
    grad_vs_reference,
    empty,
    errors
);
device_test!(exclusive: every_element_written);
