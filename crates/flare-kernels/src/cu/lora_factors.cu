// Staging of the LoRA factors for the fused LoRA ops (flare's `lora::op`), one launch where
// Candle's ops take one per tensor:
//   lora_factors_stack_b32 / lora_factors_stack_b16(s0, n0, s1, n1, s2, n2, dst):
//       dst = s0 ++ s1 ++ s2 (n0 + n1 + n2 elements of 4 or 2 bytes; n2 = 0 for two parts):
//       the factors of grouped projections stacked, the rows of one after the other's
//   lora_factors_cast_<t>(a, na, b, nb, oa, ob):
//       oa[i] = (t) a[i], ob[j] = (t) b[j], rounded to nearest even (Candle's cast): f32 A and B
//       brought to a half base dtype together
// Grid-stride loops over the elements of all parts together, one element per thread and step
// (the factors are rank x in and out x rank: small, latency-bound copies).
#include "common.cuh"

using namespace flare;

#define FACTORS_THREADS 256

template <typename E>
__device__ __forceinline__ void stack_rows_body(const E *__restrict__ s0, long long n0,
                                                const E *__restrict__ s1, long long n1,
                                                const E *__restrict__ s2, long long n2,
                                                E *__restrict__ dst) {
  const long long n = n0 + n1 + n2;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    E v;
    if (i < n0)
      v = s0[i];
    else if (i < n0 + n1)
      v = s1[i - n0];
    else
      v = s2[i - n0 - n1];
    dst[i] = v;
  }
}

template <typename T>
__device__ __forceinline__ void cast_pair_body(const float *__restrict__ a, long long na,
                                               const float *__restrict__ b, long long nb,
                                               T *__restrict__ oa, T *__restrict__ ob) {
  const long long n = na + nb;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (i < na)
      oa[i] = from_f<T>(a[i]);
    else
      ob[i - na] = from_f<T>(b[i - na]);
  }
}

#define STACK_ROWS(E, NAME)                                                                       \
  extern "C" __global__ void __launch_bounds__(FACTORS_THREADS)                                 \
      NAME(const E *s0, long long n0, const E *s1, long long n1, const E *s2, long long n2,     \
           E *dst) {                                                                            \
    stack_rows_body<E>(s0, n0, s1, n1, s2, n2, dst);                                            \
  }

STACK_ROWS(unsigned int, lora_factors_stack_b32)
STACK_ROWS(unsigned short, lora_factors_stack_b16)

#define CAST_PAIR(T, NAME)                                                                        \
  extern "C" __global__ void __launch_bounds__(FACTORS_THREADS)                                 \
      NAME(const float *a, long long na, const float *b, long long nb, T *oa, T *ob) {          \
    cast_pair_body<T>(a, na, b, nb, oa, ob);                                                    \
  }

CAST_PAIR(__half, lora_factors_cast_f16)
CAST_PAIR(__nv_bfloat16, lora_factors_cast_bf16)
