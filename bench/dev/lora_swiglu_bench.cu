// Standalone timing of crates/flare-kernels/src/cu/lora_swiglu.cu at one layer of the
// Llama-3.1-8B shape (T tokens, I = 14336, ranks 16), on the GPU machine, with nvcc there:
//
//   nvcc -O3 -arch=sm_90 -I crates/flare-kernels/src/cu bench/dev/lora_swiglu_bench.cu \
//       -o /tmp/lsw_bench && /tmp/lsw_bench [T] [I] [r] [r2]
//
// For each row-tile count per block (the host's LSW_ROW_TILES), the forward's and backward's
// mean time over 50 launches (CUDA events), their bytes over that time, and a device-to-device
// copy of the forward's bytes as the bandwidth anchor. Under `ncu --kernel-name
// regex:lora_swiglu` it gives one launch of each to profile. Inputs are random bf16; the
// kernels' numerics are checked elsewhere (bench/dev/lora_swiglu_emu.cpp, the Rust tests).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "lora_swiglu.cu"

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

using bf = __nv_bfloat16;

__global__ void fill(bf *p, long long n, unsigned seed, float sd) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16(sd * (((h & 0xFFFF) / 32768.0f) - 1.0f));
  }
}

static bf *alloc(long long n, unsigned seed, float sd) {
  bf *p;
  CK(cudaMalloc(&p, n * sizeof(bf)));
  fill<<<1024, 256>>>(p, n, seed, sd);
  CK(cudaGetLastError());
  return p;
}

template <typename F> static float time_ms(F f, int iters) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  CK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) f();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms / iters;
}

int main(int argc, char **argv) {
  const long long T = argc > 1 ? atoll(argv[1]) : 4096;
  const int I = argc > 2 ? atoi(argv[2]) : 14336;
  const int r = argc > 3 ? atoi(argv[3]) : 16, r2 = argc > 4 ? atoi(argv[4]) : 16;
  const int iters = getenv("ITERS") ? atoi(getenv("ITERS")) : 50;
  bf *yb = alloc(T * 2 * I, 1, 2.f), *h = alloc(T * 2 * r, 2, 1.f), *b = alloc(2LL * I * r, 3, .3f),
     *dab = alloc(T * I, 4, 1.f), *gd = alloc(T * r2, 5, .5f), *ad = alloc((long long)r2 * I, 6, .5f);
  bf *act, *dgu;
  CK(cudaMalloc(&act, T * I * sizeof(bf)));
  CK(cudaMalloc(&dgu, T * 2 * I * sizeof(bf)));
  const double fwd_bytes = (3.0 * T * I) * 2, bwd_bytes = (5.0 * T * I) * 2;
  printf("T %lld I %d r %d r2 %d: forward moves %.0f MB, backward %.0f MB\n", T, I, r, r2,
         fwd_bytes / 1e6, bwd_bytes / 1e6);
  const float cp = time_ms([&] { CK(cudaMemcpyAsync(dgu, yb, (size_t)(T * I * 3 / 2) * 2,
                                                     cudaMemcpyDeviceToDevice)); }, iters);
  printf("copy of the forward's bytes (read + write):  %8.1f us  %6.0f GB/s\n", cp * 1e3,
         fwd_bytes / cp / 1e6);
  const long long row_tiles = (T + LSW_TM - 1) / LSW_TM;
  const int tiles_list[] = {1, 2, 4, 8, 16, 32};
  for (int tiles : tiles_list) {
    dim3 grid((I + LSW_TN - 1) / LSW_TN, (unsigned)((row_tiles + tiles - 1) / tiles));
    if (getenv("ONLY") && atoi(getenv("ONLY")) != tiles) continue;
    const float f = time_ms([&] {
      lora_swiglu_fwd_bf16<<<grid, LSW_THREADS>>>(yb, h, b, act, T, I, r, 0.5f);
    }, iters);
    const float g = time_ms([&] {
      lora_swiglu_bwd_bf16<<<grid, LSW_THREADS>>>(yb, h, b, dab, gd, ad, dgu, T, I, r, r2, 0.5f);
    }, iters);
    CK(cudaGetLastError());
    printf("row tiles per block %2d (grid %ux%u): forward %7.1f us (%5.0f GB/s)  backward %7.1f us "
           "(%5.0f GB/s)\n",
           tiles, grid.x, grid.y, f * 1e3, fwd_bytes / f / 1e6, g * 1e3, bwd_bytes / g / 1e6);
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
