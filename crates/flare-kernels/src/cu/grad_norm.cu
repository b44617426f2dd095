// Global gradient norm, multi-tensor: sum(g^2) over every gradient tensor of an optimizer in two
// launches and one 8-byte read, instead of a reduction per tensor.
//
//   grad_norm_part_f32:  partial[t * gridDim.x + bx] = sum over the elements i of tensor t that
//                    block bx strides over of (double)g[i]^2
//   grad_norm_final:     out[0] = sum of the `n` partials
//
// The tensors are described by a device table of 2 x u64 per tensor: (pointer to f32 data, len);
// blockIdx.y picks the tensor, the x dimension strides over its elements. Every square and every
// sum is in double (f64), so the result differs from an f64 host loop only by the order of the
// additions (a relative difference of order 1e-15 for the norms of gradients); the order is fixed
// (no atomics), so the result is deterministic. Outputs are overwritten (=).
#include <stdint.h>

#define GRAD_NORM_THREADS 256
#define GRAD_NORM_FINAL_THREADS 1024

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

extern "C" __global__ void __launch_bounds__(GRAD_NORM_THREADS)
    grad_norm_part_f32(double *__restrict__ partial, const unsigned long long *__restrict__ table) {
  const unsigned long long *d = table + 2ull * blockIdx.y;
  const float *g = reinterpret_cast<const float *>(d[0]);
  const long long n = (long long)d[1];
  double acc = 0.0;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const double x = (double)g[i];
    acc += x * x;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

extern "C" __global__ void __launch_bounds__(GRAD_NORM_FINAL_THREADS)
    grad_norm_final(double *__restrict__ out, const double *__restrict__ partial, long long n) {
  double acc = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc;
}
