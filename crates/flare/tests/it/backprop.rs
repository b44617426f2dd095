//! The gradient accumulation of the vendored candle-core (vendor/README.md): the first gradient
//! of a tensor is stored as it is instead of being added to zeros. These check that the values
//! are exactly upstream's on graphs where a tensor receives one gradient, several (summed),
//! negated ones (`sub`, `neg`) and a mix, against gradients worked out by hand.

use candle_core::{Device, Tensor, Var};

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
