//! The gradient accumulation of the vendored candle-core (vendor/README.md): the first gradient
//! of a tensor is stored as it is instead of being added to zeros. These check that the values
//! are exactly upstream's on graphs where a tensor receives one gradient, several (summed),
//! negated ones (`sub`, `neg`) and a mix, against gradients worked out by hand.

use candle_core::{Device, Tensor, Var};

use crate::common::*;

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn var(v: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn single_consumer_gradient_is_exact() {
    let x = var(&[1.0, -2.0, 3.0, 0.5, 7.0]);
    // loss = sum(3x): dx = 3, reached through affine, reshape and sum.
    let y = (x.as_tensor() * 3.0).unwrap().reshape((5, 1)).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(g.get(x.as_tensor()).unwrap()), vec![3.0; 5]);
}

#[test]
fn several_consumers_are_summed() {
    let xs = [1.0f32, -2.0, 3.0, 0.25];
    let x = var(&xs);
    let t = x.as_tensor();
    // loss = sum(x*x + 2x + exp(x) - x): dx = 2x + 2 + exp(x) - 1, four contributions.
    let y = ((t.mul(t).unwrap() + (t * 2.0).unwrap()).unwrap() + t.exp().unwrap()).unwrap();
    let y = (y - t).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let got = vals(g.get(t).unwrap());
    for (i, &v) in xs.iter().enumerate() {
        let want = 2.0 * v + 2.0 + v.exp() - 1.0;
        assert!(
            (got[i] - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{i}: {} vs {want}",
            got[i]
        );
    }
}

#[test]
fn negated_first_gradients() {
    let x = var(&[1.0, 2.0, -3.0]);
    let z = var(&[0.5, -1.0, 4.0]);
    // loss = sum(z - x) - sum(neg(z)) ... dx = -1 (first gradient via sub), dz = 1 + 1.
    let y = (z.as_tensor() - x.as_tensor()).unwrap();
    let y = (y - z.as_tensor().neg().unwrap()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(g.get(x.as_tensor()).unwrap()), vec![-1.0; 3]);
    assert_eq!(vals(g.get(z.as_tensor()).unwrap()), vec![2.0; 3]);
    // cos' = -sin: a negated first gradient through a unary rule.
    let c = x
        .as_tensor()
        .cos()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want: Vec<f32> = [1.0f32, 2.0, -3.0].iter().map(|v| -v.sin()).collect();
    assert_eq!(vals(c.get(x.as_tensor()).unwrap()), want);
}

#[test]
fn broadcast_and_strided_gradients_are_contiguous_and_right() {
    // A [2, 3] var used through a transpose and a broadcast add of a [3] var: the first
    // gradients arrive as strided views and must be stored with the right values.
    let w = Var::from_tensor(
        &Tensor::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap(),
    )
    .unwrap();
    let b = var(&[10.0, 20.0, 30.0]);
    let u = Tensor::new(&[[1.0f32, 0.0], [2.0, 1.0], [0.0, 3.0]], &Device::Cpu).unwrap();
    let y = w.as_tensor().t().unwrap().mul(&u).unwrap(); // [3, 2]
    let y = y.t().unwrap().broadcast_add(b.as_tensor()).unwrap(); // [2, 3]
    let g = y.sum_all().unwrap().backward().unwrap();
    let gw = g.get(w.as_tensor()).unwrap();
    assert!(gw.is_contiguous());
    // d/dw[i][j] of sum(w[i][j] * u[j][i]) = u[j][i].
    assert_eq!(vals(gw), vec![1.0, 2.0, 0.0, 0.0, 1.0, 3.0]);
    assert_eq!(vals(g.get(b.as_tensor()).unwrap()), vec![2.0; 3]);
}

/// The gradients of a LoRA model's loss, with or without Candle's launch-parameter cache
/// (`flare::runtime::cache_launch_params`, which the trainer holds around forward and backward):
/// they must be bitwise equal, on every device (a no-op on the CPU).
fn launch_param_cache_changes_nothing(dev: &Device) -> Result<()> {
    use flare::lora::LoraConfig;
    use flare::models::{ModelConfig, Transformer};
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 96, "intermediate_size": 200,
            "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-6, "vocab_size": 517, "max_position_embeddings": 64,
            "tie_word_embeddings": true}"#,
        "config.json",
    )?;
    let mut model = Transformer::random(cfg, candle_core::DType::F32, dev, 3)?;
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let vars = crate::common::add_training_adapters(&mut model, &lora)?;
    // B starts at zero, which would leave A's gradient zero: give B values.
    for v in vars.iter().skip(1).step_by(2) {
        v.set(&Tensor::randn(0f32, 0.1, v.shape(), dev)?)?;
    }
    let ids = Tensor::new(
        &[[5u32, 77, 300, 2, 9, 411, 16], [1, 2, 3, 4, 5, 6, 7]],
        dev,
    )?;
    let grads = |cached: bool| -> Result<Vec<Vec<f32>>> {
        let _guard = cached.then(|| flare::runtime::cache_launch_params(dev));
        let logits = model.forward(&ids)?;
        let loss = (logits.sqr()?.mean_all()? + logits.sin()?.sum_all()?)?;
        let g = loss.backward()?;
        vars.iter()
            .map(|v| Ok(vals(g.get(v.as_tensor()).expect("a LoRA gradient"))))
            .collect()
    };
    let plain = grads(false)?;
    let cached = grads(true)?;
    assert!(plain.iter().any(|g| g.iter().any(|&x| x != 0.0)));
    assert_eq!(plain, cached);
    Ok(())
}

device_test!(launch_param_cache_changes_nothing);

/// A tensor with several consumers gets the sum of their gradients: on CUDA through flare's
/// vectorised accumulation (`grad_add`, installed into Candle's `GradStore`), which must give
/// Candle's values bit for bit: each sum computed in f32 and rounded once. `x` feeds three
/// products, so its gradient is `a + b + c` summed in that order; compared element for element
/// with the same sums on the CPU, for f32, f16 and bf16, at sizes with a tail (not a multiple
/// of the 16-byte pack), for a variable and for a variable reached through a view at an odd
/// offset.
fn accumulated_gradients_match_the_cpu(dev: &Device) -> Result<()> {
    use candle_core::DType;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for n in [1usize, 7, 4099, 100_003] {
            let host = |name: &str, k: usize| -> Result<Tensor> {
                Ok(
                    randn_scaled(&[k], 0.0, 1.0, DType::F32, &Device::Cpu, seed(name))?
                        .to_dtype(dtype)?,
                )
            };
            let run = |d: &Device| -> Result<(Vec<f32>, Vec<f32>)> {
                let x = Var::from_tensor(&host("acc x", n)?.to_device(d)?)?;
                let a = host("acc a", n)?.to_device(d)?;
                let b = host("acc b", n)?.to_device(d)?;
                let c = host("acc c", n)?.to_device(d)?;
                let xt = x.as_tensor();
                let y = ((xt * &a)? + (xt * &b)?)?.add(&(xt * &c)?)?;
                let g = y.sum_all()?.backward()?;
                let gx = g
                    .get(xt)
                    .expect("x's gradient")
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                // A view at offset 3 of a longer variable: its slices' gradients are summed too.
                let long = Var::from_tensor(&host("acc long", n + 3)?.to_device(d)?)?;
                let v = long.as_tensor().narrow(0, 3, n)?;
                let z = ((&v * &a)? + (&v * &b)?)?;
                let gz = z.sum_all()?.backward()?;
                let gl = gz.get(long.as_tensor()).expect("the view's gradient");
                Ok((gx, gl.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            };
            let (gx, gl) = run(dev)?;
            let (cx, cl) = run(&Device::Cpu)?;
            let same =
                |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(
                same(&gx, &cx),
                "{dtype:?} n {n}: accumulated gradient differs from the CPU's"
            );
            assert!(
                same(&gl, &cl),
                "{dtype:?} n {n}: a view's gradient differs from the CPU's"
            );
            assert!(gx.iter().any(|v| *v != 0.0));
        }
    }
    Ok(())
}

device_test!(accumulated_gradients_match_the_cpu);
