//! [`KvCache`]: the preallocated key/value cache of a [`super::Transformer`] for incremental
//! decoding.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

const OP: &str = "KvCache";

/// The keys and values of one layer: `[batch, kv_heads, max_len, head_dim]` each, allocated
/// once; positions `0..len` of the owning [`KvCache`] are valid.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// The keys, after RoPE.
    pub k: Tensor,
    /// The values.
    pub v: Tensor,
}

/// A key/value cache for every layer of a model, allocated once for `max_len` positions.
///
/// [`Transformer::forward_with_cache`](super::Transformer::forward_with_cache) writes the keys
/// and values of the new positions into it in place (no copy of the prefix, no re-running of
/// it) and advances [`len`](Self::len); it errors when the new positions do not fit.
///
/// Not `Clone`: the tensors are written in place, so a copy would share (and corrupt) them.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    batch: usize,
    max_len: usize,
    len: usize,
    /// Left padding per row (set by a padded prefill); `None`: no row is padded.
    pads: Option<Vec<usize>>,
}

impl KvCache {
    /// A zeroed cache of `layers` layers, each `[batch, kv_heads, max_len, head_dim]` in
    /// `dtype` on `device`. Usually made by
    /// [`Transformer::new_cache`](super::Transformer::new_cache).
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        max_len: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if batch == 0 || max_len == 0 {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("batch ({batch}) and max_len ({max_len}) must be positive"),
            });
        }
        // Allocated untracked (see `crate::runtime::init`).
        crate::runtime::init(device)?;
        let shape = (batch, kv_heads, max_len, head_dim);
        let layers = (0..layers)
            .map(|_| {
                Ok(LayerKv {
                    k: Tensor::zeros(shape, dtype, device)?,
                    v: Tensor::zeros(shape, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            batch,
            max_len,
            len: 0,
            pads: None,
        })
    }

    /// The number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of positions the cache can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The batch size the cache was allocated for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The per-layer keys and values (positions `len..max_len` are stale or zero).
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// Forgets every cached position and the padding (the memory is kept for reuse).
    pub fn reset(&mut self) {
        self.len = 0;
        self.pads = None;
    }

    /// The left padding of each row, when the cache was filled by
    /// [`Transformer::prefill_padded`](super::Transformer::prefill_padded) with rows of
    /// different lengths: positions `0..pads[r]` of row `r` are padding, never attended to.
    pub fn pads(&self) -> Option<&[usize]> {
        self.pads.as_deref()
    }

    /// Sets the rows' left padding (at prefill).
    pub(crate) fn set_pads(&mut self, pads: Option<Vec<usize>>) {
        self.pads = pads;
    }

    /// Checks that `new` positions for `batch` sequences fit, with `layers` layers.
    pub(crate) fn check_append(&self, layers: usize, batch: usize, new: usize) -> Result<()> {
        if layers != self.layers.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "the cache has {} layers, the model {layers}",
                    self.layers.len()
                ),
            });
        }
        if batch != self.batch {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "the cache is for batch {}, the input has batch {batch}",
                    self.batch
                ),
            });
        }
        if self.len + new > self.max_len {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "cache full: {} cached + {new} new positions > max_len {}",
                    self.len, self.max_len
                ),
            });
        }
        Ok(())
    }

    /// Writes `k, v: [batch, kv_heads, new, head_dim]` of layer `layer` at positions
    /// `len..len + new` and returns views (no copy) of the keys and values of positions
    /// `first..len + new`, each `[batch * kv_heads, len + new - first, head_dim]` with a batch
    /// stride of `max_len * head_dim`. Does not advance `len` (see [`advance`](Self::advance)).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        first: usize,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::InvalidArgument {
                op: OP,
                msg: format!("layer {layer} out of range ({} layers)", self.layers.len()),
            })?;
        l.k.slice_set(&k.contiguous()?, 2, self.len)?;
        l.v.slice_set(&v.contiguous()?, 2, self.len)?;
        let total = self.len + new;
        let first = first.min(total.saturating_sub(1));
        let view = |t: &Tensor| -> Result<Tensor> {
            let (b, h, m, d) = t.dims4()?;
            Ok(t.reshape((b * h, m, d))?.narrow(1, first, total - first)?)
        };
        Ok((view(&l.k)?, view(&l.v)?))
    }

    /// Marks `new` more positions as cached.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
