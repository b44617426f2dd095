//! Launch planning and plumbing shared by the row kernels (softmax, RMSNorm).
//!
//! Every row kernel takes `group`, the number of threads that own one row (see
//! `crates/flare-kernels/src/cu/common.cuh`): a power of two up to 32 for short rows (several
//! rows per 128-thread block, reductions by warp shuffles), a multiple of 32 up to the kernel's
//! block limit for longer ones (one row per block), and the block limit itself for rows too long
//! to keep in registers (the kernel then streams the row). The kernel holds up to `elems`
//! elements per thread in registers, so `group = ceil(cols / elems)` rounded up as above. The
//! kernel itself picks 16-byte or element accesses (alignment and `cols % (16 / size)`); the
//! plan does not depend on it.

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};

/// Block size of the sub-warp path (several rows per block).
const SMALL_BLOCK: usize = 128;
/// The grid's x dimension limit.
const MAX_GRID: usize = i32::MAX as usize;
/// Largest row length the kernels index with 32-bit offsets (with room for one pack past it).
const MAX_COLS: usize = i32::MAX as usize - 64;
/// Dynamic shared memory available to every kernel without opting in.
pub(crate) const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// A row kernel's limits: the `#define`s at the top of its `.cu` file, read through
/// [`flare_kernels::launch`] (generated from them), so host and kernel cannot disagree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowKernel {
    /// Elements per thread in the register path (`*_ELEMS`).
    pub elems: usize,
    /// Threads per block at most (`*_THREADS`, the kernel's `__launch_bounds__`).
    pub max_threads: usize,
}

impl RowKernel {
    /// From the kernel's `*_ELEMS` and `*_THREADS` constants.
    pub(crate) const fn new(elems: u32, max_threads: u32) -> Self {
        RowKernel {
            elems: elems as usize,
            max_threads: max_threads as usize,
        }
    }
}

/// How one launch of a row kernel covers `rows x cols`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowPlan {
    /// Threads per row (the kernel's `group` argument).
    pub group: usize,
    /// Threads per block.
    pub block: usize,
    /// Blocks in the grid; the kernels loop over rows with a grid stride.
    pub grid: usize,
    /// Whether the row fits the register path (`group * elems >= cols`), as the kernel decides.
    pub fits: bool,
}

impl RowPlan {
    /// Plans `rows x cols` (both nonzero) for kernel `k`. `grid_cap` bounds the grid (for
    /// kernels whose per-block state, like dw partial sums, should stay few); otherwise the grid
    /// covers every row once.
    pub(crate) fn new(k: RowKernel, rows: usize, cols: usize, grid_cap: Option<usize>) -> Self {
        let threads = cols.div_ceil(k.elems).max(1);
        let (group, block, rows_per_block) = if threads <= 32 {
            let g = threads.next_power_of_two();
            (g, SMALL_BLOCK, SMALL_BLOCK / g)
        } else if threads <= k.max_threads {
            let g = threads.div_ceil(32) * 32;
            (g, g, 1)
        } else {
            (k.max_threads, k.max_threads, 1)
        };
        let mut grid = rows.div_ceil(rows_per_block);
        if let Some(cap) = grid_cap {
            grid = grid.min(cap);
        }
        RowPlan {
            group,
            block,
            grid: grid.clamp(1, MAX_GRID),
            fits: group * k.elems >= cols,
        }
    }

    /// Rows of dw partial sums the RMSNorm backward writes: one per warp with sub-warp groups
    /// (the groups of a warp are summed first), one per block otherwise.
    pub(crate) fn dw_slots(&self) -> usize {
        if self.group <= 32 {
            self.grid * (self.block / 32)
        } else {
            self.grid
        }
    }

    /// The kernel's `group` argument.
    pub(crate) fn group_arg(&self) -> i32 {
        // At most 1024 by construction.
        self.group as i32
    }

    /// The launch configuration, with `smem` bytes of dynamic shared memory.
    pub(crate) fn config(&self, smem: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid as u32, 1, 1),
            block_dim: (self.block as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }
}

/// Splits a contiguous layout into `(rows, cols)` over its last dimension (a scalar is one row
/// of one column), refusing rows too long for the kernels' 32-bit in-row offsets.
pub(crate) fn rows_cols(op: &'static str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    let cols = l.dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count();
    if cols > MAX_COLS {
        return Err(candle_core::Error::Msg(format!(
            "{op}: rows of {cols} elements are longer than the CUDA kernels support ({MAX_COLS})"
        )));
    }
    let rows = n.checked_div(cols).unwrap_or(0);
    Ok((rows, cols))
}

/// The elements of a contiguous input, from its layout's start offset.
pub(crate) fn input<'a, T: CudaDType>(
    op: &'static str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = crate::ops::contiguous_range(op, l)?;
    let slice = s.as_cuda_slice::<T>()?;
    slice.try_slice(start..end).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: internal error: layout range {start}..{end} outside a buffer of {} elements",
            slice.len()
        ))
    })
}

/// The error for a dtype the CUDA kernels do not implement.
pub(crate) fn unsupported(op: &'static str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?} on cuda (f32, f16 and bf16 are supported)"
    ))
}

/// Refuses a weight whose length is not the row length.
pub(crate) fn check_weight(op: &'static str, lw: &Layout, cols: usize) -> candle_core::Result<()> {
    let n = lw.shape().elem_count();
    if n != cols {
        return Err(candle_core::Error::Msg(format!(
            "{op}: weight of {n} elements for rows of {cols}"
        )));
    }
    Ok(())
}

/// Refuses a second input whose element count differs from the first's.
pub(crate) fn check_same_len(
    op: &'static str,
    what: &'static str,
    a: &Layout,
    b: &Layout,
) -> candle_core::Result<()> {
    let (na, nb) = (a.shape().elem_count(), b.shape().elem_count());
    if na != nb {
        return Err(candle_core::Error::Msg(format!(
            "{op}: {what} has {nb} elements, expected {na}"
        )));
    }
    Ok(())
}
