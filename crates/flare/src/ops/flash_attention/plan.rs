//! [`FaPlan`]: the validated geometry of one flash-attention call (sequence offsets, heads,
//! mask), read by the CPU forward and backward, by the composed paths in `mod.rs` and by the
//! CUDA launchers (`cu/flash_attention.cu` takes the same offsets, heads and mask); the
//! kernel's launch geometry ([`fwd_block_rows`], [`bwd_smem_bytes`]); and [`Carry`], what the
//! forward leaves in its op for the backward (the logsumexp `L`).

use std::sync::Mutex;

use candle_core::Layout;

pub(super) const OP: &str = "flash_attention";
pub(super) const OP_BWD: &str = "flash_attention_bwd";

/// Keys per tile of the CPU loops (the CUDA kernel's `FA_BN`).
pub(super) const BN: usize = 64;

/// Threads per forward block (`FA_THREADS`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const FA_THREADS: u32 = flare_kernels::launch::FA_THREADS;

/// Query rows per forward block: `FA_FWD_BM(D)` of `cu/flash_attention.cu`, a function-like
/// macro the launch-constant export cannot carry, mirrored here (the test below holds the
/// mirror to the kernel file's text).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn fwd_block_rows(d: usize) -> usize {
    if d == 128 {
        64
    } else {
        128
    }
}

/// Query rows per backward tile: `FA_BWD_BM(D)` (mirrored, as [`fwd_block_rows`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn bwd_block_rows(_d: usize) -> usize {
    32
}

/// Keys per backward block: `FA_BWD_BN(D)` (mirrored): the grid's first dimension is
/// `ceil(max_sk / bwd_block_keys(D))`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn bwd_block_keys(_d: usize) -> usize {
    128
}

/// Threads per backward block: `FA_BWD_THREADS(D)` (mirrored): 4 warps of two 16-key tiles at
/// D = 64, 8 warps of one at D = 128.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn bwd_threads(d: usize) -> u32 {
    if d == 64 {
        128
    } else {
        256
    }
}

/// Dynamic shared memory of the backward kernel in bytes: `FA_BWD_SMEM(D)` (mirrored): the
/// K and V tiles and two Q and two dO tiles with rows padded to `D + 8` 2-byte elements, two
/// dSᵀ `[BN][BM + 8]`, and two `L` and two `D` vectors of the query tile in f32. Over 48 KiB
/// for both head dims (the launcher raises the limit once per function).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn bwd_smem_bytes(d: usize) -> usize {
    let bn = bwd_block_keys(d);
    let bm = bwd_block_rows(d);
    (2 * bn * (d + 8) + 4 * bm * (d + 8) + 2 * bn * (bm + 8)) * 2 + 4 * bm * 4
}

/// Resident backward blocks per multiprocessor on sm_90 (registers bound them: 255 per thread
/// at D = 64, 4 warps: two blocks; 246 at D = 128, 8 warps: one), as the kernel's header
/// records.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const fn bwd_blocks_per_sm(d: usize) -> usize {
    if d == 64 {
        2
    } else {
        1
    }
}

/// The backward grid [`FaPlan::bwd_split`] aims for, in waves of resident blocks. Measured on
/// an H100 (`bench/dev/flash_attention_check.cu`, backward kernel alone): splitting a grid of
/// less than one wave pays (B4 H14/KV2 T512 D64, 32 blocks: 0.307 → 0.070 ms with 7 parts;
/// B8 T1024, 128 blocks: 0.607 → 0.271 ms), splitting one of about two waves does not (B1
/// H32/KV8 T4096 D128, 256 blocks: 1.706 ms whole, 1.780 in 2 parts, 1.821 in 4).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const BWD_MIN_WAVES: usize = 1;

/// The head dims the CUDA kernel is instantiated for.
pub(crate) const KERNEL_HEAD_DIMS: [usize; 2] = [64, 128];

/// What the forward leaves in its op instance for the backward. Candle's graph keeps the op
/// (`Arc<Box<dyn CustomOp3>>`) and hands it to `bwd(&self, ..)`, so the forward fills this and
/// the backward reads it: `L` travels without a second output and is never recomputed. Read,
/// not taken: a second `backward()` over the same graph finds it again.
pub(crate) type Carry = Mutex<Option<Saved>>;

/// The forward's logsumexp `L = logsumexp_j(scale · q_i·k_j)` per query head and row,
/// `[hq, total_q]` (the kernel's layout), `-inf` for a row that sees no key.
pub(crate) enum Saved {
    /// The CPU op's `L`, in f64 (exact for its f32 accumulators).
    Host(Vec<f64>),
    /// The CUDA kernel's `L` (f32) and the offsets uploaded for the forward,
    /// `[cu_q (batch + 1), cu_k (batch + 1)]` as i32, reused by the backward.
    #[cfg(feature = "cuda")]
    Device {
        /// `L`, `[hq, total_q]`.
        lse: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        /// `cu_q` then `cu_k`.
        cu: candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>,
    },
    /// cuDNN's softmax statistics (`L` in its layout, `[batch, hq, s]`, f32), when the forward
    /// ran on cuDNN (`cudnn.rs`); the backward then runs there too.
    #[cfg(feature = "cuda")]
    Cudnn {
        /// `L`, `[batch, hq, s]`.
        stats: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    },
}

/// One call's geometry, checked by `flash_attention` before anything runs.
#[derive(Debug, Clone)]
pub(crate) struct FaPlan {
    /// Query heads.
    pub hq: usize,
    /// Key / value heads (`hq` is a multiple of it).
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
    /// Query rows of all sequences.
    pub total_q: usize,
    /// Key rows of all sequences.
    pub total_k: usize,
    /// Query offsets, `batch + 1` entries from 0 to `total_q`.
    pub cu_q: Vec<usize>,
    /// Key offsets, `batch + 1` entries from 0 to `total_k`.
    pub cu_k: Vec<usize>,
    /// Causal mask, bottom-right aligned.
    pub causal: bool,
    /// Keys visible to the left of the diagonal (`None`: all).
    pub window: Option<usize>,
    /// The factor of `q kᵀ`.
    pub scale: f64,
}

impl FaPlan {
    /// Sequences.
    pub(crate) fn batch(&self) -> usize {
        self.cu_q.len().saturating_sub(1)
    }

    /// The longest sequence of queries and of keys.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn max_lens(&self) -> (usize, usize) {
        (0..self.batch()).fold((0, 0), |(mq, mk), b| {
            let (_, sq, _, sk) = self.seq(b);
            (mq.max(sq), mk.max(sk))
        })
    }

    /// The window as the kernel's `int` argument: `-1` for none, and for a window that no row
    /// can reach past (`w >= ` the longest key sequence: every key stays visible), so that the
    /// kernel's `i + off - w` cannot overflow.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn window_arg(&self) -> i32 {
        match self.window {
            Some(w) if w < self.max_lens().1 => w as i32,
            _ => -1,
        }
    }

    /// Query heads per key / value head.
    pub(crate) fn group(&self) -> usize {
        self.hq / self.hkv.max(1)
    }

    /// Into how many blocks the backward splits each GQA group's query heads (a divisor of
    /// [`group`](Self::group); 1: one block per (key block, kv head, sequence), dK / dV
    /// written directly). The backward parallelises over key blocks and kv heads, so a model
    /// with few kv heads at a short length leaves most of the GPU idle (Qwen2-0.5B, 2 kv heads,
    /// 4 x 512 tokens: 32 blocks for 132 multiprocessors). The smallest divisor that gives at
    /// least [`BWD_MIN_WAVES`] wave of `sm_count · bwd_blocks_per_sm(d)` blocks, or the
    /// whole group when none does. A split > 1 costs a zero fill and a conversion of f32 dK /
    /// dV sums (`2 · total_k · hkv · d` floats) and their atomic adds.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn bwd_split(&self, sm_count: usize) -> usize {
        let g = self.group().max(1);
        let (_, max_sk) = self.max_lens();
        let blocks = max_sk.div_ceil(bwd_block_keys(self.d)) * self.hkv * self.batch();
        let want = BWD_MIN_WAVES * sm_count * bwd_blocks_per_sm(self.d);
        if blocks == 0 {
            return 1;
        }
        (1..=g)
            .filter(|s| g % s == 0)
            .find(|s| blocks * s >= want)
            .unwrap_or(g)
    }

    /// `(q0, sq, k0, sk)`: where sequence `b` starts in `q` and `k` and how long it is.
    pub(crate) fn seq(&self, b: usize) -> (usize, usize, usize, usize) {
        let (q0, k0) = (self.cu_q[b], self.cu_k[b]);
        (q0, self.cu_q[b + 1] - q0, k0, self.cu_k[b + 1] - k0)
    }

    /// The keys `lo..hi` that query row `i` of a sequence of `sq` queries and `sk` keys sees
    /// (empty when `lo >= hi`). With `off = sk - sq` the diagonal of row `i` is key `i + off`
    /// (bottom-right alignment, as FlashAttention-2): causal keeps `j <= i + off`, a window `w`
    /// keeps `j >= i + off - w`. The same rule as the CUDA kernel's header.
    #[inline]
    pub(crate) fn keys(&self, i: usize, sq: usize, sk: usize) -> (usize, usize) {
        let diag = i as i64 + sk as i64 - sq as i64;
        let clamp = |x: i64| x.clamp(0, sk as i64) as usize;
        let hi = if self.causal { clamp(diag + 1) } else { sk };
        let lo = match self.window {
            Some(w) => clamp(diag - w as i64),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Checks that the kernels' inputs have the planned shapes: `q` (or `[n, total_q, hq, d]`
    /// stacked query-shaped tensors) and `k`, `v`, all contiguous. Returns the element ranges.
    pub(super) fn ranges(
        &self,
        op: &'static str,
        layouts: [&Layout; 3],
        stacked_q: usize,
    ) -> candle_core::Result<[(usize, usize); 3]> {
        let mut want_q = vec![self.total_q, self.hq, self.d];
        if stacked_q > 0 {
            want_q.insert(0, stacked_q);
        }
        let want_k = [self.total_k, self.hkv, self.d];
        let [lq, lk, lv] = layouts;
        if lq.dims() != want_q || lk.dims() != want_k || lv.dims() != want_k {
            return Err(candle_core::Error::Msg(format!(
                "{op}: internal error: planned q {want_q:?}, k/v {want_k:?}, got {:?}, {:?}, {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )));
        }
        Ok([
            crate::ops::contiguous_range(op, lq)?,
            crate::ops::contiguous_range(op, lk)?,
            crate::ops::contiguous_range(op, lv)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's function-like launch macros, as the mirrors above were written against.
    /// If this fails, `cu/flash_attention.cu` changed its tiling: update [`fwd_block_rows`],
    /// [`bwd_block_rows`] and [`bwd_smem_bytes`] with it (a smaller shared-memory size than the
    /// kernel uses would corrupt memory).
    #[test]
    fn launch_mirrors_match_the_kernel_file() {
        let src = include_str!("../../../../flare-kernels/src/cu/flash_attention.cu");
        // Each `#define NAME(D) ...` with its continuation lines, whitespace collapsed.
        let define = |name: &str| -> String {
            let start = src
                .find(&format!("#define {name}(D)"))
                .unwrap_or_else(|| panic!("#define {name}(D) not in flash_attention.cu"));
            let mut text = String::new();
            for line in src[start..].lines() {
                let more = line.trim_end().ends_with('\\');
                text.push_str(line.trim_end().trim_end_matches('\\'));
                text.push(' ');
                if !more {
                    break;
                }
            }
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        assert_eq!(
            define("FA_FWD_BM"),
            "#define FA_FWD_BM(D) ((D) == 128 ? 64 : 128)"
        );
        assert_eq!(define("FA_BWD_BM"), "#define FA_BWD_BM(D) 32");
        assert_eq!(define("FA_BWD_BN"), "#define FA_BWD_BN(D) 128");
        assert_eq!(
            define("FA_BWD_THREADS"),
            "#define FA_BWD_THREADS(D) ((D) == 64 ? 128 : 256)"
        );
        assert_eq!(
            define("FA_BWD_SMEM"),
            "#define FA_BWD_SMEM(D) ((2 * FA_BWD_BN(D) * ((D) + 8) + 4 * FA_BWD_BM(D) * ((D) + 8) + \
             2 * FA_BWD_BN(D) * (FA_BWD_BM(D) + 8)) * 2 + 4 * FA_BWD_BM(D) * 4)"
        );
        assert_eq!((fwd_block_rows(64), fwd_block_rows(128)), (128, 64));
        assert_eq!((bwd_threads(64), bwd_threads(128)), (128, 256));
        // Both head dims need the opt-in shared-memory attribute (over 48 KiB).
        assert_eq!(bwd_smem_bytes(64), 76_288);
        assert_eq!(bwd_smem_bytes(128), 125_440);
    }

    #[test]
    fn bwd_split_fills_the_gpu_with_few_kv_heads() {
        let plan = |hq, hkv, d, batch: usize, len: usize| FaPlan {
            hq,
            hkv,
            d,
            total_q: batch * len,
            total_k: batch * len,
            cu_q: (0..=batch).map(|b| b * len).collect(),
            cu_k: (0..=batch).map(|b| b * len).collect(),
            causal: true,
            window: None,
            scale: 1.0,
        };
        // Qwen2-0.5B (14 / 2 heads, d 64) at 4 x 512: 32 blocks; 7 is the only divisor > 1.
        assert_eq!(plan(14, 2, 64, 4, 512).bwd_split(132), 7);
        // 8 x 1024: 128 blocks, still under one wave of 2 x 132.
        assert_eq!(plan(14, 2, 64, 8, 1024).bwd_split(132), 7);
        // Llama-3.1-8B (32 / 8, d 128, one block per SM): 1 x 4096 is 256 blocks, enough; at
        // 1 x 512 (32 blocks) the group of 4 splits in 4 (128 < 132 still: the whole group).
        assert_eq!(plan(32, 8, 128, 1, 4096).bwd_split(132), 1);
        assert_eq!(plan(32, 8, 128, 1, 512).bwd_split(132), 4);
        assert_eq!(plan(32, 8, 128, 2, 512).bwd_split(132), 4);
        assert_eq!(plan(32, 8, 128, 3, 512).bwd_split(132), 2);
        // No GQA: nothing to split.
        assert_eq!(plan(14, 14, 64, 8, 1024).bwd_split(132), 1);
        // Every answer divides the group; an empty batch splits nothing.
        for (hq, hkv) in [(12, 2), (8, 1), (28, 4)] {
            let s = plan(hq, hkv, 64, 1, 300).bwd_split(132);
            assert_eq!((hq / hkv) % s, 0, "{hq}/{hkv}: {s}");
        }
        assert_eq!(plan(8, 2, 64, 0, 0).bwd_split(132), 1);
    }

    #[test]
    fn window_arg_and_max_lens() {
        let plan = |window| FaPlan {
            hq: 2,
            hkv: 1,
            d: 64,
            total_q: 9,
            total_k: 12,
            cu_q: vec![0, 4, 4, 9],
            cu_k: vec![0, 3, 5, 12],
            causal: true,
            window,
            scale: 0.125,
        };
        assert_eq!(plan(None).max_lens(), (5, 7));
        assert_eq!(plan(None).window_arg(), -1);
        assert_eq!(plan(Some(6)).window_arg(), 6);
        // A window as long as the longest key sequence hides nothing: no window.
        assert_eq!(plan(Some(7)).window_arg(), -1);
        assert_eq!(plan(Some(usize::MAX)).window_arg(), -1);
    }
}
