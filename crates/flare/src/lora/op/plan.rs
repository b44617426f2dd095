//! The fused LoRA op's names and the layout of its backward's packed output, read by the op
//! (`mod.rs`) and by its CUDA launchers (`cuda.rs`).

pub(super) const OP: &str = "lora_linear";
pub(super) const OP_BWD: &str = "lora_linear_bwd";

/// Each piece of the packed backward output starts on a multiple of this many elements, so that
/// the GEMMs writing it see aligned pointers (16 elements: 32 bytes at half precision).
const PACK_ALIGN: usize = 16;

/// Which gradients the backward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Needs {
    /// The input's.
    pub dx: bool,
    /// `A`'s.
    pub da: bool,
    /// `B`'s.
    pub db: bool,
}

/// Where each gradient sits in the backward op's flat packed output (element offsets), and its
/// total length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed {
    /// `dx: [T, in]`.
    pub dx: Option<usize>,
    /// `dA: [r, in]`.
    pub da: Option<usize>,
    /// `dB: [out, r]`.
    pub db: Option<usize>,
    /// Elements of the packed buffer.
    pub total: usize,
}

impl Packed {
    pub(crate) fn new(t: usize, inf: usize, out: usize, r: usize, need: Needs) -> Packed {
        let mut off = 0;
        let mut take = |needed: bool, len: usize| {
            needed.then(|| {
                let o = off;
                off = (off + len).div_ceil(PACK_ALIGN) * PACK_ALIGN;
                o
            })
        };
        let dx = take(need.dx, t * inf);
        let da = take(need.da, r * inf);
        let db = take(need.db, out * r);
        Packed {
            dx,
            da,
            db,
            total: off,
        }
    }
}
