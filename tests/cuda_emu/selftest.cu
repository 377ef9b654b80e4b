// Kernels that check the emulator itself (tests/test_cuda_emu.py): it must
// compute warp shuffles and block reductions as a GPU does, and report the
// faults a GPU would give (misaligned vector access) or the code the GPU
// would hang on or give undefined results for (divergent shuffles or
// __syncthreads; a __syncthreads some threads never reach because they
// returned is undefined as well in CUDA's programming guide).  Kept valid
// CUDA: `.ci/run` compiles it with nvcc too.
#include <cuda_runtime.h>
#include <stdint.h>

#define DYN_BYTES 65536

namespace {

// out[b * 4 + 0..3]: shfl_xor max, shfl_down sum tree (lane 0), shfl broadcast
// of lane 5, and a block-wide sum through shared memory, over v = tid + 1
__global__ void reduce_kernel(float *out) {
  __shared__ float sh[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  float v = (float)(threadIdx.x + 1 + blockIdx.x * 1000);
  float mx = v, sm = v;
  for (int off = 16; off >= 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  for (int off = 16; off >= 1; off >>= 1) sm += __shfl_down_sync(0xffffffffu, sm, off);
  const float b5 = __shfl_sync(0xffffffffu, v, 5);
  if (lane == 0) sh[warp] = sm;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; w++) t += sh[w];
    out[blockIdx.x * 4 + 0] = mx;  // warp 0's max
    out[blockIdx.x * 4 + 2] = b5;
    out[blockIdx.x * 4 + 3] = t;
  }
  if (threadIdx.x == 32) out[blockIdx.x * 4 + 1] = sm;  // warp 1's sum, from its lane 0
}

__global__ void misaligned_kernel(const char *p, uint4 *out) {
  if (threadIdx.x == 0) out[0] = *reinterpret_cast<const uint4 *>(p + 8);
}

__global__ void divergent_shuffle_kernel(float *out) {
  float v = 1.f;
  if ((threadIdx.x & 31u) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void divergent_sync_kernel(float *out) {
  if (threadIdx.x < 64) __syncthreads();
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void early_return_sync_kernel(float *out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// reads a neighbour's shared value with no __syncthreads between: a race
__global__ void race_kernel(float *out) {
  __shared__ float sh[1024];
  sh[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
}

// reads one element past the end of its blockDim.x-element buffer
__global__ void oob_kernel(float *out) {
  out[threadIdx.x] = out[threadIdx.x + 1];
}

// reads shared memory only block 0 wrote: other blocks must see garbage
// (the emulator's poison), not block 0's values
__global__ void stale_shared_kernel(float *out) {
  __shared__ float sh[256];
  if (blockIdx.x == 0) sh[threadIdx.x] = 1.f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = sh[threadIdx.x];
}

// dynamic shared memory of n floats: out[t] = thread t+1's write (after the
// barrier); thread 0 also reads the last float, never written
// (out[blockDim.x]), and, with `past`, the float after it, outside the buffer.
// TAG: distinct kernels, for distinct cudaFuncSetAttribute allowances.
template <int TAG>
__global__ void dyn_shared_kernel(float *out, unsigned n, int past) {
  extern __shared__ float dsh[];
  dsh[threadIdx.x] = (float)(threadIdx.x + 1);
  __syncthreads();
  out[threadIdx.x] = dsh[(threadIdx.x + 1) % blockDim.x];
  if (threadIdx.x == 0) out[blockDim.x] = dsh[n - 1 + past];
}

}  // namespace

extern "C" int emu_selftest(int which, void *a, void *b, unsigned grid, unsigned block) {
  switch (which) {
    case 0: reduce_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 1: misaligned_kernel<<<grid, block, 0, 0>>>((const char *)a, (uint4 *)b); break;
    case 2: divergent_shuffle_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 3: divergent_sync_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 4: early_return_sync_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 5: race_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 6: oob_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    case 7: stale_shared_kernel<<<grid, block, 0, 0>>>((float *)a); break;
    // 64 KiB of dynamic shared memory: without the kernel's allowance (8), a
    // launch error; with it (9); with it, and one float read past the end (10)
    case 8: dyn_shared_kernel<0><<<grid, block, DYN_BYTES, 0>>>((float *)a, DYN_BYTES / 4, 0); break;
    case 9:
    case 10:
      if (cudaFuncSetAttribute(dyn_shared_kernel<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, DYN_BYTES) !=
          cudaSuccess)
        return -2;
      dyn_shared_kernel<0><<<grid, block, DYN_BYTES, 0>>>((float *)a, DYN_BYTES / 4, which == 10);
      break;
    // 512 bytes under 48 KiB, no allowance: the static shared memory (taken
    // as 1 KiB by the emulator) makes it too much, as on a GPU
    case 11: dyn_shared_kernel<1><<<grid, block, 48 * 1024 - 512, 0>>>((float *)a, (48 * 1024 - 512) / 4, 0); break;
    default: return -1;
  }
  return (int)cudaGetLastError();
}

extern "C" const char *emu_selftest_error(int e) { return cudaGetErrorString((cudaError_t)e); }
