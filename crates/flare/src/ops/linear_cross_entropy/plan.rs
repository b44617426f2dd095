//! The op's names and its chunking rule, shared by its public function, CPU and CUDA sides.

use candle_core::DType;

pub(super) const OP: &str = "linear_cross_entropy";
pub(super) const OP_BWD: &str = "linear_cross_entropy backward";

/// The most bytes one chunk's logits may take: 256 MiB.
pub const CHUNK_BYTES: usize = 256 << 20;

/// Chunks of at least this many rows are rounded down to a multiple of it, so that the GEMMs of
/// full chunks keep tile-friendly shapes.
const CHUNK_ALIGN: usize = 64;

/// The token rows of one chunk for `n` tokens over a vocabulary of `vocab` in `dtype` (the
/// logits' dtype: the hidden states'): as many rows as fit [`CHUNK_BYTES`] of logits, rounded
/// down to a multiple of 64 when that leaves at least 64, at least one, at most `n` (at least
/// one). At Llama-3.1-8B's 128,256 columns in bf16 this is 1,024 rows (250.5 MiB); at
/// Qwen2's 151,936, 832 rows (241 MiB); in f32, half as many.
pub fn chunk_rows(n: usize, vocab: usize, dtype: DType) -> usize {
    let per_row = vocab.max(1) * dtype.size_in_bytes();
    let mut rows = (CHUNK_BYTES / per_row).max(1);
    if rows >= CHUNK_ALIGN {
        rows = rows / CHUNK_ALIGN * CHUNK_ALIGN;
    }
    rows.min(n.max(1))
}

/// What one call computes, decided by the public function from the inputs' autograd state.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// The ignored target id.
    pub ignore: u32,
    /// Token rows per chunk (at least 1).
    pub chunk: usize,
    /// Whether `d(hidden)` is computed (the hidden states take part in autograd).
    pub need_dh: bool,
    /// Whether `d(weight)` is computed (the weight takes part in autograd).
    pub need_dw: bool,
}

/// `[n, h]` hidden states against `[vocab, h]` weight rows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    /// Token rows.
    pub n: usize,
    /// Hidden size (the reduction of the logits' GEMM).
    pub h: usize,
    /// Vocabulary rows of the weight.
    pub vocab: usize,
}

impl Dims {
    /// The chunks `(first row, rows)` covering `0..n`.
    pub fn chunks(&self, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
        let (n, chunk) = (self.n, chunk.max(1));
        (0..n.div_ceil(chunk)).map(move |i| {
            let start = i * chunk;
            (start, chunk.min(n - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rule() {
        assert_eq!(chunk_rows(1 << 20, 128_256, DType::BF16), 1024);
        assert_eq!(chunk_rows(1 << 20, 151_936, DType::BF16), 832);
        assert_eq!(chunk_rows(1 << 20, 151_936, DType::F32), 384);
        assert_eq!(chunk_rows(10, 151_936, DType::F32), 10);
        assert_eq!(chunk_rows(0, 7, DType::F32), 1);
        assert!(chunk_rows(1 << 20, 128_256, DType::BF16) * 128_256 * 2 <= CHUNK_BYTES);
        let d = Dims {
            n: 7,
            h: 1,
            vocab: 1,
        };
        let c: Vec<_> = d.chunks(3).collect();
        assert_eq!(c, vec![(0, 3), (3, 3), (6, 1)]);
    }
}
