//! [`MatLayout`]: how a GEMM operand sits in memory, read by the op (to decide what runs in
//! place) and by its CUDA launcher (to set up cuBLASLt and `gemm_small`).

use candle_core::Layout;

/// How one operand of a GEMM sits in memory: which transpose flag it needs, its leading
/// dimension, its batch stride and its first element. Only layouts that a strided-batched GEMM
/// can read directly are described; others are made contiguous before the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatLayout {
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// `false`: row-major (`[rows, cols]` with unit column stride); `true`: the matrix is stored
    /// column-major (a transposed view of a row-major one).
    pub transposed: bool,
    /// Leading dimension: distance between consecutive rows (row-major) or columns
    /// (column-major), in elements.
    pub ld: usize,
    /// Distance between consecutive matrices of the batch (0 for a broadcast operand).
    pub batch_stride: usize,
    /// Number of matrices (product of the batch dims; 1 for a 2-D operand).
    pub batch: usize,
    /// Rows of the (logical) matrix.
    pub rows: usize,
    /// Columns of the (logical) matrix.
    pub cols: usize,
}

impl MatLayout {
    /// Describes a layout of rank 2 or 3, or returns `None` if a GEMM cannot read it in place.
    pub fn of(l: &Layout) -> Option<MatLayout> {
        let dims = l.dims();
        let strides = l.stride();
        let r = dims.len();
        if !(2..=3).contains(&r) {
            return None;
        }
        let (rows, cols) = (dims[r - 2], dims[r - 1]);
        if rows == 0 || cols == 0 {
            // Nothing is read: any leading dimension the GEMM accepts will do.
            let batch = if r == 3 { dims[0] } else { 1 };
            return Some(MatLayout {
                offset: l.start_offset(),
                transposed: false,
                ld: cols.max(1),
                batch_stride: rows * cols,
                batch,
                rows,
                cols,
            });
        }
        let (rs, cs) = (strides[r - 2], strides[r - 1]);
        let (batch, batch_stride) = if r == 3 {
            let b = dims[0];
            (b, if b == 1 { rows * cols } else { strides[0] })
        } else {
            (1, rows * cols)
        };
        // A dimension of size 1 has a meaningless stride: choose the one that fits.
        let row_major = (cs == 1 || cols == 1) && (rows == 1 || rs >= cols.max(1));
        let col_major = (rs == 1 || rows == 1) && (cols == 1 || cs >= rows.max(1));
        let (transposed, ld) = if row_major {
            (
                false,
                if rows == 1 {
                    cols.max(1)
                } else {
                    rs.max(cols).max(1)
                },
            )
        } else if col_major {
            (
                true,
                if cols == 1 {
                    rows.max(1)
                } else {
                    cs.max(rows).max(1)
                },
            )
        } else {
            return None;
        };
        Some(MatLayout {
            offset: l.start_offset(),
            transposed,
            ld,
            batch_stride,
            batch,
            rows,
            cols,
        })
    }
}
