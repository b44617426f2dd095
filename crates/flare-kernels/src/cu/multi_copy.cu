// Many contiguous buffers copied in one launch: the training step graph's gradient outputs
// (flare's `train::step_graph`), where one copy launch per parameter tensor made a tail of
// tiny launches (448 in a Llama-3.1-8B step with adapters on every projection, about 2 us
// each).
//
//   multi_copy_16(list): for every entry e < gridDim.y, list.dst[e][i] = list.src[e][i] for
//   i < list.packs[e], in 16-byte packs (the host passes only 16-byte aligned buffers of whole
//   packs). The list travels by value as the kernel's parameter (MULTI_COPY_MAX entries,
//   1.5 KiB), so a captured graph keeps it with the launch.
// Grid: y over the entries, x a grid-stride loop over an entry's packs.
#include "common.cuh"

#define MULTI_COPY_MAX 64
#define MULTI_COPY_THREADS 256

struct MultiCopyList {
  const uint4 *src[MULTI_COPY_MAX];
  uint4 *dst[MULTI_COPY_MAX];
  long long packs[MULTI_COPY_MAX];
};

extern "C" __global__ void __launch_bounds__(MULTI_COPY_THREADS) multi_copy_16(MultiCopyList list) {
  const int e = blockIdx.y;
  const uint4 *__restrict__ s = list.src[e];
  uint4 *__restrict__ d = list.dst[e];
  const long long n = list.packs[e];
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    d[i] = s[i];
}
