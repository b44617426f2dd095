// The training MLP's SwiGLU with the LoRA terms added inside the kernel, so that the low-rank
// expansions ([T, 2I] forward, [T, I] backward) are never written to memory (flare's
// `lora::op::lora_swiglu_mlp`):
//
//   lora_swiglu_fwd_<t>(yb, h, b, act, rows, inter, r, s):
//       g = yb[:, :I] + s · H_g B_gᵀ,  u = yb[:, I:] + s · H_u B_uᵀ,  act = silu(g) · u
//   lora_swiglu_bwd_<t>(yb, h, b, dab, gd, ad, dgu, rows, inter, r, r2, s):
//       da = dab + G_d A_d  (the activation's gradient: dy W_d plus the down projection's
//       low-rank part, G_d = s_d · dy B_d already scaled);
//       g, u recomputed as in the forward; dg = da · u · sig · (1 + g (1 - sig)),
//       du = da · g · sig (sig = sigmoid(g)), written to dgu[:, :I] and dgu[:, I:].
//
// Layouts (row-major, contiguous): yb [rows, 2I] (gate then up, the base GEMM's output), h
// [rows, 2r] (H_g then H_u, the forward's x Aᵀ), b [2I, r] (B_g rows then B_u rows), act and dab
// [rows, I], gd [rows, r2], ad [r2, I], dgu [rows, 2I]. The host guarantees I % 8 == 0, every
// row start of yb, act, dab and dgu 16-byte aligned, 1 <= r, r2 <= LSW_MAX_RANK, and that dgu
// aliases nothing it reads.
//
// A block of LSW_THREADS (4 warps) owns LSW_TN columns of I and walks row tiles of LSW_TM rows
// (blockIdx.y, stride gridDim.y). It stages its columns' factors (B's rows, A_d's columns) in
// shared memory once, and each row tile's H (and G_d) rows (zero past r and past the matrix:
// the rank is padded to a multiple of 16, the mma K); each warp computes a 16 x 32 piece of the
// low-rank products on the tensor cores (mma.sync m16n8k16, f32 accumulators) and finishes its
// piece in place: each thread reads yb (and dab) as element pairs at its accumulators'
// positions (a warp's pairs cover 64 contiguous bytes of each of 16 rows), adds the products
// and writes act (dgu) there. All arithmetic in f32, each output rounded once.
//
// The kernel is bound by how many loads are in flight: each thread issues every load of a row
// tile at once (its yb and dab pairs, its packs of the H and G_d rows), the factor staging
// loads every pack before writing any (16-byte reads where the rank is a multiple of 8), and
// the backward loads each tile one tile ahead. Measured (bench/dev/lora_swiglu_bench.cu, H100,
// 4,096 x 14,336, ranks 16; 8 row tiles per block): staging element by element, one dependent
// load after another, 395 / 663 µs forward / backward; loads grouped and the products through
// shared memory, 234 / 435; this layout, 224 / 436 with both kernels one tile ahead; the
// forward loading at the top of its tile (96 registers, 5 blocks per SM) about 208, the
// backward held to 128 registers (4 blocks) about 424. A device-to-device copy of the forward's
// 352 MB takes 122 µs.
#include "common.cuh"
#include "mma.cuh"

using namespace flare;

#define LSW_THREADS 128
#define LSW_TM 32
#define LSW_TN 64
#define LSW_MAX_RANK 32
// Row tiles per block the host aims at (gridDim.y = ceil(row tiles / LSW_ROW_TILES)): each
// block stages its columns' factors once for that many tiles.
#define LSW_ROW_TILES 8

namespace lsw {

// Staged factor rows: the rank padded to the mma K (16) plus 8 elements, so that the 32-bit
// fragment reads of one warp hit distinct banks.
constexpr int KP = LSW_MAX_RANK + 8;

// Staged per column tile, once per block: B_g, B_u rows of the tile's columns and (backward)
// A_d's columns.
template <typename T> struct ColumnInputs {
  T b[2][LSW_TN][KP];
  T at[LSW_TN][KP];  // at[c][k] = A_d[k][c0 + c]
};
// Staged per row tile: H_g, H_u rows and (backward) G_d rows.
template <typename T> struct RowInputs {
  T h[2][LSW_TM][KP];
  T gd[LSW_TM][KP];
};
template <typename T> struct Smem {
  ColumnInputs<T> col;
  RowInputs<T> in;
};

__device__ __forceinline__ int pad16(int r) { return (r + 15) & ~15; }

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

// Staging goes through registers: every thread first loads all of its 16-byte packs (their
// latencies overlap), then writes them to shared memory. A pack is 8 elements of one row; it is
// read as one 16-byte access when `vec` (the row stride, the column offset and the base 16-byte
// aligned) and it lies wholly before `r`, element by element (zero past `r` or the matrix)
// otherwise.
template <typename T> using P8 = Pack<T, 8>;

template <typename T> __device__ __forceinline__ bool aligned16(const T *p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Elements k0 .. k0 + 7 of row `row` of a matrix with `rows` rows whose element k sits at
// src[row * ld + k], zero at or past r.
template <typename T>
__device__ __forceinline__ P8<T> load_p8(const T *src, long long ld, long long row, long long rows,
                                         int k0, int r, bool vec) {
  P8<T> v;
  if (row < rows && vec && k0 + 8 <= r) return load_pack<T, 8>(src + row * ld + k0);
#pragma unroll
  for (int e = 0; e < 8; ++e)
    v.v[e] = (row < rows && k0 + e < r) ? __ldg(src + row * ld + k0 + e) : from_f<T>(0.f);
  return v;
}

// The staging of `np` halves of N rows each (H_g and H_u or G_d alone, N = LSW_TM; B_g and B_u,
// N = LSW_TN): half q's row i holds src[q * half + (row0 + i) * ld + k] for k < kp (zero past
// `rows` or `r`). Pack p of the staging is half p / (N · kp / 8), row (p / (kp / 8)) % N,
// columns (p % (kp / 8)) · 8 ..
template <typename T, int MAXP, int N> struct RowPacks {
  P8<T> v[MAXP];
  // Pack p's half, row and first column.
  __device__ __forceinline__ static void at(int p, int ppr, int &q, int &i, int &k0) {
    q = p / (N * ppr);
    const int w = p - q * N * ppr;
    i = w / ppr;
    k0 = (w - i * ppr) * 8;
  }
  __device__ __forceinline__ void load(const T *src, long long half, long long ld,
                                       long long row0, long long rows, int r, int kp, int np,
                                       bool vec) {
    const int ppr = kp >> 3, total = np * N * ppr;
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
      const int p = threadIdx.x + j * LSW_THREADS;
      if (p < total) {
        int q, i, k0;
        at(p, ppr, q, i, k0);
        v[j] = load_p8<T>(src + q * half, ld, row0 + i, rows, k0, r, vec);
      }
    }
  }
  __device__ __forceinline__ void store(T (*dst)[N][KP], int kp, int np) const {
    const int ppr = kp >> 3, total = np * N * ppr;
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
      const int p = threadIdx.x + j * LSW_THREADS;
      if (p < total) {
        int q, i, k0;
        at(p, ppr, q, i, k0);
        *reinterpret_cast<P8<T> *>(&dst[q][i][k0]) = v[j];
      }
    }
  }
};

// One row tile's inputs in registers: this thread's element pairs of yb (gate and up) and of
// dab at its mma accumulators' positions, and its packs of the tile's H and G_d rows.
constexpr int PPR = LSW_TN / 8;  // packs per row of the column tile
constexpr int HP = 2 * LSW_TM * (LSW_MAX_RANK / 8) / LSW_THREADS;  // H packs per thread
constexpr int GP = LSW_TM * (LSW_MAX_RANK / 8) / LSW_THREADS;      // G_d packs per thread
constexpr int BP = 2 * LSW_TN * (LSW_MAX_RANK / 8) / LSW_THREADS;  // B packs per thread
static_assert(HP >= 1 && GP >= 1 && BP >= 1, "the staging packs fit the threads");

template <typename T> struct Tile {
  unsigned g[8], u[8], d[8];  // (n, half) -> bf16x2 at the mma accumulator's position
  RowPacks<T, HP, LSW_TM> h;
  RowPacks<T, GP, LSW_TM> gd;
};

template <typename T> __device__ __forceinline__ float2 unpack2(unsigned w) {
  Pack<T, 2> p;
  *reinterpret_cast<unsigned *>(&p) = w;
  return make_float2(to_f(p.v[0]), to_f(p.v[1]));
}
template <typename T> __device__ __forceinline__ unsigned pack2(float a, float b) {
  Pack<T, 2> p;
  p.v[0] = from_f<T>(a);
  p.v[1] = from_f<T>(b);
  return *reinterpret_cast<unsigned *>(&p);
}

}  // namespace lsw

template <typename T, bool backward>
__device__ __forceinline__ void lora_swiglu_body(const T *__restrict__ yb, const T *__restrict__ h,
                                                 const T *__restrict__ b, const T *__restrict__ dab,
                                                 const T *__restrict__ gd,
                                                 const T *__restrict__ ad, T *__restrict__ out,
                                                 long long rows, int inter, int r, int r2,
                                                 float s) {
  using namespace lsw;
  static_assert(VecWidth<T>::value == 8, "16-bit element types");
  __shared__ __align__(16) Smem<T> sm;
  const int warp = threadIdx.x >> 5;
  const int wr = (warp >> 1) * 16, wc = (warp & 1) * 32;
  const int kp = pad16(r), kp2 = backward ? pad16(r2) : 0;
  const long long c0 = (long long)blockIdx.x * LSW_TN;
  const long long two_i = 2LL * inter;
  const long long row_tiles = (rows + LSW_TM - 1) / LSW_TM;
  // 16-byte reads of the factor rows need rows of a multiple of 8 elements and aligned bases.
  const bool vec_h = (r & 7) == 0 && aligned16(h);
  const bool vec_g = backward && (r2 & 7) == 0 && aligned16(gd);

  // This thread's loads of row tile rt (none past the matrix).
  const int lane = threadIdx.x & 31, lg = lane >> 2, lt = lane & 3;
  auto load_tile = [&](long long rt, Tile<T> &L) {
    const long long r0 = rt * LSW_TM;
#pragma unroll
    for (int f = 0; f < 8; ++f) {
      const long long row = r0 + wr + lg + 8 * (f & 1), col = c0 + wc + (f >> 1) * 8 + 2 * lt;
      if (row < rows && col < inter) {
        const T *yr = yb + row * two_i;
        L.g[f] = __ldg(reinterpret_cast<const unsigned *>(yr + col));
        L.u[f] = __ldg(reinterpret_cast<const unsigned *>(yr + inter + col));
        if (backward) L.d[f] = __ldg(reinterpret_cast<const unsigned *>(dab + row * inter + col));
      }
    }
    // H's rows are [H_g | H_u]: the halves r elements apart in one row.
    L.h.load(h, r, 2LL * r, r0, rows, r, kp, 2, vec_h);
    if (backward) L.gd.load(gd, 0, r2, r0, rows, r2, kp2, 1, vec_g);
  };

  Tile<T> cur;
  // The backward loads each tile one tile ahead (during the previous tile's pass); the forward
  // at the top of its tile: it holds fewer registers so, and more of its blocks fit an SM.
  if constexpr (backward) {
    if (blockIdx.y < row_tiles) load_tile(blockIdx.y, cur);
  }

  // The column tile's factors, once per block: B_p's rows c0.. (zero past I: each half ends at
  // I) and A_d's columns c0.. (read along A_d's rows, written transposed).
  {
    constexpr int AP = LSW_MAX_RANK * PPR / LSW_THREADS;
    // B's halves are whole matrices I · r elements apart (I % 8 == 0: both aligned alike).
    RowPacks<T, BP, LSW_TN> bv;
    bv.load(b, (long long)inter * r, r, c0, inter, r, kp, 2, (r & 7) == 0 && aligned16(b));
    P8<T> av[AP];
    const int atotal = kp2 * PPR;
    const bool vec_a = aligned16(ad);
#pragma unroll
    for (int j = 0; j < AP; ++j) {
      const int p = threadIdx.x + j * LSW_THREADS;
      if (p < atotal) {
        const int k = p / PPR, cp = (p - k * PPR) * 8;
        const long long col = c0 + cp;
        if (k < r2 && col < inter) {
          // I % 8 == 0: a pack is wholly inside a row or wholly past it.
          if (vec_a) {
            av[j] = load_pack<T, 8>(ad + (long long)k * inter + col);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) av[j].v[e] = __ldg(ad + (long long)k * inter + col + e);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) av[j].v[e] = from_f<T>(0.f);
        }
      }
    }
    bv.store(sm.col.b, kp, 2);
#pragma unroll
    for (int j = 0; j < AP; ++j) {
      const int p = threadIdx.x + j * LSW_THREADS;
      if (p < atotal) {
        const int k = p / PPR, cp = (p - k * PPR) * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) sm.col.at[cp + e][k] = av[j].v[e];
      }
    }
  }

  for (long long rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const long long r0 = rt * LSW_TM;
    if constexpr (!backward) load_tile(rt, cur);
    __syncthreads();  // every warp's mma of the previous tile is done with the row inputs
    cur.h.store(sm.in.h, kp, 2);
    if (backward) cur.gd.store(&sm.in.gd, kp2, 1);
    __syncthreads();
    float c[3][4][4];
#pragma unroll
    for (int q = 0; q < 3; ++q)
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[q][n][e] = 0.f;
    const int nq = backward ? 3 : 2;
    for (int q = 0; q < nq; ++q) {
      const T(*a)[KP] = q < 2 ? sm.in.h[q] : sm.in.gd;
      const T(*bm)[KP] = q < 2 ? sm.col.b[q] : sm.col.at;
      const int kq = q < 2 ? kp : kp2;
      for (int k0 = 0; k0 < kq; k0 += 16) {
        unsigned af[4];
        af[0] = *reinterpret_cast<const unsigned *>(&a[wr + lg][k0 + 2 * lt]);
        af[1] = *reinterpret_cast<const unsigned *>(&a[wr + lg + 8][k0 + 2 * lt]);
        af[2] = *reinterpret_cast<const unsigned *>(&a[wr + lg][k0 + 2 * lt + 8]);
        af[3] = *reinterpret_cast<const unsigned *>(&a[wr + lg + 8][k0 + 2 * lt + 8]);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const T *bn = bm[wc + n * 8 + lg];
          const unsigned b0 = *reinterpret_cast<const unsigned *>(bn + k0 + 2 * lt);
          const unsigned b1 = *reinterpret_cast<const unsigned *>(bn + k0 + 2 * lt + 8);
          mma16816<T>(c[q][n], af, b0, b1);
        }
      }
    }
    // The backward's next tile's loads go out now: they are in flight during this tile's pass.
    Tile<T> nxt;
    if constexpr (backward) {
      if (rt + gridDim.y < row_tiles) load_tile(rt + gridDim.y, nxt);
    }
#pragma unroll
    for (int f = 0; f < 8; ++f) {
      const int n = f >> 1, hh = f & 1;
      const long long row = r0 + wr + lg + 8 * hh, col = c0 + wc + n * 8 + 2 * lt;
      if (row >= rows || col >= inter) continue;
      const float2 yg = unpack2<T>(cur.g[f]), yu = unpack2<T>(cur.u[f]);
      const float g0 = yg.x + s * c[0][n][2 * hh], g1 = yg.y + s * c[0][n][2 * hh + 1];
      const float u0 = yu.x + s * c[1][n][2 * hh], u1 = yu.y + s * c[1][n][2 * hh + 1];
      const float s0 = sigmoid_f(g0), s1 = sigmoid_f(g1);
      if (!backward) {
        *reinterpret_cast<unsigned *>(out + row * inter + col) = pack2<T>(g0 * s0 * u0, g1 * s1 * u1);
      } else {
        const float2 yd = unpack2<T>(cur.d[f]);
        const float d0 = yd.x + c[2][n][2 * hh], d1 = yd.y + c[2][n][2 * hh + 1];
        T *o = out + row * two_i + col;
        *reinterpret_cast<unsigned *>(o) = pack2<T>(d0 * u0 * s0 * (1.0f + g0 * (1.0f - s0)),
                                                    d1 * u1 * s1 * (1.0f + g1 * (1.0f - s1)));
        *reinterpret_cast<unsigned *>(o + inter) = pack2<T>(d0 * g0 * s0, d1 * g1 * s1);
      }
    }
    if constexpr (backward) cur = nxt;
  }
}

#define LORA_SWIGLU_OP(T, SUFFIX)                                                                  \
  extern "C" __global__ void __launch_bounds__(LSW_THREADS, 5)                                     \
      lora_swiglu_fwd_##SUFFIX(const T *yb, const T *h, const T *b, T *act, long long rows,        \
                               int inter, int r, float s) {                                        \
    lora_swiglu_body<T, false>(yb, h, b, nullptr, nullptr, nullptr, act, rows, inter, r, 0, s);    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(LSW_THREADS, 4)                                     \
      lora_swiglu_bwd_##SUFFIX(const T *yb, const T *h, const T *b, const T *dab, const T *gd,     \
                               const T *ad, T *dgu, long long rows, int inter, int r, int r2,      \
                               float s) {                                                          \
    lora_swiglu_body<T, true>(yb, h, b, dab, gd, ad, dgu, rows, inter, r, r2, s);                  \
  }

LORA_SWIGLU_OP(__nv_bfloat16, bf16)
LORA_SWIGLU_OP(__half, f16)
