//! Next-token selection from a row of logits, with the semantics and the order of the logits
//! processors of Hugging Face transformers: repetition penalty, temperature, top-k, top-p,
//! min-p; then greedy argmax or a draw from the softmax with a seeded [`StdRng`].

use rand::rngs::StdRng;
use rand::Rng;

use crate::{Error, Result};

const OP: &str = "sampling";

/// How the next token is chosen. The default is greedy decoding with no penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Draw from the distribution (`true`) or take the argmax (`false`, greedy; temperature,
    /// top-k, top-p and min-p are then ignored, as in transformers).
    pub do_sample: bool,
    /// Divides the logits; must be positive. 1.0 leaves them unchanged.
    pub temperature: f32,
    /// Keeps the `k` largest logits (ties at the k-th value kept); 0 disables.
    pub top_k: usize,
    /// Keeps the smallest set of most probable tokens whose probability reaches `top_p`
    /// (at least one); 1.0 disables. In `(0, 1]`.
    pub top_p: f32,
    /// Removes tokens whose probability is below `min_p` times the largest one; 0.0 disables.
    /// In `[0, 1]`.
    pub min_p: f32,
    /// For every token already present: a positive logit is divided by it, a negative one
    /// multiplied (transformers' `RepetitionPenaltyLogitsProcessor`); must be positive. 1.0
    /// disables.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Checks every parameter's range; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: OP, msg });
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Applies the repetition penalty in place: for every distinct token of `previous`, a
/// positive logit is divided by `penalty` and a negative one multiplied by it. Ids outside the
/// vocabulary are an error.
pub fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) -> Result<()> {
    if penalty == 1.0 {
        return Ok(());
    }
    let mut seen = vec![false; logits.len()];
    for &t in previous {
        let i = t as usize;
        if i >= logits.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("token id {t} out of the vocabulary ({})", logits.len()),
            });
        }
        if !std::mem::replace(&mut seen[i], true) {
            let l = &mut logits[i];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
    Ok(())
}

/// Divides every logit by `temperature`.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        logits.iter_mut().for_each(|l| *l /= temperature);
    }
}

/// Sets to `-inf` every logit below the `k`-th largest (ties at that value are kept, as in
/// transformers); `k == 0` or `k >= len` does nothing.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits
        .iter_mut()
        .filter(|l| **l < kth)
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// The softmax of `logits` (in f64 for the sums), `-inf` giving 0.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// Nucleus filtering as transformers does it: sorting ascending, tokens whose cumulative
/// probability is `<= 1 - top_p` are removed, always keeping the most probable one.
/// `top_p >= 1` does nothing.
pub fn apply_top_p(logits: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let mut cum = 0.0;
    let threshold = 1.0 - f64::from(top_p);
    let last = order.len().saturating_sub(1);
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= threshold && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Removes (sets to `-inf`) every token whose probability is below `min_p` times the largest
/// probability; `min_p == 0` does nothing.
pub fn apply_min_p(logits: &mut [f32], min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let probs = softmax(logits);
    let top = probs.iter().copied().fold(0.0, f64::max);
    let cut = f64::from(min_p) * top;
    for (l, p) in logits.iter_mut().zip(probs) {
        if p < cut {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// The index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::InvalidArgument {
            op: OP,
            msg: format!("no finite logit to choose from ({} logits)", logits.len()),
        })
}

/// Chooses the next token from one row of `logits` (`[vocab]`, f32) given the tokens so far
/// (`previous`, for the repetition penalty): the processors in transformers' order, then
/// argmax (greedy) or a draw from the softmax with `rng`.
///
/// ```
/// use rand::SeedableRng;
/// use flare::generate::{sample, SamplingParams};
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let greedy = SamplingParams::default();
/// assert_eq!(sample(&[0.1, 2.0, -1.0], &[], &greedy, &mut rng)?, 1);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn sample(
    logits: &[f32],
    previous: &[u32],
    params: &SamplingParams,
    rng: &mut StdRng,
) -> Result<u32> {
    params.validate()?;
    if logits.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "empty logits".into(),
        });
    }
    let mut l = logits.to_vec();
    apply_repetition_penalty(&mut l, previous, params.repetition_penalty)?;
    if !params.do_sample {
        return argmax(&l);
    }
    apply_temperature(&mut l, params.temperature);
    apply_top_k(&mut l, params.top_k);
    apply_top_p(&mut l, params.top_p);
    apply_min_p(&mut l, params.min_p);
    let probs = softmax(&l);
    if probs.iter().all(|p| *p == 0.0 || p.is_nan()) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "every token was filtered out or the logits are not finite".into(),
        });
    }
    let u: f64 = rng.random::<f64>();
    let mut cum = 0.0;
    let mut last_nonzero = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_nonzero = i;
            cum += p;
            if u < cum {
                return Ok(i as u32);
            }
        }
    }
    Ok(last_nonzero as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_penalty_hf_semantics() -> Result<()> {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 0], 2.0)?;
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5]);
        assert!(apply_repetition_penalty(&mut l, &[9], 2.0).is_err());
        Ok(())
    }

    #[test]
    fn temperature_divides() {
        let mut l = vec![2.0, -1.0];
        apply_temperature(&mut l, 0.5);
        assert_eq!(l, vec![4.0, -2.0]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut l = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        apply_top_k(&mut l, 2);
        assert_eq!(l, vec![NEG, 3.0, 2.0, 2.0, NEG]);
        let mut l = vec![1.0, 3.0];
        apply_top_k(&mut l, 0);
        assert_eq!(l, vec![1.0, 3.0]);
    }

    #[test]
    fn top_p_nucleus() {
        // probabilities 0.5, 0.3, 0.15, 0.05
        let p = [0.5f64, 0.3, 0.15, 0.05];
        let base: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let mut l = base.clone();
        apply_top_p(&mut l, 0.75);
        assert_eq!(&l[..2], &base[..2]);
        assert_eq!(&l[2..], &[NEG, NEG]);
        let mut l = base.clone();
        apply_top_p(&mut l, 0.1);
        assert_eq!(l[0], base[0]);
        assert!(l[1..].iter().all(|x| *x == NEG));
    }

    #[test]
    fn min_p_relative_cut() {
        let p = [0.5f64, 0.3, 0.15, 0.05];
        let base: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let mut l = base.clone();
        apply_min_p(&mut l, 0.2); // cut at 0.1
        assert_eq!(&l[..3], &base[..3]);
        assert_eq!(l[3], NEG);
    }

    #[test]
    fn greedy_and_penalty_order() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(0);
        let greedy = SamplingParams::default();
        assert_eq!(sample(&[1.0, 3.0, 2.0], &[], &greedy, &mut rng)?, 1);
        let pen = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(sample(&[1.0, 3.0, 2.0], &[1], &pen, &mut rng)?, 2);
        Ok(())
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_filtered() -> Result<()> {
        let params = SamplingParams {
            do_sample: true,
            temperature: 0.7,
            top_k: 3,
            top_p: 0.95,
            min_p: 0.01,
            ..Default::default()
        };
        let logits = [0.5, 1.0, 3.0, 2.5, -1.0, 2.9];
        let draw = |seed| -> Result<Vec<u32>> {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| sample(&logits, &[], &params, &mut rng))
                .collect()
        };
        let a = draw(7)?;
        assert_eq!(a, draw(7)?);
        // top-k 3 keeps ids 2, 5, 3 only; all three are drawn.
        assert!(a.iter().all(|t| [2, 3, 5].contains(t)));
        for t in [2, 3, 5] {
            assert!(a.contains(&t));
        }
        Ok(())
    }

    #[test]
    fn bad_params_are_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        for p in [
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: -1.0,
                ..Default::default()
            },
        ] {
            assert!(sample(&[1.0], &[], &p, &mut rng).is_err());
        }
        assert!(sample(&[], &[], &SamplingParams::default(), &mut rng).is_err());
        assert!(sample(&[f32::NAN], &[], &SamplingParams::default(), &mut rng).is_err());
    }
}
