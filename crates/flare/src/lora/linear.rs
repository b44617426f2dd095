//! [`LoraLinear`]: a frozen linear layer with named LoRA adapters, one of them active.
//!
//! The forward of a layer with an active, unmerged adapter is the fused
//! [`super::lora_linear`] (no gradient of the frozen weight is ever computed); with
//! no active adapter, or with the adapter merged into the weight, it is the plain base linear
//! `flare::ops::matmul(x, Wᵀ) + bias`, so disabling adapters gives the base output exactly.
//! In training mode an adapter with dropout runs the low-rank path on `dropout(x)` (not fused
//! yet, see [`super::op`]).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::config::LoraConfig;
use super::init::init_adapter;
use super::op::{adapter_dtype_ok, lora_linear, lora_linear_dropout};
use crate::error::device_name;
use crate::ops::{check_dtype, check_rank, matmul};
use crate::{Error, Result};

const OP: &str = "LoraLinear";

fn invalid(msg: String) -> Error {
    Error::InvalidArgument { op: OP, msg }
}

/// A copy of `t` in `dtype` on `device` that shares no storage with `t` (a conversion already
/// is one): `Var::set` refuses a tensor sharing the variable's own storage, and a new adapter
/// must not alias its source.
fn fresh_copy(t: &Tensor, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    Ok(if t.dtype() == dtype && t.device().same_device(device) {
        t.copy()?
    } else {
        t.to_dtype(dtype)?.to_device(device)?
    })
}

/// One named adapter of a [`LoraLinear`]: trainable `A: [r, in]` and `B: [out, r]`, its scaling
/// `s` and its dropout probability.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use flare::lora::{LoraConfig, LoraLinear};
/// let w = Tensor::zeros((7, 33), DType::F32, &Device::Cpu)?;
/// let mut layer = LoraLinear::new(w, None)?;
/// layer.add_adapter("default", &LoraConfig { r: 4, alpha: 8.0, ..Default::default() }, 0)?;
/// let ad = layer.adapter("default").unwrap();
/// assert_eq!((ad.rank(), ad.scale(), ad.dropout()), (4, 2.0, 0.0));
/// assert_eq!((ad.a().dims(), ad.b().dims()), (&[4, 33][..], &[7, 4][..]));
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    r: usize,
    scale: f64,
    dropout: f32,
}

impl LoraAdapter {
    /// `A: [r, in]`, the down projection.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert_eq!(layer.adapter("x").unwrap().a().dims(), &[1, 3]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn a(&self) -> &Tensor {
        self.a.as_tensor()
    }

    /// `B: [out, r]`, the up projection (zeros when freshly initialised).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// let b = layer.adapter("x").unwrap().b();
    /// assert_eq!(b.to_vec2::<f32>()?, vec![vec![0.0], vec![0.0]]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn b(&self) -> &Tensor {
        self.b.as_tensor()
    }

    /// The `Var` holding `A` (for an optimizer).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert!(layer.adapter("x").unwrap().a_var().as_tensor().is_variable());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn a_var(&self) -> &Var {
        &self.a
    }

    /// The `Var` holding `B` (for an optimizer).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert!(layer.adapter("x").unwrap().b_var().as_tensor().is_variable());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn b_var(&self) -> &Var {
        &self.b
    }

    /// The rank `r`.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 2, ..Default::default() }, 0)?;
    /// assert_eq!(layer.adapter("x").unwrap().rank(), 2);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The scaling `s` ([`LoraConfig::scaling`]).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// let cfg = LoraConfig { r: 4, alpha: 16.0, use_rslora: true, ..Default::default() };
    /// layer.add_adapter("x", &cfg, 0)?;
    /// assert_eq!(layer.adapter("x").unwrap().scale(), 8.0);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The dropout probability on the low-rank path's input (training mode only).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("x", &LoraConfig { r: 1, dropout: 0.1, ..Default::default() }, 0)?;
    /// assert_eq!(layer.adapter("x").unwrap().dropout(), 0.1);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn dropout(&self) -> f32 {
        self.dropout
    }

    /// `s · B A` in the accumulation dtype `acc` (f32, or f64 for an f64 base), detached.
    fn delta(&self, acc: DType) -> Result<Tensor> {
        let a = self.a().detach().to_dtype(acc)?;
        let b = self.b().detach().to_dtype(acc)?;
        Ok((matmul(&b, &a)? * self.scale)?)
    }
}

/// A frozen linear layer `y = x Wᵀ + bias` (`W: [out, in]`) with named LoRA adapters.
///
/// At most one adapter is active; switching ([`set_active`](Self::set_active)) never touches
/// the base weight. The base weight and bias are stored detached and contiguous: they never get
/// a gradient. Only the active adapter's `A` and `B` are trained
/// ([`trainable_vars`](Self::trainable_vars)).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use flare::lora::{LoraConfig, LoraLinear};
/// let dev = Device::Cpu;
/// let w = Tensor::randn(0f32, 1.0, (7, 33), &dev)?;
/// let mut layer = LoraLinear::new(w, None)?;
/// layer.add_adapter("default", &LoraConfig { r: 4, alpha: 8.0, ..Default::default() }, 42)?;
/// layer.set_active(Some("default"))?;
/// layer.set_training(true);
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 33), &dev)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 3, 7]);
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// let vars = layer.trainable_vars();
/// assert_eq!(vars.len(), 2);
/// assert!(grads.get(vars[0].as_tensor()).is_some());
/// assert!(grads.get(layer.weight()).is_none());
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: BTreeMap<String, LoraAdapter>,
    active: Option<String>,
    merged: Option<String>,
    training: bool,
}

impl LoraLinear {
    /// Wraps a frozen weight `[out, in]` and optional bias `[out]` (same dtype and device; f32,
    /// f16, bf16, or f64 on CPU). Both are detached (a `Var` given here is not trained through
    /// this layer) and made contiguous. No adapter, not in training mode.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// let w = Tensor::zeros((7, 33), DType::BF16, &Device::Cpu)?;
    /// let b = Tensor::zeros(7, DType::BF16, &Device::Cpu)?;
    /// let layer = flare::lora::LoraLinear::new(w, Some(b))?;
    /// assert_eq!((layer.in_features(), layer.out_features()), (33, 7));
    /// assert!(flare::lora::LoraLinear::new(Tensor::zeros(3, DType::F32, &Device::Cpu)?, None).is_err());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        check_rank(OP, &weight, 2)?;
        if weight.rank() != 2 {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "the weight must be 2-D [out, in] (weight, expected rank)",
                lhs: weight.dims().to_vec(),
                rhs: vec![2],
            });
        }
        check_dtype(OP, &weight)?;
        if let Some(b) = &bias {
            if b.dims() != [weight.dims()[0]] {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    msg: "the bias must be [out] (bias, weight)",
                    lhs: b.dims().to_vec(),
                    rhs: weight.dims().to_vec(),
                });
            }
            crate::ops::check_same(OP, &weight, b)?;
        }
        Ok(LoraLinear {
            weight: weight.detach().contiguous()?,
            bias: bias.map(|b| b.detach().contiguous()).transpose()?,
            adapters: BTreeMap::new(),
            active: None,
            merged: None,
            training: false,
        })
    }

    /// The base weight `[out, in]` (with the merged adapter's update while one is merged).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert_eq!(layer.weight().dims(), &[2, 3]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Replaces the base weight by `weight`: the same values of the same shape, dtype and
    /// device in another layout (the fused MLP's padded storage,
    /// [`crate::lora::op::MlpWeights`]), kept as given, not made contiguous. Errors on another
    /// shape, dtype or device, and while an adapter is merged (the weight then holds more than
    /// the base).
    pub(crate) fn relayout_weight(&mut self, weight: Tensor) -> Result<()> {
        if let Some(m) = &self.merged {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("cannot lay out the weight again while adapter {m:?} is merged"),
            });
        }
        if weight.dims() != self.weight.dims() {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "a weight laid out again must keep its shape (new, old)",
                lhs: weight.dims().to_vec(),
                rhs: self.weight.dims().to_vec(),
            });
        }
        crate::ops::check_same(OP, &self.weight, &weight)?;
        self.weight = weight.detach();
        Ok(())
    }

    /// The base bias `[out]`, if any.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert!(layer.bias().is_none());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `in`, the input width.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert_eq!(layer.in_features(), 3);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `out`, the output width.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert_eq!(layer.out_features(), 2);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Adds adapter `name` initialised as PEFT does ([`super::init`], seeded by `seed`), on the
    /// weight's device, in f32 (f64 for an f64 base). The active adapter does not change.
    /// Errors if the config is invalid or the name is taken.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::BF16, &Device::Cpu)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert_eq!(layer.adapter("a").unwrap().a().dtype(), DType::F32);
    /// assert!(layer.add_adapter("a", &LoraConfig::default(), 1).is_err()); // name taken
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig, seed: u64) -> Result<()> {
        self.add_adapter_with_dtype(name, config, seed, self.default_adapter_dtype())
    }

    /// The dtype [`add_adapter`](Self::add_adapter) gives an adapter: f64 on an f64 base, else
    /// f32.
    fn default_adapter_dtype(&self) -> DType {
        if self.weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Adds adapter `name` with the factors given (`a: [r, in]`, `b: [out, r]` with the
    /// config's rank), copied in the dtype [`add_adapter`](Self::add_adapter) uses and on the
    /// weight's device: what loading a saved adapter does, without drawing random factors
    /// first. The active adapter does not change. Errors if the config is invalid, the name is
    /// taken or a shape is wrong.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::BF16, &Device::Cpu)?, None)?;
    /// let cfg = LoraConfig { r: 1, ..Default::default() };
    /// let (a, b) = (Tensor::ones((1, 3), DType::F64, &Device::Cpu)?, Tensor::ones((2, 1), DType::F64, &Device::Cpu)?);
    /// layer.add_adapter_with_weights("a", &cfg, &a, &b)?;
    /// assert_eq!(layer.adapter("a").unwrap().b().to_vec2::<f32>()?, vec![vec![1.0], vec![1.0]]);
    /// assert!(layer.add_adapter_with_weights("b", &cfg, &b, &a).is_err()); // shapes swapped
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn add_adapter_with_weights(
        &mut self,
        name: &str,
        config: &LoraConfig,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<()> {
        config.validate()?;
        if self.adapters.contains_key(name) {
            return Err(invalid(format!("an adapter named {name:?} already exists")));
        }
        self.check_factors(config.r, a, b)?;
        let (dtype, device) = (self.default_adapter_dtype(), self.weight.device().clone());
        let (a, b) = (
            fresh_copy(a, dtype, &device)?,
            fresh_copy(b, dtype, &device)?,
        );
        self.adapters.insert(
            name.to_string(),
            LoraAdapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                r: config.r,
                scale: config.scaling(),
                dropout: config.dropout,
            },
        );
        Ok(())
    }

    /// Checks that `a` is `[r, in]` and `b` `[out, r]`.
    fn check_factors(&self, r: usize, a: &Tensor, b: &Tensor) -> Result<()> {
        let (inf, out) = (self.in_features(), self.out_features());
        if a.dims() != [r, inf] {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "lora_a must be [r, in] (given, expected)",
                lhs: a.dims().to_vec(),
                rhs: vec![r, inf],
            });
        }
        if b.dims() != [out, r] {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "lora_b must be [out, r] (given, expected)",
                lhs: b.dims().to_vec(),
                rhs: vec![out, r],
            });
        }
        Ok(())
    }

    /// [`add_adapter`](Self::add_adapter) with the adapter's dtype chosen: the base dtype, or
    /// f32 on an f16/bf16 base.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::BF16, &Device::Cpu)?, None)?;
    /// let cfg = LoraConfig { r: 1, ..Default::default() };
    /// layer.add_adapter_with_dtype("a", &cfg, 0, DType::BF16)?;
    /// assert!(layer.add_adapter_with_dtype("b", &cfg, 0, DType::F16).is_err());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn add_adapter_with_dtype(
        &mut self,
        name: &str,
        config: &LoraConfig,
        seed: u64,
        dtype: DType,
    ) -> Result<()> {
        config.validate()?;
        if self.adapters.contains_key(name) {
            return Err(invalid(format!("an adapter named {name:?} already exists")));
        }
        if !adapter_dtype_ok(self.weight.dtype(), dtype) {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: self.weight.dtype(),
                rhs: dtype,
            });
        }
        let (a, b) = init_adapter(
            self.in_features(),
            self.out_features(),
            config.r,
            seed,
            dtype,
            self.weight.device(),
        )?;
        self.adapters.insert(
            name.to_string(),
            LoraAdapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                r: config.r,
                scale: config.scaling(),
                dropout: config.dropout,
            },
        );
        Ok(())
    }

    /// The adapter named `name`, if any.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert!(layer.adapter("a").is_some() && layer.adapter("b").is_none());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.get(name)
    }

    /// The adapters' names, sorted.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// let cfg = LoraConfig { r: 1, ..Default::default() };
    /// layer.add_adapter("b", &cfg, 0)?;
    /// layer.add_adapter("a", &cfg, 0)?;
    /// assert_eq!(layer.adapter_names(), vec!["a", "b"]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// Loads values into adapter `name`: `a: [r, in]`, `b: [out, r]` with the adapter's rank.
    /// The values are cast to the adapter's dtype and moved to its device, then copied into its
    /// existing `Var`s (an optimizer holding them sees the new values). Refused while this
    /// adapter is merged (unmerge first).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// let a = Tensor::ones((1, 3), DType::F64, &Device::Cpu)?;
    /// let b = Tensor::ones((2, 1), DType::F64, &Device::Cpu)?;
    /// layer.set_adapter_weights("a", &a, &b)?;
    /// assert_eq!(layer.adapter("a").unwrap().b().to_vec2::<f32>()?, vec![vec![1.0], vec![1.0]]);
    /// assert!(layer.set_adapter_weights("a", &b, &a).is_err()); // shapes swapped
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn set_adapter_weights(&mut self, name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        if self.merged.as_deref() == Some(name) {
            return Err(invalid(format!(
                "adapter {name:?} is merged into the weight: unmerge it before loading"
            )));
        }
        let ad = self
            .adapters
            .get(name)
            .ok_or_else(|| invalid(format!("no adapter named {name:?}")))?;
        self.check_factors(ad.r, a, b)?;
        let (dtype, device) = (ad.a().dtype(), ad.a().device().clone());
        let (a, b) = (
            fresh_copy(a, dtype, &device)?,
            fresh_copy(b, dtype, &device)?,
        );
        ad.a.set(&a)?;
        ad.b.set(&b)?;
        Ok(())
    }

    /// Makes adapter `name` the active one, or none (`None`: the base layer alone). The base
    /// weight is not touched. Errors if no adapter has that name, or while an adapter is merged
    /// and the choice would change (unmerge first).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// layer.set_active(Some("a"))?;
    /// assert_eq!(layer.active(), Some("a"));
    /// layer.set_active(None)?;
    /// assert!(layer.set_active(Some("nope")).is_err());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            if !self.adapters.contains_key(n) {
                return Err(invalid(format!("no adapter named {n:?}")));
            }
        }
        if let Some(m) = &self.merged {
            if name != Some(m.as_str()) {
                return Err(invalid(format!(
                    "adapter {m:?} is merged into the weight: unmerge it before switching"
                )));
            }
        }
        self.active = name.map(str::to_string);
        Ok(())
    }

    /// The active adapter's name, if any.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert_eq!(layer.active(), None);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// The merged adapter's name, if one is merged into the weight.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert_eq!(layer.merged(), None);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn merged(&self) -> Option<&str> {
        self.merged.as_deref()
    }

    /// Switches training mode (LoRA dropout applies only in training mode). Off by default.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let mut layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.set_training(true);
    /// assert!(layer.is_training());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether the layer is in training mode.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let layer = flare::lora::LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// assert!(!layer.is_training());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The active adapter's `A` and `B` `Var`s (in that order), for an optimizer; empty when no
    /// adapter is active. While the adapter is merged, the forward does not use them, so they
    /// get no gradient.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// # let mut layer = LoraLinear::new(Tensor::ones((2, 3), DType::F32, &Device::Cpu)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 1, ..Default::default() }, 0)?;
    /// assert!(layer.trainable_vars().is_empty());
    /// layer.set_active(Some("a"))?;
    /// assert_eq!(layer.trainable_vars().len(), 2);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.active
            .as_ref()
            .and_then(|n| self.adapters.get(n))
            .map(|ad| vec![ad.a.clone(), ad.b.clone()])
            .unwrap_or_default()
    }

    /// The plain base linear `matmul(x, Wᵀ) + bias`.
    fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        check_rank(OP, x, 1)?;
        let inf = x.dims()[x.rank() - 1];
        if inf != self.in_features() {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "x's last dim must equal the weight's in_features (x [..., in], weight [out, in])",
                lhs: x.dims().to_vec(),
                rhs: self.weight.dims().to_vec(),
            });
        }
        if !x.device().same_device(self.weight.device()) {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: device_name(x.device()),
                rhs: device_name(self.weight.device()),
            });
        }
        if x.dtype() != self.weight.dtype() {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: x.dtype(),
                rhs: self.weight.dtype(),
            });
        }
        let y = matmul(x, &self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `y = x Wᵀ + bias (+ s · (x Aᵀ) Bᵀ with the active adapter)`, `x: [..., in]` of the
    /// weight's dtype and device, `y: [..., out]`.
    ///
    /// - An active, unmerged adapter: the fused [`super::lora_linear`]; in training
    ///   mode with dropout > 0, the low-rank path sees `dropout(x)` (not fused yet).
    /// - No active adapter, or the adapter merged into the weight: the base linear
    ///   `flare::ops::matmul(x, Wᵀ) + bias` alone, bit for bit.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let dev = Device::Cpu;
    /// let w = Tensor::randn(0f32, 1.0, (7, 33), &dev)?;
    /// let mut layer = LoraLinear::new(w.clone(), None)?;
    /// let x = Tensor::randn(0f32, 1.0, (5, 33), &dev)?;
    /// let base = flare::ops::matmul(&x, &w.t()?)?;
    /// layer.add_adapter("a", &LoraConfig { r: 4, ..Default::default() }, 0)?;
    /// // Not active: the base layer, exactly.
    /// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, base.to_vec2::<f32>()?);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ad = match (&self.active, &self.merged) {
            (Some(name), None) => self.adapters.get(name),
            _ => None,
        };
        let Some(ad) = ad else {
            return self.base_forward(x);
        };
        if self.training && ad.dropout > 0.0 {
            lora_linear_dropout(
                x,
                &self.weight,
                self.bias.as_ref(),
                ad.a(),
                ad.b(),
                ad.scale,
                ad.dropout,
            )
        } else {
            lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                ad.a(),
                ad.b(),
                ad.scale,
            )
        }
    }

    /// The adapter [`forward`](Self::forward) runs through the fused [`super::lora_linear`]: the
    /// active, unmerged adapter, unless training-mode dropout sends it to the composite.
    pub(crate) fn fused_adapter(&self) -> Option<&LoraAdapter> {
        let ad = match (&self.active, &self.merged) {
            (Some(name), None) => self.adapters.get(name),
            _ => None,
        }?;
        (!(self.training && ad.dropout > 0.0)).then_some(ad)
    }

    /// The dtype merges are computed in: f64 for an f64 base, f32 otherwise.
    fn acc_dtype(&self) -> DType {
        if self.weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Merges the active adapter into the weight: `W ← W + s · B A`, computed in f32 (f64 for
    /// an f64 base) and rounded once to the weight's dtype. The forward is then the base linear
    /// with the merged weight (one GEMM; no gradient reaches the adapter). Errors when no
    /// adapter is active or one is already merged.
    ///
    /// No copy of the original weight is kept (it would double the layer's memory):
    /// [`unmerge`](Self::unmerge) recomputes it, exactly only up to rounding. A caller that needs
    /// the original weight bit for bit should keep the unmerged layer (it is cheap to clone:
    /// tensors are shared) and merge a clone.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let dev = Device::Cpu;
    /// let mut layer = LoraLinear::new(Tensor::randn(0f32, 1.0, (7, 33), &dev)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 4, ..Default::default() }, 0)?;
    /// let a = layer.adapter("a").unwrap().a().clone();
    /// layer.set_adapter_weights("a", &a, &Tensor::ones((7, 4), DType::F32, &dev)?)?;
    /// layer.set_active(Some("a"))?;
    /// let x = Tensor::randn(0f32, 1.0, (5, 33), &dev)?;
    /// let fused = layer.forward(&x)?;
    /// let keep = layer.clone(); // the exact unmerged layer, if needed later
    /// layer.merge()?;
    /// let merged = layer.forward(&x)?;
    /// let err = (&fused - &merged)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 1e-4);
    /// # let _ = keep;
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn merge(&mut self) -> Result<()> {
        if let Some(m) = &self.merged {
            return Err(invalid(format!("adapter {m:?} is already merged")));
        }
        let name = self
            .active
            .clone()
            .ok_or_else(|| invalid("no active adapter to merge".into()))?;
        let ad = &self.adapters[&name];
        let acc = self.acc_dtype();
        let w = (self.weight.to_dtype(acc)? + ad.delta(acc)?)?;
        self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
        self.merged = Some(name);
        Ok(())
    }

    /// Undoes [`merge`](Self::merge): `W ← W − s · B A`, computed in f32 (f64 for an f64 base)
    /// and rounded once. The result equals the original weight only up to rounding: about one
    /// f32 ulp of `|W| + |s · B A|` for an f32 base, and for f16/bf16 the merged weight was
    /// already rounded to the half type, so the restored one may differ from the original by
    /// one half-precision ulp per element. Errors when nothing is merged.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let dev = Device::Cpu;
    /// let w = Tensor::randn(0f32, 1.0, (7, 33), &dev)?;
    /// let mut layer = LoraLinear::new(w.clone(), None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 4, ..Default::default() }, 0)?;
    /// layer.set_active(Some("a"))?;
    /// layer.merge()?;
    /// layer.unmerge()?;
    /// let err = (layer.weight() - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 1e-5);
    /// assert!(layer.unmerge().is_err());
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn unmerge(&mut self) -> Result<()> {
        let name = self
            .merged
            .clone()
            .ok_or_else(|| invalid("no adapter is merged".into()))?;
        let ad = &self.adapters[&name];
        let acc = self.acc_dtype();
        let w = (self.weight.to_dtype(acc)? - ad.delta(acc)?)?;
        self.weight = w.to_dtype(self.weight.dtype())?.contiguous()?;
        self.merged = None;
        Ok(())
    }
}

impl LoraLinear {
    /// Merges the active adapter into the base weight for good and removes every adapter, as
    /// PEFT's `merge_and_unload`: the layer is then a plain linear of `W + s · B A` (computed as
    /// [`merge`](Self::merge) does, rounded once to the base dtype), with nothing to unmerge. A
    /// layer whose active adapter is merged already keeps that weight; one without an active
    /// adapter keeps its weight and only drops its adapters. Returns whether the weight holds a
    /// merged adapter (merged by this call or by an earlier `merge`).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::{LoraConfig, LoraLinear};
    /// let dev = Device::Cpu;
    /// let mut layer = LoraLinear::new(Tensor::randn(0f32, 1.0, (7, 33), &dev)?, None)?;
    /// layer.add_adapter("a", &LoraConfig { r: 4, ..Default::default() }, 0)?;
    /// let a = layer.adapter("a").unwrap().a().clone();
    /// layer.set_adapter_weights("a", &a, &Tensor::ones((7, 4), DType::F32, &dev)?)?;
    /// layer.set_active(Some("a"))?;
    /// let x = Tensor::randn(0f32, 1.0, (5, 33), &dev)?;
    /// let with_adapter = layer.forward(&x)?;
    /// assert!(layer.merge_and_unload()?);
    /// assert!(layer.active().is_none() && layer.adapter("a").is_none());
    /// let err = (&with_adapter - &layer.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 1e-4);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn merge_and_unload(&mut self) -> Result<bool> {
        let merged = match (&self.merged, &self.active) {
            (Some(_), _) => true,
            (None, Some(_)) => {
                self.merge()?;
                true
            }
            (None, None) => false,
        };
        self.adapters.clear();
        self.active = None;
        self.merged = None;
        Ok(merged)
    }
}

impl candle_core::Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        LoraLinear::forward(self, xs).map_err(Error::into_candle)
    }
}
