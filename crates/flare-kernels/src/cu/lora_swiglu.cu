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
// low-rank products on the tensor cores (mma.sync m16n8k16, f32 accumulators). The products go
// through shared memory (f32, over the row tile's staged factors) so that the pass over yb,
// dab, act and dgu reads and writes whole 16-byte packs, each row of the tile as 128
// contiguous bytes. All arithmetic in f32, each output rounded once.
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
// f32 product tiles, rows padded by 4.
constexpr int LP = LSW_TN + 4;

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
// The products (g, u, and the backward's activation term), over the row inputs once the mma
// are done.
struct Products {
  float l[3][LSW_TM][LP];
};
template <typename T> struct Smem {
  ColumnInputs<T> col;
  union {
    RowInputs<T> in;
    Products out;
  };
};

__device__ __forceinline__ int pad16(int r) { return (r + 15) & ~15; }

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

// dst[i][k] = src[(row0 + i) * ld + col0 + k] for i < n, k < kp (zero past `rows` or `r`).
template <typename T>
__device__ __forceinline__ void stage_rows(T (*dst)[KP], int n, const T *src, long long ld,
                                           long long row0, long long rows, int col0, int r,
                                           int kp) {
  for (int e = threadIdx.x; e < n * kp; e += blockDim.x) {
    const int i = e / kp, k = e - i * kp;
    const long long row = row0 + i;
    dst[i][k] = (row < rows && k < r) ? src[row * ld + col0 + k] : from_f<T>(0.f);
  }
}

// at[c][k] = a[k * inter + c0 + c] for c < LSW_TN, k < kp (zero past `inter` or `r2`): the
// columns of A_d, read along its rows.
template <typename T>
__device__ __forceinline__ void stage_cols(T (*at)[KP], const T *a, int inter, long long c0,
                                           int r2, int kp) {
  for (int e = threadIdx.x; e < LSW_TN * kp; e += blockDim.x) {
    const int k = e / LSW_TN, c = e - k * LSW_TN;
    at[c][k] = (k < r2 && c0 + c < inter) ? a[(long long)k * inter + c0 + c] : from_f<T>(0.f);
  }
}

}  // namespace lsw

template <typename T>
__device__ __forceinline__ void lora_swiglu_body(const T *__restrict__ yb, const T *__restrict__ h,
                                                 const T *__restrict__ b, const T *__restrict__ dab,
                                                 const T *__restrict__ gd,
                                                 const T *__restrict__ ad, T *__restrict__ out,
                                                 long long rows, int inter, int r, int r2,
                                                 float s, bool backward) {
  using namespace lsw;
  constexpr int V = VecWidth<T>::value;
  __shared__ __align__(16) Smem<T> sm;
  const int warp = threadIdx.x >> 5;
  const int wr = (warp >> 1) * 16, wc = (warp & 1) * 32;
  const int kp = pad16(r), kp2 = backward ? pad16(r2) : 0;
  const long long c0 = (long long)blockIdx.x * LSW_TN;
  const long long two_i = 2LL * inter;
  const long long row_tiles = (rows + LSW_TM - 1) / LSW_TM;
  for (int p = 0; p < 2; ++p)
    // B_p's rows c0.. (rows past I are zero: each half ends at I).
    stage_rows<T>(sm.col.b[p], LSW_TN, b + (long long)p * inter * r, r, c0, inter, 0, r, kp);
  if (backward) stage_cols<T>(sm.col.at, ad, inter, c0, r2, kp2);
  // The pass over a tile: LSW_TM x LSW_TN / V packs, LSW_TN / V per row, NP per thread.
  constexpr int PPR = LSW_TN / V;
  constexpr int NP = LSW_TM * PPR / LSW_THREADS;
  static_assert(NP * LSW_THREADS == LSW_TM * PPR, "the tile's packs split evenly");
  for (long long rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const long long r0 = rt * LSW_TM;
    // This thread's packs of yb (and dab) are loaded first: their latency overlaps the staging
    // and the mma below.
    Pack<T, V> gp[NP], up[NP], dp[NP];
    bool in[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int p = threadIdx.x + j * LSW_THREADS;
      const int i = p / PPR, cp = (p - i * PPR) * V;
      const long long row = r0 + i, col = c0 + cp;
      in[j] = row < rows && col < inter;
      if (in[j]) {
        const T *yr = yb + row * two_i;
        gp[j] = load_pack<T, V>(yr + col);
        up[j] = load_pack<T, V>(yr + inter + col);
        if (backward) dp[j] = load_pack<T, V>(dab + row * inter + col);
      }
    }
    __syncthreads();  // the previous tile's pass is done with the products
    for (int p = 0; p < 2; ++p)
      stage_rows<T>(sm.in.h[p], LSW_TM, h, 2LL * r, r0, rows, p * r, r, kp);
    if (backward) stage_rows<T>(sm.in.gd, LSW_TM, gd, r2, r0, rows, 0, r2, kp2);
    __syncthreads();
    // Each warp computes its 16 x 32 piece of the two (three) products into registers; the
    // products then go over the staged inputs, so every warp's mma must be done first.
    {
      // Registers of the three products of this warp's piece.
      const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
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
          af[0] = *reinterpret_cast<const unsigned *>(&a[wr + g][k0 + 2 * t]);
          af[1] = *reinterpret_cast<const unsigned *>(&a[wr + g + 8][k0 + 2 * t]);
          af[2] = *reinterpret_cast<const unsigned *>(&a[wr + g][k0 + 2 * t + 8]);
          af[3] = *reinterpret_cast<const unsigned *>(&a[wr + g + 8][k0 + 2 * t + 8]);
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            const T *bn = bm[wc + n * 8 + g];
            const unsigned b0 = *reinterpret_cast<const unsigned *>(bn + k0 + 2 * t);
            const unsigned b1 = *reinterpret_cast<const unsigned *>(bn + k0 + 2 * t + 8);
            mma16816<T>(c[q][n], af, b0, b1);
          }
        }
      }
      __syncthreads();  // every warp has read the row inputs: the products go over them
      for (int q = 0; q < nq; ++q)
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int col = wc + n * 8 + 2 * t;
          sm.out.l[q][wr + g][col] = c[q][n][0];
          sm.out.l[q][wr + g][col + 1] = c[q][n][1];
          sm.out.l[q][wr + g + 8][col] = c[q][n][2];
          sm.out.l[q][wr + g + 8][col + 1] = c[q][n][3];
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      if (!in[j]) continue;
      const int p = threadIdx.x + j * LSW_THREADS;
      const int i = p / PPR, cp = (p - i * PPR) * V;
      const long long row = r0 + i, col = c0 + cp;
      if (!backward) {
        Pack<T, V> o;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float gv = to_f(gp[j].v[e]) + s * sm.out.l[0][i][cp + e];
          const float uv = to_f(up[j].v[e]) + s * sm.out.l[1][i][cp + e];
          o.v[e] = from_f<T>(gv * sigmoid_f(gv) * uv);
        }
        store_pack<T, V>(out + row * inter + col, o);
      } else {
        Pack<T, V> dg, du;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float gv = to_f(gp[j].v[e]) + s * sm.out.l[0][i][cp + e];
          const float uv = to_f(up[j].v[e]) + s * sm.out.l[1][i][cp + e];
          const float d = to_f(dp[j].v[e]) + sm.out.l[2][i][cp + e];
          const float sg = sigmoid_f(gv);
          dg.v[e] = from_f<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
          du.v[e] = from_f<T>(d * gv * sg);
        }
        store_pack<T, V>(out + row * two_i + col, dg);
        store_pack<T, V>(out + row * two_i + inter + col, du);
      }
    }
  }
}

#define LORA_SWIGLU_OP(T, SUFFIX)                                                                  \
  extern "C" __global__ void __launch_bounds__(LSW_THREADS)                                        \
      lora_swiglu_fwd_##SUFFIX(const T *yb, const T *h, const T *b, T *act, long long rows,        \
                               int inter, int r, float s) {                                        \
    lora_swiglu_body<T>(yb, h, b, nullptr, nullptr, nullptr, act, rows, inter, r, 0, s, false);    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(LSW_THREADS)                                        \
      lora_swiglu_bwd_##SUFFIX(const T *yb, const T *h, const T *b, const T *dab, const T *gd,     \
                               const T *ad, T *dgu, long long rows, int inter, int r, int r2,      \
                               float s) {                                                          \
    lora_swiglu_body<T>(yb, h, b, dab, gd, ad, dgu, rows, inter, r, r2, s, true);                  \
  }

LORA_SWIGLU_OP(__nv_bfloat16, bf16)
LORA_SWIGLU_OP(__half, f16)
