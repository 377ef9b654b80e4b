// A CPU stand-in for the part of the CUDA runtime and device language that
// csrc/kernels/fq_cuda.cu uses, so that the CUDA kernels themselves (their
// indexing, warp and block reductions, vector loads, masks) run and are tested
// bit for bit on a machine with no GPU.  Test infrastructure only: see
// tests/cuda_emu/build.py, which compiles fq_cuda.cu against this header with
// the host compiler after rewriting each `kernel<<<grid, block, smem,
// stream>>>(args)` into `aoq_emu::launch(kernel, grid, block, smem,
// stream)(args)`.
//
// Execution model.  Blocks run one after another; the threads of a block run
// as cooperative fibers (ucontext) on one OS thread, each until it reaches a
// barrier, in an order the test chooses (ascending, descending, random: a
// result that depends on it reveals a data race).  __syncthreads() is a block barrier; every warp shuffle is a warp
// barrier (all 32 lanes deposit their value, then all read).  Shuffles by a
// partial warp, a __syncthreads() not reached by every live thread of the
// block, or lanes of one warp at different shuffle counts are reported as
// launch errors (the GPU would hang or give undefined results there).
// __shared__ variables are function statics (one block at a time uses them),
// poisoned before every block; a launch's dynamic shared memory is a buffer of
// exactly its size (an AddressSanitizer build reports accesses past it),
// poisoned the same way.  As on a GPU, static and dynamic shared memory
// together may not pass 48 KiB unless cudaFuncSetAttribute allowed the kernel
// more on the current device, up to that device's limit (aoq_emu_set_smem);
// every kernel is taken to have AOQ_EMU_STATIC_SMEM bytes of static shared
// memory (more than ours have), so a launch policy that forgets the static
// part fails.
// A 16-byte vector access (uint4) or 8-byte one (uint2) at an address not
// aligned to its size is a launch error, as it is a fault on the GPU.
//
// Blind spots (left to compute-sanitizer on a GPU): a fiber is never
// interrupted between barriers, so a lost update of a non-atomic
// read-modify-write shared by threads cannot show.  __shared__ memory
// starts each block filled with 0xff bytes (NaN, -1), not undefined, so a
// read of shared memory the block never wrote shows as a wrong result.
#ifndef AOQ_CUDA_EMU_RUNTIME_H
#define AOQ_CUDA_EMU_RUNTIME_H

// kernels built for the emulator may keep test counters (fq_cuda.cu: AOQ_COUNT_PATH)
#define AOQ_EMU 1

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <ucontext.h>

#include <map>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ declarations are rewritten by build.py into registered statics
// (struct SharedReg below)

typedef int cudaError_t;
typedef void *cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

struct dim3 {
  unsigned x, y, z;
};

namespace aoq_emu {

// emulated devices: index 0 .. ndev-1 (set by the test through aoq_emu_set_devices)
inline int &ndev() {
  static int n = 1;
  return n;
}
inline int &cur_device() {
  static int d = 0;
  return d;
}
// shared memory of each emulated device (bytes): a block's opt-in limit and
// an SM's total (an H100's by default)
struct SmemLimits {
  int optin = 232448, per_sm = 233472;
};
enum { MAX_DEVICES = 8 };
inline SmemLimits &smem_limits(int device) {
  static SmemLimits l[MAX_DEVICES];
  return l[device];
}
#ifndef AOQ_EMU_STATIC_SMEM
#define AOQ_EMU_STATIC_SMEM 1024
#endif
// dynamic shared memory each kernel is allowed on each device
// (cudaFuncSetAttribute acts on the current device)
inline std::map<std::pair<const void *, int>, int> &func_smem() {
  static std::map<std::pair<const void *, int>, int> m;
  return m;
}
inline size_t &last_smem() {
  static size_t n = 0;
  return n;
}
inline cudaError_t &pending_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline char *error_detail() {
  static char msg[256];
  return msg;
}
inline void fail(cudaError_t e, const char *what, unsigned block, unsigned thread) {
  if (pending_error() == cudaSuccess) {
    pending_error() = e;
    snprintf(error_detail(), 256, "%s (block %u, thread %u)", what, block, thread);
  }
}

enum { READY, AT_WARP, AT_BLOCK, DONE };

// bytes of stack per emulated thread (the kernels' frames are small; ASan's
// unpoisoning at every switch costs in proportion)
#ifndef AOQ_EMU_STACK
#define AOQ_EMU_STACK (128 * 1024)
#endif

struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  int state;
  int started;
  long warp_syncs, block_syncs;
  int site;       // source line of the barrier it waits at
  uint32_t slot;  // shuffle value deposited at the current warp barrier
};

struct Block {
  std::vector<Fiber> f;
  std::vector<char> stacks;
  size_t stack_size = AOQ_EMU_STACK;
  unsigned nthreads = 0, cur = 0;
  dim3 tid{0, 0, 0}, bid{0, 0, 0}, bdim{1, 1, 1}, gdim{1, 1, 1};
  jmp_buf sched;
  void (*body)(void *) = nullptr;
  void *body_arg = nullptr;
  unsigned char *dyn = nullptr;  // the launch's dynamic shared memory
  size_t dyn_size = 0;
};
inline Block &blk() {
  static Block b;
  return b;
}

// AddressSanitizer builds (the emulated memcheck, see build.py): tell ASan
// about every stack switch, or it takes the fiber stacks for corruption.
#if defined(__SANITIZE_ADDRESS__)
}  // namespace aoq_emu
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
namespace aoq_emu {
struct MainStack {
  const void *bottom = nullptr;
  size_t size = 0;
};
inline MainStack &main_stack() {
  static MainStack m;
  return m;
}
// on a fiber, about to jump to the scheduler (exiting: the fiber is done)
inline void asan_to_main(bool exiting) {
  static void *fake;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, main_stack().bottom, main_stack().size);
}
// on a fiber, just arrived from the scheduler
inline void asan_on_fiber() {
  __sanitizer_finish_switch_fiber(nullptr, &main_stack().bottom, &main_stack().size);
}
// on the scheduler, about to jump to a fiber's stack / just back from one
inline void asan_to_fiber(const void *stack, size_t size) {
  static void *fake;
  __sanitizer_start_switch_fiber(&fake, stack, size);
}
inline void asan_on_main() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
// a fiber stack about to be reused: clear what an abandoned fiber left poisoned
inline void asan_fresh_stack(void *stack, size_t size) { __asan_unpoison_memory_region(stack, size); }
#else
inline void asan_fresh_stack(void *, size_t) {}
inline void asan_to_main(bool) {}
inline void asan_on_fiber() {}
inline void asan_to_fiber(const void *, size_t) {}
inline void asan_on_main() {}
#endif

// every __shared__ variable the kernels have declared so far: filled with
// 0xff bytes (a NaN as float, -1 as int) before each block
struct SharedRegion {
  void *p;
  size_t n;
};
inline std::vector<SharedRegion> &shared_regions() {
  static std::vector<SharedRegion> r;
  return r;
}
struct SharedReg {
  SharedReg(void *p, size_t n) {
    memset(p, 0xff, n);
    shared_regions().push_back(SharedRegion{p, n});
  }
};

// what `extern __shared__ T name[];` becomes (build.py)
inline void *dyn_shared() { return blk().dyn; }

inline void yield_to_scheduler() {
  Block &b = blk();
  if (!_setjmp(b.f[b.cur].jb)) {
    asan_to_main(false);
    _longjmp(b.sched, 1);
  }
  asan_on_fiber();
}

inline void fiber_entry() {
  asan_on_fiber();
  Block &b = blk();
  b.body(b.body_arg);
  b.f[b.cur].state = DONE;
  asan_to_main(true);
  _longjmp(b.sched, 1);
}

inline void syncthreads(int site) {
  Block &b = blk();
  b.f[b.cur].site = site;
  b.f[b.cur].state = AT_BLOCK;
  b.f[b.cur].block_syncs++;
  yield_to_scheduler();
}

inline uint32_t shuffle(uint32_t v, unsigned mask, int src_of_lane /* -1: own */, int site) {
  Block &b = blk();
  b.f[b.cur].site = site;
  if (mask != 0xffffffffu) fail(cudaErrorLaunchFailure, "shuffle with a partial mask", b.bid.x, b.cur);
  Fiber &me = b.f[b.cur];
  me.slot = v;
  me.state = AT_WARP;
  me.warp_syncs++;
  yield_to_scheduler();  // every lane has deposited
  const unsigned warp0 = b.cur & ~31u;
  const uint32_t r = src_of_lane < 0 ? v : b.f[warp0 + (unsigned)src_of_lane].slot;
  b.f[b.cur].state = AT_WARP;
  b.f[b.cur].warp_syncs++;
  yield_to_scheduler();  // every lane has read
  return r;
}

// the order in which the threads of a block run between two barriers: 0
// ascending, 1 descending, 2 random.  A kernel whose results change with it
// has a data race (two threads touching one location between barriers).
inline int &sched_order() {
  static int o = 0;
  return o;
}
inline uint64_t &rng() {
  static uint64_t r = 0x9e3779b97f4a7c15ull;
  return r;
}

// run one block of nthreads fibers to completion
inline void run_block() {
  Block &b = blk();
  const unsigned n = b.nthreads;
  for (unsigned t = 0; t < n; t++) {
    Fiber &f = b.f[t];
    f.state = READY;
    f.started = 0;
    f.warp_syncs = f.block_syncs = 0;
  }
  for (const SharedRegion &r : shared_regions()) memset(r.p, 0xff, r.n);
  if (b.dyn) memset(b.dyn, 0xff, b.dyn_size);
  unsigned live = n;
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; i++) order[i] = sched_order() == 1 ? n - 1 - i : i;
  while (live) {
    if (sched_order() == 2)  // a new random order for every barrier interval
      for (unsigned i = n - 1; i > 0; i--) {
        rng() = rng() * 6364136223846793005ull + 1442695040888963407ull;
        const unsigned j = (unsigned)((rng() >> 33) % (i + 1));
        const unsigned tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
      }
    for (unsigned i = 0; i < n; i++) {
      const unsigned t = order[i];
      Fiber &f = b.f[t];
      if (f.state != READY) continue;
      b.cur = t;
      b.tid = dim3{t, 0, 0};
      if (!_setjmp(b.sched)) {
        asan_to_fiber(b.stacks.data() + (size_t)t * b.stack_size, b.stack_size);
        if (!f.started) {
          f.started = 1;
          asan_fresh_stack(b.stacks.data() + (size_t)t * b.stack_size, b.stack_size);
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = b.stacks.data() + (size_t)t * b.stack_size;
          f.uc.uc_stack.ss_size = b.stack_size;
          f.uc.uc_link = nullptr;
          makecontext(&f.uc, fiber_entry, 0);
          ucontext_t here;
          swapcontext(&here, &f.uc);  // never returns here: the fiber longjmps to b.sched
        } else {
          _longjmp(f.jb, 1);
        }
      }
      asan_on_main();
      if (f.state == DONE) live--;
    }
    if (!live) break;
    // release every warp whose 32 lanes wait at a warp barrier
    bool released = false;
    for (unsigned w0 = 0; w0 < n; w0 += 32) {
      unsigned at = 0;
      const unsigned wn = (n - w0) < 32 ? (n - w0) : 32;
      for (unsigned l = 0; l < wn; l++) at += b.f[w0 + l].state == AT_WARP;
      if (!at) continue;
      if (at != 32) {
        fail(cudaErrorLaunchFailure, "warp shuffle not reached by all 32 lanes of the warp", b.bid.x, w0);
        return;
      }
      for (unsigned l = 1; l < 32; l++)
        if (b.f[w0 + l].warp_syncs != b.f[w0].warp_syncs || b.f[w0 + l].site != b.f[w0].site) {
          fail(cudaErrorLaunchFailure, "lanes of a warp at different shuffles", b.bid.x, w0 + l);
          return;
        }
      for (unsigned l = 0; l < 32; l++) b.f[w0 + l].state = READY;
      released = true;
    }
    if (released) continue;
    // otherwise every live thread must wait at the same __syncthreads
    for (unsigned t = 0; t < n; t++) {
      Fiber &f = b.f[t];
      if (f.state == DONE) {
        fail(cudaErrorLaunchFailure, "__syncthreads after some threads of the block returned", b.bid.x, t);
        return;
      }
      if (f.state != AT_BLOCK || f.block_syncs != b.f[0].block_syncs || f.site != b.f[0].site) {
        fail(cudaErrorLaunchFailure, "threads of a block at different __syncthreads", b.bid.x, t);
        return;
      }
    }
    for (unsigned t = 0; t < n; t++) b.f[t].state = READY;
  }
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  unsigned grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... a) {
    if (pending_error() != cudaSuccess) return;
    if (grid == 0 || block == 0 || block > 1024) {
      fail(cudaErrorInvalidConfiguration, "invalid launch configuration", grid, block);
      return;
    }
    const auto allowed = func_smem().find({reinterpret_cast<const void *>(kernel), cur_device()});
    if (smem > (allowed == func_smem().end() ? 48 * 1024 - AOQ_EMU_STATIC_SMEM : (size_t)allowed->second)) {
      fail(cudaErrorInvalidValue, "dynamic shared memory over the kernel's limit", grid, block);
      return;
    }
    last_smem() = smem;
    Block &b = blk();
    b.nthreads = block;
    if (b.f.size() < block) b.f.resize(block);
    if (b.stacks.size() < (size_t)block * b.stack_size) b.stacks.resize((size_t)block * b.stack_size);
    b.bdim = dim3{block, 1, 1};
    b.gdim = dim3{grid, 1, 1};
    // the fibers call the kernel through a closure over the launch arguments
    auto tuple_call = [](void *p) {
      auto *c = static_cast<std::pair<void (*)(P...), std::tuple<A...>> *>(p);
      std::apply([&](A... x) { c->first(x...); }, c->second);
    };
    std::pair<void (*)(P...), std::tuple<A...>> closure(kernel, std::tuple<A...>(a...));
    b.body = tuple_call;
    b.body_arg = &closure;
    void *dyn = nullptr;
    if (smem && posix_memalign(&dyn, 16, smem)) {
      fail(cudaErrorInvalidValue, "no host memory for the dynamic shared memory", grid, block);
      return;
    }
    b.dyn = static_cast<unsigned char *>(dyn);
    b.dyn_size = smem;
    for (unsigned x = 0; x < grid && pending_error() == cudaSuccess; x++) {
      b.bid = dim3{x, 0, 0};
      run_block();
    }
    free(dyn);
    b.dyn = nullptr;
    b.dyn_size = 0;
  }
};

template <typename... P>
Launch<P...> launch(void (*k)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t) {
  return Launch<P...>{k, grid, block, smem};
}

inline void check_align(const void *p, unsigned a) {
  if ((uintptr_t)p % a) fail(cudaErrorMisalignedAddress, "misaligned vector access", blk().bid.x, blk().cur);
}

}  // namespace aoq_emu

#define threadIdx (aoq_emu::blk().tid)
#define blockIdx (aoq_emu::blk().bid)
#define blockDim (aoq_emu::blk().bdim)
#define gridDim (aoq_emu::blk().gdim)

// barriers carry their source line, so that threads waiting at two different
// __syncthreads (or shuffles) are told apart
#define __syncthreads() aoq_emu::syncthreads(__LINE__)

template <typename T>
inline T aoq_emu_shfl(unsigned mask, T v, int src, int site) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t u;
  memcpy(&u, &v, 4);
  u = aoq_emu::shuffle(u, mask, src, site);
  memcpy(&v, &u, 4);
  return v;
}
#define __shfl_xor_sync(mask, v, off) aoq_emu_shfl((mask), (v), (int)((threadIdx.x & 31u) ^ (unsigned)(off)), __LINE__)
#define __shfl_down_sync(mask, v, off)                                                                   \
  aoq_emu_shfl((mask), (v), (threadIdx.x & 31u) + (unsigned)(off) < 32u ? (int)((threadIdx.x & 31u) + (off)) \
                                                                       : -1, __LINE__)
#define __shfl_sync(mask, v, src) aoq_emu_shfl((mask), (v), (int)(src) & 31, __LINE__)
// a vote: whether pred holds in every lane (a butterfly of shuffles, so the
// same warp-barrier checks apply)
inline int aoq_emu_all(unsigned mask, int pred, int site) {
  uint32_t v = pred != 0;
  for (unsigned off = 16; off >= 1; off >>= 1) v &= aoq_emu::shuffle(v, mask, (int)((threadIdx.x & 31u) ^ off), site);
  return (int)v;
}
#define __all_sync(mask, pred) aoq_emu_all((mask), (pred), __LINE__)

// vector types whose copies check the alignment the GPU requires
struct uint2 {
  unsigned x, y;
  uint2() = default;
  uint2(const uint2 &o) {
    aoq_emu::check_align(&o, 8);
    x = o.x;
    y = o.y;
  }
  uint2 &operator=(const uint2 &o) {
    aoq_emu::check_align(this, 8);
    aoq_emu::check_align(&o, 8);
    x = o.x;
    y = o.y;
    return *this;
  }
};
struct uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4 &o) {
    aoq_emu::check_align(&o, 16);
    x = o.x, y = o.y, z = o.z, w = o.w;
  }
  uint4 &operator=(const uint4 &o) {
    aoq_emu::check_align(this, 16);
    aoq_emu::check_align(&o, 16);
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};

inline cudaError_t cudaGetDevice(int *d) {
  *d = aoq_emu::cur_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= aoq_emu::ndev()) return cudaErrorInvalidDevice;
  aoq_emu::cur_device() = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int d) {
  if (d < 0 || d >= aoq_emu::ndev()) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = aoq_emu::smem_limits(d).optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = aoq_emu::smem_limits(d).per_sm; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F *kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value + AOQ_EMU_STATIC_SMEM > aoq_emu::smem_limits(aoq_emu::cur_device()).optin)
    return cudaErrorInvalidValue;
  aoq_emu::func_smem()[{reinterpret_cast<const void *>(kernel), aoq_emu::cur_device()}] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  cudaError_t e = aoq_emu::pending_error();
  aoq_emu::pending_error() = cudaSuccess;
  return e;
}
inline const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return aoq_emu::error_detail();
  }
}

// knobs for the tests (this header is compiled into exactly one translation unit)
extern "C" void aoq_emu_set_devices(int n) { aoq_emu::ndev() = n < aoq_emu::MAX_DEVICES ? n : aoq_emu::MAX_DEVICES; }
extern "C" int aoq_emu_get_device(void) { return aoq_emu::cur_device(); }
extern "C" void aoq_emu_set_order(int o) { aoq_emu::sched_order() = o; }
// an emulated device's shared memory (bytes per block with opt-in, per SM);
// set it before the device's first launch (the launchers ask once per
// device and kernel for their allowance, as on a GPU, whose limits are fixed)
extern "C" void aoq_emu_set_smem(int device, int optin, int per_sm) {
  if (device >= 0 && device < aoq_emu::MAX_DEVICES) aoq_emu::smem_limits(device) = aoq_emu::SmemLimits{optin, per_sm};
}
// dynamic shared memory of the last launch (bytes)
extern "C" size_t aoq_emu_last_smem(void) { return aoq_emu::last_smem(); }

#endif
