//! The steps of the fused LoRA MLP on CUDA ([`super::lora_swiglu_mlp`]): every low-rank term
//! folded into the reduction of a frozen GEMM, written once over [`FoldOps`]. `mlp_cuda.rs`
//! runs them on the GPU (cuBLASLt, flare's kernels); the tests below run them on a float64
//! emulation of the same operations, which checks every offset, leading dimension and
//! transpose flag against a reference on any machine.
//!
//! Sizes: `T` tokens, hidden `h`, intermediate `I`, ranks `r` (gate, up) and `r2` (down), `S`
//! spare elements ([`MLP_SPARE`]). The weights are stored padded ([`super::MlpWeights`]):
//! `WGU [2I + S, h + S]` holds `W_gu` in its top-left `[2I, h]`, and `WD [h + S, I + S]`
//! holds `W_d` likewise. A call writes the factors (in the base dtype) into the spare parts:
//! `B_g` and `B_u` block-diagonally into columns `h .. h + 2r` of gate's and up's rows (the
//! other block zeroed), `A_gu` into rows `2I .. 2I + 2r`; `B_d` into columns `I .. I + r2`,
//! `A_d` into rows `h .. h + r2`. The `B`s are written by the forward, which reads them, and
//! the `A`s by the backward, which reads them: no value crosses from one call to another, and
//! nothing else in the spare parts is read.
//!
//! Forward:
//! 1. `XP [T, h + S]`: `x` copied into its first `h` columns; `s_gu · x A_guᵀ` into the next
//!    `2r` (one GEMM, `ldc = h + S`), and from there into `H [T, 2r]` for the backward.
//! 2. `yb = XP[:, :h + 2r] · WGU[:2I, :h + 2r]ᵀ`: `x W_guᵀ` plus both low-rank terms, one GEMM.
//! 3. `ACTP [T, I + S]`: the SwiGLU kernel writes `act` into its first `I` columns; one GEMM
//!    writes `s_d · act A_dᵀ` into the next `r2`.
//! 4. `y = ACTP[:, :I + r2] · WD[:h, :I + r2]ᵀ`.
//!
//! Backward, from `dy [T, h]`:
//! 1. `DYP [T, h + S]`: `dy` copied in; `G_d = s_d · dy B_d` into the next `r2` columns.
//! 2. `dact = DYP[:, :h + r2] · WD[:h + r2, :I]` (`dy W_d + G_d A_d`, one GEMM).
//! 3. `dA_d = G_dᵀ act`, `dB_d = dyᵀ (s_d act A_dᵀ)`.
//! 4. `DGUP [T, 2I + S]`: the SwiGLU backward writes `d[gate | up]` into its first `2I`
//!    columns; `G_g = s_gu · d gate B_g` and `G_u` into the next `2r` (one GEMM each).
//! 5. `dx = DGUP[:, :2I + 2r] · WGU[:2I + 2r, :h]` (one GEMM), `dA_gu = G_guᵀ x`,
//!    `dB_g = d gateᵀ (s_gu x A_gᵀ)`, `dB_u` likewise.
//!
//! Every GEMM is column-major (cuBLASLt's): a row-major `[rows, cols]` buffer with row stride
//! `ld` read column-major is its transpose, `cols × rows` with leading dimension `ld`.

use super::internal;
use super::mlp::{MlpDims, MLP_SPARE};

/// The spare elements `S` after every row (and the spare rows) of the padded buffers.
pub(crate) const S: usize = MLP_SPARE;

/// The buffers of one forward and backward. Those of the factor dtype (`Factors`) hold f32
/// when the factors are f32 on a half base; every other one holds the base dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Buf {
    /// `x [T, h]`.
    X,
    /// `dy [T, h]`.
    Dy,
    /// The `A` pack in the base dtype: `A_gu [2r, h]` then `A_d [r2, I]`.
    A,
    /// The `B` pack in the base dtype: `B_gu [2I, r]` then `B_d [h, r2]`.
    B,
    /// The padded gate/up weight `[2I + S, h + S]`.
    Wgu,
    /// The padded down weight `[h + S, I + S]`.
    Wd,
    /// `r` zeros (the off-diagonal blocks of gate/up's `B` columns).
    Zeros,
    /// `[T, h + S]`.
    Xp,
    /// `s_gu · x A_guᵀ`, `[T, 2r]`, kept for the backward.
    Hgu,
    /// `x W_guᵀ` with the low-rank terms, `[T, 2I]`, kept for the backward.
    Yb,
    /// `[T, I + S]`: `act`, then `s_d · act A_dᵀ`; kept for the backward.
    Actp,
    /// `y [T, h]`.
    Y,
    /// `[T, h + S]`.
    Dyp,
    /// `dact [T, I]`.
    Dact,
    /// `[T, 2I + S]`.
    Dgup,
    /// `dx [T, h]`.
    Dx,
    /// The factor gradients as [`MlpDims::grad_len`] lays them out.
    Factors,
}

/// Element `off` of buffer `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    pub buf: Buf,
    pub off: usize,
}

fn at(buf: Buf, off: usize) -> At {
    At { buf, off }
}

/// One plain column-major GEMM of the steps: `C[m, n] = alpha · op(A) op(B)` with `beta = 0`,
/// `A` and `B` of the base dtype, `C` of the base dtype or, for a factor gradient of f32
/// factors, f32 (cuBLASLt's `GemmParams` with `c_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gemm {
    /// `C` is f32 (a factor gradient of f32 factors on a half base).
    pub c_f32: bool,
    /// Whether `A` is used transposed.
    pub transa: bool,
    /// Whether `B` is used transposed.
    pub transb: bool,
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// Leading dimensions of `A`, `B`, `C`.
    pub lda: usize,
    /// See `lda`.
    pub ldb: usize,
    /// See `lda`.
    pub ldc: usize,
}

/// The operations the steps are written in. Implementations check that every element an
/// operation reads or writes lies inside its buffer.
pub(crate) trait FoldOps {
    /// `C = alpha · op(A) op(B)` (see [`Gemm`]; `C` is written, not read).
    fn gemm(&mut self, p: &Gemm, a: At, b: At, c: At, alpha: f32) -> candle_core::Result<()>;

    /// `rows x width` elements from `src` (rows `xs` apart; 0 reads the same elements for
    /// every row) to `dst` (rows `ys` apart): `dims = [rows, width, xs, ys]`.
    fn copy_rows(&mut self, src: At, dst: At, dims: [usize; 4]) -> candle_core::Result<()>;

    /// `act[r, c] = silu(g) · u` with `g = yb[r, c]`, `u = yb[r, cols + c]` (`yb` rows `2 cols`
    /// apart), `act`'s rows `ldy` apart.
    fn swiglu_fwd(
        &mut self,
        yb: At,
        act: At,
        rows: usize,
        cols: usize,
        ldy: usize,
    ) -> candle_core::Result<()>;

    /// SwiGLU's backward: `d gate` and `d up` of `yb` (as in [`swiglu_fwd`](Self::swiglu_fwd))
    /// from `dact` (`[rows, cols]`) into `dgu`'s rows (`ldo` apart: `d gate` then `d up`).
    fn swiglu_bwd(
        &mut self,
        yb: At,
        dact: At,
        dgu: At,
        rows: usize,
        cols: usize,
        ldo: usize,
    ) -> candle_core::Result<()>;
}

/// The sizes of one call and where its factors start in the packs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fold {
    pub d: MlpDims,
    /// Tokens.
    pub t: usize,
    /// Whether the factor gradients are f32 (f32 factors on a half base).
    pub split: bool,
    /// Where the `A` pack's data start in its buffer.
    pub a0: usize,
    /// Where the `B` pack's data start in its buffer.
    pub b0: usize,
    /// The scale of gate and up.
    pub s_gu: f32,
    /// The scale of down.
    pub s_d: f32,
}

impl Fold {
    /// One GEMM; `factor`: its `C` is a factor gradient (f32 when the factors are).
    fn params(
        &self,
        factor: bool,
        (transa, transb): (bool, bool),
        [m, n, k]: [usize; 3],
        [lda, ldb, ldc]: [usize; 3],
    ) -> Gemm {
        Gemm {
            c_f32: factor && self.split,
            transa,
            transb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        }
    }

    /// Element counts of the buffers the caller allocates (`Zeros` included).
    pub fn len(&self, buf: Buf) -> usize {
        let MlpDims {
            hidden: h,
            inter,
            r,
            ..
        } = self.d;
        let t = self.t;
        match buf {
            Buf::X | Buf::Dy | Buf::Y | Buf::Dx => t * h,
            Buf::A => self.d.a_len(),
            Buf::B => self.d.b_len(),
            Buf::Wgu => (2 * inter + S) * (h + S),
            Buf::Wd => (h + S) * (inter + S),
            Buf::Zeros => r.max(1),
            Buf::Xp | Buf::Dyp => t * (h + S),
            Buf::Hgu => t * 2 * r,
            Buf::Yb => t * 2 * inter,
            Buf::Actp => t * (inter + S),
            Buf::Dact => t * inter,
            Buf::Dgup => t * (2 * inter + S),
            Buf::Factors => self.d.grad_len(),
        }
    }

    /// The forward: writes `Y`, and `Hgu`, `Yb`, `Actp` for the backward (through `Xp`),
    /// after the `B` factors into `Wgu`'s and `Wd`'s spare columns.
    pub fn forward(&self, ops: &mut impl FoldOps) -> candle_core::Result<()> {
        let MlpDims {
            hidden: h,
            inter,
            r,
            r2,
        } = self.d;
        let t = self.t;
        let (ldgu, ldd, ldx, ldact) = (h + S, inter + S, h + S, inter + S);
        let (b_gu, b_d) = (self.b0, self.b0 + self.d.b_down());
        let (a_gu, a_d) = (self.a0, self.a0 + self.d.a_down());
        // B_g into gate's rows, columns h..h + r, zeros beside it; B_u into up's rows,
        // columns h + r..h + 2r, zeros before it; B_d into down's columns I..I + r2.
        let zeros = at(Buf::Zeros, 0);
        ops.copy_rows(at(Buf::B, b_gu), at(Buf::Wgu, h), [inter, r, r, ldgu])?;
        ops.copy_rows(zeros, at(Buf::Wgu, h + r), [inter, r, 0, ldgu])?;
        ops.copy_rows(zeros, at(Buf::Wgu, inter * ldgu + h), [inter, r, 0, ldgu])?;
        ops.copy_rows(
            at(Buf::B, b_gu + inter * r),
            at(Buf::Wgu, inter * ldgu + h + r),
            [inter, r, r, ldgu],
        )?;
        ops.copy_rows(at(Buf::B, b_d), at(Buf::Wd, inter), [h, r2, r2, ldd])?;
        ops.copy_rows(at(Buf::X, 0), at(Buf::Xp, 0), [t, h, h, ldx])?;
        // H_guᵀ[2r, T] = s_gu · A_gu[2r, h] · Xᵀ[h, T] into XP's columns h..: A_gu's buffer
        // read column-major is A_guᵀ (ld h), so transa; x's is Xᵀ (ld h); C is XP's columns
        // h.. (ld h + S).
        ops.gemm(
            &self.params(false, (true, false), [2 * r, t, h], [h, h, ldx]),
            at(Buf::A, a_gu),
            at(Buf::X, 0),
            at(Buf::Xp, h),
            self.s_gu,
        )?;
        ops.copy_rows(at(Buf::Xp, h), at(Buf::Hgu, 0), [t, 2 * r, ldx, 2 * r])?;
        // ybᵀ[2I, T] = WGU[2I, h + 2r] · XPᵀ[h + 2r, T]: WGU's buffer read column-major is
        // WGUᵀ (ld h + S), so transa; XP's is XPᵀ (ld h + S).
        ops.gemm(
            &self.params(
                false,
                (true, false),
                [2 * inter, t, h + 2 * r],
                [ldgu, ldx, 2 * inter],
            ),
            at(Buf::Wgu, 0),
            at(Buf::Xp, 0),
            at(Buf::Yb, 0),
            1.0,
        )?;
        ops.swiglu_fwd(at(Buf::Yb, 0), at(Buf::Actp, 0), t, inter, ldact)?;
        // H_dᵀ[r2, T] = s_d · A_d[r2, I] · ACTᵀ[I, T] into ACTP's columns I..: transa as above.
        ops.gemm(
            &self.params(false, (true, false), [r2, t, inter], [inter, ldact, ldact]),
            at(Buf::A, a_d),
            at(Buf::Actp, 0),
            at(Buf::Actp, inter),
            self.s_d,
        )?;
        // yᵀ[h, T] = WD[h, I + r2] · ACTPᵀ[I + r2, T]: transa as for yb.
        ops.gemm(
            &self.params(false, (true, false), [h, t, inter + r2], [ldd, ldact, h]),
            at(Buf::Wd, 0),
            at(Buf::Actp, 0),
            at(Buf::Y, 0),
            1.0,
        )
    }

    /// The backward from `Dy` and the forward's `Hgu`, `Yb`, `Actp`: writes `Factors` (as
    /// [`MlpDims::grad_len`] lays them out) and, with `need_dx`, `Dx`, after the `A` factors
    /// into `Wgu`'s and `Wd`'s spare rows.
    pub fn backward(&self, ops: &mut impl FoldOps, need_dx: bool) -> candle_core::Result<()> {
        let MlpDims {
            hidden: h,
            inter,
            r,
            r2,
        } = self.d;
        let t = self.t;
        let (ldgu, ldd, ldy, ldact, ldg) = (h + S, inter + S, h + S, inter + S, 2 * inter + S);
        let (b_gu, b_d) = (self.b0, self.b0 + self.d.b_down());
        let (a_gu, a_d) = (self.a0, self.a0 + self.d.a_down());
        let f = |off: usize| at(Buf::Factors, off);
        // A_gu into WGU's rows 2I..2I + 2r, A_d into WD's rows h..h + r2; dy into DYP.
        ops.copy_rows(
            at(Buf::A, a_gu),
            at(Buf::Wgu, 2 * inter * ldgu),
            [2 * r, h, h, ldgu],
        )?;
        ops.copy_rows(
            at(Buf::A, a_d),
            at(Buf::Wd, h * ldd),
            [r2, inter, inter, ldd],
        )?;
        ops.copy_rows(at(Buf::Dy, 0), at(Buf::Dyp, 0), [t, h, h, ldy])?;
        // G_dᵀ[r2, T] = s_d · B_dᵀ[r2, h] · dyᵀ[h, T] into DYP's columns h..: B_d's buffer read
        // column-major is B_dᵀ (ld r2), dy's is dyᵀ (ld h).
        ops.gemm(
            &self.params(false, (false, false), [r2, t, h], [r2, h, ldy]),
            at(Buf::B, b_d),
            at(Buf::Dy, 0),
            at(Buf::Dyp, h),
            self.s_d,
        )?;
        // dactᵀ[I, T] = [W_d ; A_d]ᵀ[I, h + r2] · DYPᵀ[h + r2, T]: WD's buffer read
        // column-major is WDᵀ (ld I + S), its first h + r2 rows' I columns; no transposes.
        ops.gemm(
            &self.params(false, (false, false), [inter, t, h + r2], [ldd, ldy, inter]),
            at(Buf::Wd, 0),
            at(Buf::Dyp, 0),
            at(Buf::Dact, 0),
            1.0,
        )?;
        // dA_dᵀ[I, r2] = ACTᵀ[I, T] · G_d[T, r2]: ACTP's buffer is ACTᵀ (ld I + S); G_d's
        // columns of DYP read column-major are G_dᵀ (ld h + S), so transb.
        ops.gemm(
            &self.params(true, (false, true), [inter, r2, t], [ldact, ldy, inter]),
            at(Buf::Actp, 0),
            at(Buf::Dyp, h),
            f(self.d.a_down()),
            1.0,
        )?;
        // dB_dᵀ[r2, h] = (s_d H_d)ᵀ[r2, T] · dy[T, h]: ACTP's columns I.. are (s_d H_d)ᵀ
        // (ld I + S); dy's buffer is dyᵀ (ld h), so transb.
        ops.gemm(
            &self.params(true, (false, true), [r2, h, t], [ldact, h, r2]),
            at(Buf::Actp, inter),
            at(Buf::Dy, 0),
            f(self.d.b_start() + self.d.b_down()),
            1.0,
        )?;
        ops.swiglu_bwd(
            at(Buf::Yb, 0),
            at(Buf::Dact, 0),
            at(Buf::Dgup, 0),
            t,
            inter,
            ldg,
        )?;
        for g in 0..2 {
            // G_gᵀ[r, T] = s_gu · B_gᵀ[r, I] · d gateᵀ[I, T] into DGUP's columns 2I + g · r..:
            // B_g's buffer is B_gᵀ (ld r); d gate's columns of DGUP are d gateᵀ (ld 2I + S).
            ops.gemm(
                &self.params(false, (false, false), [r, t, inter], [r, ldg, ldg]),
                at(Buf::B, b_gu + g * inter * r),
                at(Buf::Dgup, g * inter),
                at(Buf::Dgup, 2 * inter + g * r),
                self.s_gu,
            )?;
        }
        if need_dx {
            // dxᵀ[h, T] = [W_gu ; A_gu]ᵀ[h, 2I + 2r] · DGUPᵀ[2I + 2r, T]: WGU's buffer read
            // column-major is WGUᵀ (ld h + S), its first 2I + 2r rows' h columns.
            ops.gemm(
                &self.params(
                    false,
                    (false, false),
                    [h, t, 2 * inter + 2 * r],
                    [ldgu, ldg, h],
                ),
                at(Buf::Wgu, 0),
                at(Buf::Dgup, 0),
                at(Buf::Dx, 0),
                1.0,
            )?;
        }
        // dA_guᵀ[h, 2r] = Xᵀ[h, T] · G_gu[T, 2r]: G's columns of DGUP read column-major are
        // G_guᵀ (ld 2I + S), so transb.
        ops.gemm(
            &self.params(true, (false, true), [h, 2 * r, t], [h, ldg, h]),
            at(Buf::X, 0),
            at(Buf::Dgup, 2 * inter),
            f(0),
            1.0,
        )?;
        for g in 0..2 {
            // dB_gᵀ[r, I] = (s_gu H_g)ᵀ[r, T] · d gate[T, I]: H's columns g · r.. are
            // (s_gu H_g)ᵀ (ld 2r); d gate's columns of DGUP read column-major are d gateᵀ,
            // so transb.
            ops.gemm(
                &self.params(true, (false, true), [r, inter, t], [2 * r, ldg, r]),
                at(Buf::Hgu, g * r),
                at(Buf::Dgup, g * inter),
                f(self.d.b_start() + g * inter * r),
                1.0,
            )?;
        }
        Ok(())
    }
}

/// The last element (exclusive) a column-major `rows x cols` operand with leading dimension
/// `ld` reaches from its first.
pub(crate) fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (cols - 1) * ld + rows
    }
}

/// The extents of a GEMM's `A`, `B` and `C` (elements from each one's first).
pub(crate) fn gemm_extents(p: &Gemm) -> [usize; 3] {
    let a = if p.transa {
        extent(p.k, p.m, p.lda)
    } else {
        extent(p.m, p.k, p.lda)
    };
    let b = if p.transb {
        extent(p.n, p.k, p.ldb)
    } else {
        extent(p.k, p.n, p.ldb)
    };
    [a, b, extent(p.m, p.n, p.ldc)]
}

/// Checks that `n` elements from `at` lie in a buffer of `len` elements.
pub(crate) fn check_reach(op: &str, at: At, n: usize, len: usize) -> candle_core::Result<()> {
    if at.off + n > len {
        return Err(internal(
            op,
            format!(
                "{:?} from element {} reaches {} past its {len} elements",
                at.buf,
                at.off,
                at.off + n - len
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The steps on a float64 emulation of the operations, against the MLP computed directly.
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// The operations on float64 buffers, every element of every buffer starting as NaN
    /// (except the inputs): a step that reads an element nothing wrote gives NaN.
    struct Emu {
        bufs: HashMap<Buf, Vec<f64>>,
    }

    impl Emu {
        fn get(&self, a: At, i: usize) -> f64 {
            self.bufs[&a.buf][a.off + i]
        }

        fn set(&mut self, a: At, i: usize, v: f64) {
            self.bufs.get_mut(&a.buf).expect("a buffer")[a.off + i] = v;
        }

        fn reach(&self, a: At, n: usize) -> candle_core::Result<()> {
            check_reach("emu", a, n, self.bufs[&a.buf].len())
        }
    }

    fn sig(g: f64) -> f64 {
        1.0 / (1.0 + (-g).exp())
    }

    impl FoldOps for Emu {
        fn gemm(&mut self, p: &Gemm, a: At, b: At, c: At, alpha: f32) -> candle_core::Result<()> {
            let [ea, eb, ec] = gemm_extents(p);
            self.reach(a, ea)?;
            self.reach(b, eb)?;
            self.reach(c, ec)?;
            // C may share a buffer with A or B (other columns of the same rows), never an
            // element.
            let cols = |off: usize, rows: usize, n: usize, ld: usize| -> HashSet<usize> {
                (0..n)
                    .flat_map(|j| (0..rows).map(move |i| off + i + j * ld))
                    .collect()
            };
            let written = cols(c.off, p.m, p.n, p.ldc);
            for (x, (rows, n), ld) in [
                (a, if p.transa { (p.k, p.m) } else { (p.m, p.k) }, p.lda),
                (b, if p.transb { (p.n, p.k) } else { (p.k, p.n) }, p.ldb),
            ] {
                if x.buf == c.buf {
                    assert!(
                        cols(x.off, rows, n, ld).is_disjoint(&written),
                        "a GEMM writes {:?} elements it reads",
                        c.buf
                    );
                }
            }
            for j in 0..p.n {
                for i in 0..p.m {
                    let mut acc = 0.0;
                    for k in 0..p.k {
                        let av = if p.transa {
                            self.get(a, k + i * p.lda)
                        } else {
                            self.get(a, i + k * p.lda)
                        };
                        let bv = if p.transb {
                            self.get(b, j + k * p.ldb)
                        } else {
                            self.get(b, k + j * p.ldb)
                        };
                        acc += av * bv;
                    }
                    self.set(c, i + j * p.ldc, alpha as f64 * acc);
                }
            }
            Ok(())
        }

        fn copy_rows(&mut self, src: At, dst: At, dims: [usize; 4]) -> candle_core::Result<()> {
            let [rows, width, xs, ys] = dims;
            self.reach(src, (rows - 1) * xs + width)?;
            self.reach(dst, (rows - 1) * ys + width)?;
            for r in 0..rows {
                for c in 0..width {
                    let v = self.get(src, r * xs + c);
                    self.set(dst, r * ys + c, v);
                }
            }
            Ok(())
        }

        fn swiglu_fwd(
            &mut self,
            yb: At,
            act: At,
            rows: usize,
            cols: usize,
            ldy: usize,
        ) -> candle_core::Result<()> {
            self.reach(yb, rows * 2 * cols)?;
            self.reach(act, (rows - 1) * ldy + cols)?;
            for r in 0..rows {
                for c in 0..cols {
                    let (g, u) = (
                        self.get(yb, r * 2 * cols + c),
                        self.get(yb, r * 2 * cols + cols + c),
                    );
                    self.set(act, r * ldy + c, g * sig(g) * u);
                }
            }
            Ok(())
        }

        fn swiglu_bwd(
            &mut self,
            yb: At,
            dact: At,
            dgu: At,
            rows: usize,
            cols: usize,
            ldo: usize,
        ) -> candle_core::Result<()> {
            self.reach(yb, rows * 2 * cols)?;
            self.reach(dact, rows * cols)?;
            self.reach(dgu, (rows - 1) * ldo + 2 * cols)?;
            for r in 0..rows {
                for c in 0..cols {
                    let (g, u) = (
                        self.get(yb, r * 2 * cols + c),
                        self.get(yb, r * 2 * cols + cols + c),
                    );
                    let d = self.get(dact, r * cols + c);
                    let s = sig(g);
                    self.set(dgu, r * ldo + c, d * u * s * (1.0 + g * (1.0 - s)));
                    self.set(dgu, r * ldo + cols + c, d * g * s);
                }
            }
            Ok(())
        }
    }

    /// A deterministic pseudo-random value in [-1, 1) for element `i` of stream `seed`.
    fn rnd(seed: u64, i: usize) -> f64 {
        let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_add(1);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Row-major `[rows, cols]` product `p · qᵀ` (`q: [n, cols]` gives `[rows, n]`).
    fn mm_t(p: &[f64], q: &[f64], rows: usize, n: usize, cols: usize) -> Vec<f64> {
        let mut o = vec![0.0; rows * n];
        for i in 0..rows {
            for j in 0..n {
                o[i * n + j] = (0..cols).map(|k| p[i * cols + k] * q[j * cols + k]).sum();
            }
        }
        o
    }

    /// Row-major transpose of `[rows, cols]`.
    fn tr(p: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let mut o = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                o[j * rows + i] = p[i * cols + j];
            }
        }
        o
    }

    fn max_rel(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
        got.iter()
            .zip(want)
            .map(|(g, w)| {
                if g.is_finite() {
                    (g - w).abs() / scale
                } else {
                    f64::INFINITY
                }
            })
            .fold(0.0, f64::max)
    }

    /// The fold's steps against the MLP and its gradients computed directly (float64): odd
    /// sizes, pack offsets, the spare parts of the weights NaN beforehand except where a
    /// larger earlier rank left stale factors (which the zero blocks must overwrite), and every
    /// scratch buffer NaN, so a step that reads what it should not shows up as NaN.
    #[test]
    fn fold_steps_match_the_mlp() {
        for &(t, h, inter, r, r2, a0, b0, need_dx) in &[
            (
                5usize, 8usize, 24usize, 3usize, 2usize, 0usize, 0usize, true,
            ),
            (7, 16, 40, 8, 5, 3, 7, true),
            (3, 8, 16, 32, 64, 1, 2, false),
        ] {
            let d = MlpDims {
                hidden: h,
                inter,
                r,
                r2,
            };
            let fold = Fold {
                d,
                t,
                split: true,
                a0,
                b0,
                s_gu: 0.75,
                s_d: 1.5,
            };
            let what = format!("T {t} h {h} I {inter} r {r}/{r2}");
            let v = |seed: u64, n: usize, scale: f64| -> Vec<f64> {
                (0..n).map(|i| scale * rnd(seed, i)).collect()
            };
            let (x, dy) = (v(1, t * h, 1.0), v(2, t * h, 1.0));
            let (wgu, wd) = (v(3, 2 * inter * h, 0.3), v(4, h * inter, 0.3));
            let (agu, ad) = (v(5, 2 * r * h, 0.3), v(6, r2 * inter, 0.3));
            let (bgu, bd) = (v(7, 2 * inter * r, 0.3), v(8, h * r2, 0.3));

            let mut bufs = HashMap::new();
            for buf in [
                Buf::X,
                Buf::Dy,
                Buf::A,
                Buf::B,
                Buf::Wgu,
                Buf::Wd,
                Buf::Zeros,
                Buf::Xp,
                Buf::Hgu,
                Buf::Yb,
                Buf::Actp,
                Buf::Y,
                Buf::Dyp,
                Buf::Dact,
                Buf::Dgup,
                Buf::Dx,
                Buf::Factors,
            ] {
                let extra = match buf {
                    Buf::A => a0,
                    Buf::B => b0,
                    _ => 0,
                };
                bufs.insert(buf, vec![f64::NAN; fold.len(buf) + extra]);
            }
            bufs.insert(Buf::X, x.clone());
            bufs.insert(Buf::Dy, dy.clone());
            bufs.insert(Buf::Zeros, vec![0.0; fold.len(Buf::Zeros)]);
            let pack = |buf: &mut Vec<f64>, off: usize, parts: [&[f64]; 2]| {
                let mut o = off;
                for p in parts {
                    buf[o..o + p.len()].copy_from_slice(p);
                    o += p.len();
                }
            };
            pack(bufs.get_mut(&Buf::A).unwrap(), a0, [&agu, &ad]);
            pack(bufs.get_mut(&Buf::B).unwrap(), b0, [&bgu, &bd]);
            // The weights in the top-left of their padded storage; the spare columns of
            // gate/up's rows hold stale values (as a larger earlier rank would leave), the
            // rest of the spare parts NaN (never read).
            let (ldgu, ldd) = (h + S, inter + S);
            {
                let w = bufs.get_mut(&Buf::Wgu).unwrap();
                for i in 0..2 * inter {
                    w[i * ldgu..i * ldgu + h].copy_from_slice(&wgu[i * h..(i + 1) * h]);
                    for c in h..h + S {
                        w[i * ldgu + c] = 7.0;
                    }
                }
                let w = bufs.get_mut(&Buf::Wd).unwrap();
                for i in 0..h {
                    w[i * ldd..i * ldd + inter].copy_from_slice(&wd[i * inter..(i + 1) * inter]);
                }
            }
            let mut emu = Emu { bufs };
            fold.forward(&mut emu).unwrap();
            fold.backward(&mut emu, need_dx).unwrap();

            // The reference, row-major f64.
            let proj = |z: &[f64],
                        rows: usize,
                        w: &[f64],
                        a: &[f64],
                        b: &[f64],
                        inn: usize,
                        out: usize,
                        rank: usize,
                        s: f64| {
                let base = mm_t(z, w, rows, out, inn);
                let hz = mm_t(z, a, rows, rank, inn);
                let low = mm_t(&hz, b, rows, out, rank);
                base.iter()
                    .zip(&low)
                    .map(|(p, q)| p + s * q)
                    .collect::<Vec<_>>()
            };
            let (s_gu, s_d) = (0.75, 1.5);
            let gate = proj(
                &x,
                t,
                &wgu[..inter * h],
                &agu[..r * h],
                &bgu[..inter * r],
                h,
                inter,
                r,
                s_gu,
            );
            let up = proj(
                &x,
                t,
                &wgu[inter * h..],
                &agu[r * h..],
                &bgu[inter * r..],
                h,
                inter,
                r,
                s_gu,
            );
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g * sig(*g) * u).collect();
            let y = proj(&act, t, &wd, &ad, &bd, inter, h, r2, s_d);
            assert!(max_rel(&emu.bufs[&Buf::Y], &y) < 1e-12, "{what}: y");

            // Down: dact = dy W_d + s_d (dy B_d) A_d; dA_d = s_d (dy B_d)ᵀ act;
            // dB_d = s_d dyᵀ (act A_dᵀ).
            let gd: Vec<f64> = mm_t(&dy, &tr(&bd, h, r2), t, r2, h)
                .iter()
                .map(|v| s_d * v)
                .collect();
            let dact: Vec<f64> = {
                let base = mm_t(&dy, &tr(&wd, h, inter), t, inter, h);
                let low = mm_t(&gd, &tr(&ad, r2, inter), t, inter, r2);
                base.iter().zip(&low).map(|(p, q)| p + q).collect()
            };
            let dad = mm_t(&tr(&gd, t, r2), &tr(&act, t, inter), r2, inter, t);
            let hd: Vec<f64> = mm_t(&act, &ad, t, r2, inter);
            let dbd: Vec<f64> = mm_t(&tr(&dy, t, h), &tr(&hd, t, r2), h, r2, t)
                .iter()
                .map(|v| s_d * v)
                .collect();
            // SwiGLU's backward.
            let mut dg = vec![0.0; t * inter];
            let mut du = vec![0.0; t * inter];
            for i in 0..t * inter {
                let (g, u, dd) = (gate[i], up[i], dact[i]);
                let s = sig(g);
                dg[i] = dd * u * s * (1.0 + g * (1.0 - s));
                du[i] = dd * g * s;
            }
            let g_g: Vec<f64> = mm_t(&dg, &tr(&bgu[..inter * r], inter, r), t, r, inter)
                .iter()
                .map(|v| s_gu * v)
                .collect();
            let g_u: Vec<f64> = mm_t(&du, &tr(&bgu[inter * r..], inter, r), t, r, inter)
                .iter()
                .map(|v| s_gu * v)
                .collect();
            let mut dx = mm_t(&dg, &tr(&wgu[..inter * h], inter, h), t, h, inter);
            for (o, v) in
                dx.iter_mut()
                    .zip(mm_t(&du, &tr(&wgu[inter * h..], inter, h), t, h, inter))
            {
                *o += v;
            }
            for (o, v) in dx
                .iter_mut()
                .zip(mm_t(&g_g, &tr(&agu[..r * h], r, h), t, h, r))
            {
                *o += v;
            }
            for (o, v) in dx
                .iter_mut()
                .zip(mm_t(&g_u, &tr(&agu[r * h..], r, h), t, h, r))
            {
                *o += v;
            }
            let da_g = mm_t(&tr(&g_g, t, r), &tr(&x, t, h), r, h, t);
            let da_u = mm_t(&tr(&g_u, t, r), &tr(&x, t, h), r, h, t);
            let h_g = mm_t(&x, &agu[..r * h], t, r, h);
            let h_u = mm_t(&x, &agu[r * h..], t, r, h);
            let db_g: Vec<f64> = mm_t(&tr(&dg, t, inter), &tr(&h_g, t, r), inter, r, t)
                .iter()
                .map(|v| s_gu * v)
                .collect();
            let db_u: Vec<f64> = mm_t(&tr(&du, t, inter), &tr(&h_u, t, r), inter, r, t)
                .iter()
                .map(|v| s_gu * v)
                .collect();

            if need_dx {
                assert!(max_rel(&emu.bufs[&Buf::Dx], &dx) < 1e-12, "{what}: dx");
            }
            let fb = &emu.bufs[&Buf::Factors];
            let piece = |off: usize, n: usize| &fb[off..off + n];
            let cat = |p: &[f64], q: &[f64]| [p, q].concat();
            for (name, got, want) in [
                ("dA_gu", piece(0, 2 * r * h), cat(&da_g, &da_u)),
                ("dA_d", piece(d.a_down(), r2 * inter), dad),
                (
                    "dB_gu",
                    piece(d.b_start(), 2 * inter * r),
                    cat(&db_g, &db_u),
                ),
                ("dB_d", piece(d.b_start() + d.b_down(), h * r2), dbd),
            ] {
                let e = max_rel(got, &want);
                assert!(e < 1e-12, "{what}: {name}: rel err {e}");
            }
        }
    }
}
