// Gradient accumulation: out = a + b, elementwise over two contiguous tensors of one shape,
// computed in f32 and rounded once (the value of Candle's own add, which the backward pass
// otherwise runs with one 2-byte access per element: about a third of the bandwidth).
//
// Every thread adds 16-byte packs (V = 16 / sizeof(T) elements), striding over the packs; the
// tail of n % V elements is added one by one by the first threads. The launcher guarantees
// that a, b and out are 16-byte aligned.
#include "common.cuh"

using namespace flare;

#define GRAD_ADD_THREADS 256

template <typename T>
__device__ __forceinline__ void grad_add_body(const T *__restrict__ a, const T *__restrict__ b,
                                              T *__restrict__ out, long long n) {
  constexpr int V = VecWidth<T>::value;
  const long long packs = n / V;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long long p = first; p < packs; p += stride) {
    const Pack<T, V> x = load_pack<T, V>(a + p * V);
    const Pack<T, V> y = load_pack<T, V>(b + p * V);
    Pack<T, V> s;
#pragma unroll
    for (int e = 0; e < V; ++e) s.v[e] = from_f<T>(to_f(x.v[e]) + to_f(y.v[e]));
    store_pack<T, V>(out + p * V, s);
  }
  const long long i = packs * V + first;
  if (i < n) out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}

#define GRAD_ADD_OP(T, NAME)                                                                      \
  extern "C" __global__ void __launch_bounds__(GRAD_ADD_THREADS)                                \
      NAME(const T *a, const T *b, T *out, long long n) {                                       \
    grad_add_body<T>(a, b, out, n);                                                             \
  }

GRAD_ADD_OP(float, grad_add_f32)
GRAD_ADD_OP(__half, grad_add_f16)
GRAD_ADD_OP(__nv_bfloat16, grad_add_bf16)
