// AdamW, multi-tensor: one launch updates every parameter tensor of an optimizer.
//
//   g  = grad * grad_scale                       (grad_scale folds in global-norm clipping)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p  = p * (1 - lr * weight_decay)             (decoupled weight decay)
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - beta_k^step
//
// the order and grouping of torch.optim.AdamW. Parameters, gradients and both moments are f32.
// The tensors are described by a device table of 5 x u64 per tensor: (param, grad, m, v, len);
// blockIdx.y picks the tensor and the x dimension strides over its elements. Every element is
// read and written once; p, m and v are updated in place (=).
#include <stdint.h>

#define ADAMW_THREADS 256

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_multi_f32(const unsigned long long *__restrict__ table, float lr, float beta1,
                    float beta2, float eps, float weight_decay, float bc1, float bc2_sqrt,
                    float grad_scale) {
  const unsigned long long *d = table + 5ull * blockIdx.y;
  float *p = reinterpret_cast<float *>(d[0]);
  const float *g = reinterpret_cast<const float *>(d[1]);
  float *m = reinterpret_cast<float *>(d[2]);
  float *v = reinterpret_cast<float *>(d[3]);
  const long long n = (long long)d[4];
  const float decay = 1.f - lr * weight_decay;
  const float step = lr / bc1;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float gi = g[i] * grad_scale;
    const float mi = beta1 * m[i] + (1.f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = p[i] * decay - step * (mi / denom);
  }
}
