//! The fused LoRA op's names and the layout of its backward's packed output, read by the op
//! (`mod.rs`) and by its CUDA launchers (`cuda.rs`).

pub(super) const OP: &str = "lora_linear";
pub(super) const OP_BWD: &str = "lora_linear_bwd";
pub(super) const OP_BWD_FACTORS: &str = "lora_linear_bwd_factors";

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

/// Where each gradient sits in the backward op's flat packed outputs (element offsets), and
/// their lengths.
///
/// With factors in the base dtype everything goes into one buffer of that dtype,
/// `[dx | dA | dB]`. With f32 factors on a half-precision base (`split`), `dx` goes into the
/// base-dtype buffer and `dA`, `dB` into a second, f32 buffer `[dA | dB]`: the factors'
/// gradients come out of the GEMMs in f32, never rounded to the half type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed {
    /// `dx: [T, in]`, in the base-dtype buffer.
    pub dx: Option<usize>,
    /// `dA: [ra, in]`, in the factor buffer when split, else in the base-dtype buffer.
    pub da: Option<usize>,
    /// `dB: [out, rb]`, likewise.
    pub db: Option<usize>,
    /// Elements of the base-dtype buffer (0: none is made).
    pub total: usize,
    /// Elements of the factor-dtype buffer (0 unless split and `dA` or `dB` is needed).
    pub factor_total: usize,
}

impl Packed {
    /// The layout for `x: [t, inf]`, `A: [ra, inf]`, `B: [out, rb]` (`ra = rb` but for a grouped
    /// op, whose `A` stacks one `[rb, in]` factor per group).
    pub(crate) fn new(
        t: usize,
        inf: usize,
        out: usize,
        (ra, rb): (usize, usize),
        need: Needs,
        split: bool,
    ) -> Packed {
        fn take(off: &mut usize, needed: bool, len: usize) -> Option<usize> {
            needed.then(|| {
                let o = *off;
                *off = (*off + len).div_ceil(PACK_ALIGN) * PACK_ALIGN;
                o
            })
        }
        let (mut base, mut factors) = (0, 0);
        let dx = take(&mut base, need.dx, t * inf);
        let fo = if split { &mut factors } else { &mut base };
        let da = take(fo, need.da, ra * inf);
        let db = take(fo, need.db, out * rb);
        Packed {
            dx,
            da,
            db,
            total: base,
            factor_total: factors,
        }
    }

    /// Whether the backward makes both buffers: the op returns the base-dtype one and hands
    /// the factor one over through a second op (see `LoraBwdFactors`).
    pub(crate) fn two_buffers(&self) -> bool {
        self.total > 0 && self.factor_total > 0
    }
}
