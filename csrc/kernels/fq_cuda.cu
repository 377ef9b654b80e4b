// CUDA kernels for every ao_awq op, behind plain extern "C" launchers over
// pointers, sizes, a device index and a stream (no torch types).
//
// Layout: one block of AOQ_NW warps per row.  A warp owns whole groups
// (groups w, w+NW, ... of its row), each lane a contiguous chunk of E = g/32
// elements loaded with one vector access (the canonical layout: the fp8 row
// max's; the forward and both backwards hold more of a group per lane, see
// FwdLayout, AB_C and AOQ_FP8_BWD_C).  The per-element math is the aoq_rows.h /
// aoq_math.h code the CPU kernel runs (or, in the fast paths, code shown equal
// to it on its domain), and every sum follows the canonical order documented
// in fq_cpu.c, so outputs and gradients are bit identical to the CPU kernels.
// Build with --fmad=false (no FMA contraction).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include <atomic>

#include "aoq_kernels.h"
#include "aoq_rows.h"

#define TPB (AOQ_NW * 32)
#define FULL 0xffffffffu

namespace {

__device__ __forceinline__ float nanmax(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float nanmin(float a, float b) { return (a != a || a < b) ? a : b; }

// max / min over aligned groups of W lanes (the whole warp by default; every
// lane of the warp takes part)
template <int W = 32>
__device__ __forceinline__ float warp_max(float v) {
  for (int off = W / 2; off >= 1; off >>= 1) v = nanmax(v, __shfl_xor_sync(FULL, v, off));
  return v;
}
template <int W = 32>
__device__ __forceinline__ float warp_min(float v) {
  for (int off = W / 2; off >= 1; off >>= 1) v = nanmin(v, __shfl_xor_sync(FULL, v, off));
  return v;
}
// The canonical halving tree of a group's 32 chunk sums (lane l += lane l +
// off, off = 16, ..., 1) where each lane of W = 32 / C holds C of them, s[k]
// the chunk of canonical lane L + W * k (L = lane % W): the first levels
// inside the lane, the last ones by shuffles among its W lanes; the result,
// that of the group's first lane, in all W (C = 1: the plain warp sum)
template <int C>
__device__ __forceinline__ float chunks_sum(const float *s) {
  constexpr int W = 32 / C;
  float v[C];
#pragma unroll
  for (int k = 0; k < C; k++) v[k] = s[k];
#pragma unroll
  for (int h = C / 2; h >= 1; h /= 2)
#pragma unroll
    for (int k = 0; k < h; k++) v[k] = v[k] + v[k + h];
  float r = v[0];
#pragma unroll
  for (int off = W / 2; off >= 1; off >>= 1) r += __shfl_down_sync(FULL, r, off);  // (lane W i's terms stay in its W)
  return __shfl_sync(FULL, r, threadIdx.x & (32 - W));
}
// an integer sum over aligned groups of W lanes
template <int W>
__device__ __forceinline__ int lanes_isum(int v) {
#pragma unroll
  for (int off = W / 2; off >= 1; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
  return v;
}
__device__ __forceinline__ int warp_isum(int v) { return lanes_isum<32>(v); }

// block_sum of C accumulators per thread, those of the canonical lanes L + W
// * k (W = 32 / C, L = lane % W) of virtual warp warp * C + lane / W: each
// virtual warp's canonical tree (chunks_sum), then the tree over the NW * C
// virtual warps (sh: that many floats)
template <int C>
__device__ float block_sum_chunks(const float *acc, float *sh) {
  constexpr int W = 32 / C, NV = AOQ_NW * C;
  const float v = chunks_sum<C>(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane % W == 0) sh[warp * C + lane / W] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int off = NV / 2; off >= 1; off >>= 1)
      for (int w = 0; w < off; w++) sh[w] += sh[w + off];
  }
  __syncthreads();
  return sh[0];
}
// block reductions over the NW warps (canonical order: tree over warps)
__device__ float block_sum(float v, float *sh) { return block_sum_chunks<1>(&v, sh); }
__device__ float block_max(float v, float *sh) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = sh[0];
  for (int w = 1; w < AOQ_NW; w++) r = nanmax(r, sh[w]);
  return r;
}
__device__ int block_isum(int v, int *sh) {
  v = warp_isum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  int r = 0;
  for (int w = 0; w < AOQ_NW; w++) r += sh[w];
  return r;
}

// ---- chunk loads / stores (E elements of dtype DT, vectorized if aligned) --
template <int DT>
struct Elt {
  typedef uint16_t T;
};
template <>
struct Elt<AOQ_F32> {
  typedef float T;
};

// copy E elements of type T with the widest accesses the size allows (both
// pointers 16-byte aligned when VEC), else element by element
template <typename T, int E, bool VEC>
__device__ __forceinline__ void copy_chunk(T *dst, const T *src) {
  constexpr int NB = (int)sizeof(T) * E;
  if (VEC && NB == 32) {
    reinterpret_cast<uint4 *>(dst)[0] = reinterpret_cast<const uint4 *>(src)[0];
    reinterpret_cast<uint4 *>(dst)[1] = reinterpret_cast<const uint4 *>(src)[1];
  } else if (VEC && NB == 16) {
    *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
  } else if (VEC && NB == 8) {
    *reinterpret_cast<uint2 *>(dst) = *reinterpret_cast<const uint2 *>(src);
  } else if (VEC && NB == 4) {
    *reinterpret_cast<uint32_t *>(dst) = *reinterpret_cast<const uint32_t *>(src);
  } else {
#pragma unroll
    for (int e = 0; e < E; e++) dst[e] = src[e];
  }
}

// KEEP: also copy the raw chunk to stage + sidx (the row staged in shared memory)
template <int DT, int E, bool VEC, bool KEEP = false>
__device__ __forceinline__ void load_chunk(const void *p, int64_t idx, float *v, void *stage = nullptr,
                                           int64_t sidx = 0) {
  typedef typename Elt<DT>::T T;
  alignas(16) T raw[E];  // copy_chunk may move it as 16-byte words
  copy_chunk<T, E, VEC>(raw, reinterpret_cast<const T *>(p) + idx);
  if (KEEP) copy_chunk<T, E, VEC>(reinterpret_cast<T *>(stage) + sidx, raw);
#pragma unroll
  for (int e = 0; e < E; e++) v[e] = aoq_load(raw, e, DT);
}

template <int DT, int E, bool VEC>
__device__ __forceinline__ void store_chunk(void *p, int64_t idx, const float *v) {
  typedef typename Elt<DT>::T T;
  alignas(16) T raw[E];  // copy_chunk may move it as 16-byte words
#pragma unroll
  for (int e = 0; e < E; e++) aoq_store(raw, e, v[e], DT);
  copy_chunk<T, E, VEC>(reinterpret_cast<T *>(p) + idx, raw);
}

// groups handled per warp iteration: their loads are all issued before any
// use, to keep enough bytes in flight (the order of groups, and so the
// canonical sum order, is unchanged: w, w+NW, w+2NW, ...).  Build-time knobs
// (AOQ_NVCC_FLAGS="-DAOQ_U=1 -DAOQ_UF=1 -DAOQ_UB=1 -DAOQ_UBS=1" gives one
// group or forward step per warp at a time).
#ifndef AOQ_U
#define AOQ_U 4 /* the fp8 row max's pass */
#endif
#ifndef AOQ_UF
#define AOQ_UF 2 /* forward: steps of 32 bytes per lane (see FwdLayout) */
#endif
#ifndef AOQ_UB
#define AOQ_UB 2 /* backward: two tensors per group */
#endif
#ifndef AOQ_UBS
#define AOQ_UBS 4 /* staged fp8 backward: the weight comes from shared memory, */
#endif            /* and two blocks per SM leave registers for more in flight */

// load groups j0, j0+NW, ..., j0+(U-1)*NW of a row (those below G) in the
// chunk layout: this lane's E elements of each, all loads issued first
// (KEEP: each chunk also copied to stage, at its offset in the row)
template <int DT, int E, bool VEC, int U, bool KEEP = false>
__device__ __forceinline__ void load_groups(const void *p, int64_t base, int64_t j0, int64_t G, float (*v)[E],
                                            void *stage = nullptr) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < U; u++)
    if (j0 + u * AOQ_NW < G) {
      const int64_t o = (j0 + u * AOQ_NW) * (32 * E) + lane * E;
      load_chunk<DT, E, VEC, KEEP>(p, base + o, v[u], stage, o);
    }
}

// row amax |x| (NaN-propagating) over a weight row, chunk layout, vector
// loads; STAGE: the row is also copied to stage (shared memory), complete
// when block_max's barrier returns (after which any thread may read any
// chunk: the backward's and the forward's layouts differ from this one).  Each
// thread takes fmaxf (blind to NaN) beside a fmaf(x, 0, .) sum, which an Inf
// or a NaN makes NaN; a thread whose sum is NaN reads its chunks again with
// the NaN-propagating max (rows holding Inf or NaN only).
template <int DT, int E, bool VEC, bool STAGE>
__device__ float row_amax_chunks(const void *w, int64_t base, int64_t G, float *sh, void *stage) {
  const int warp = threadIdx.x >> 5;
  float a = 0.f, chk = 0.f;
  for (int64_t j0 = warp; j0 < G; j0 += AOQ_NW * AOQ_U) {
    float v[AOQ_U][E];
    load_groups<DT, E, VEC, AOQ_U, STAGE>(w, base, j0, G, v, stage);
#pragma unroll
    for (int u = 0; u < AOQ_U; u++)
      if (j0 + u * AOQ_NW < G)
#pragma unroll
        for (int e = 0; e < E; e++) {
          a = fmaxf(a, fabsf(v[u][e]));
          chk = fmaf(v[u][e], 0.f, chk);
        }
  }
  if (chk != 0.f) {
    a = 0.f;
    for (int64_t j0 = warp; j0 < G; j0 += AOQ_NW * AOQ_U) {
      float v[AOQ_U][E];
      load_groups<DT, E, VEC, AOQ_U>(w, base, j0, G, v);
#pragma unroll
      for (int u = 0; u < AOQ_U; u++)
        if (j0 + u * AOQ_NW < G)
#pragma unroll
          for (int e = 0; e < E; e++) a = nanmax(a, v[u][e] < 0.f ? -v[u][e] : v[u][e]);
    }
  }
  return block_max(a, sh);
}

// row amax |x| over an activation row (any K, strided by thread); STAGE: the
// row is also copied to stage, each element by the thread that reads it back
template <int DT, bool STAGE>
__device__ float row_amax(const void *w, int64_t base, int64_t K, float *sh, void *stage) {
  typedef typename Elt<DT>::T T;
  float a = 0.f;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < K; k += TPB) {
    const T raw = reinterpret_cast<const T *>(w)[base + k];  // one load, kept and converted
    if (STAGE) reinterpret_cast<T *>(stage)[k] = raw;
    const float v = aoq_load(&raw, 0, DT);
    a = nanmax(a, v < 0.f ? -v : v);
  }
  return block_max(a, sh);
}

// the last step of the fp8 row backwards: the row max's gradient `each` is
// added to the row's extremes, and a signed zero (torch's each * mask * sgn(x))
// to every other element
__device__ __forceinline__ float row_fix(float ga, float xv, float each, float a0, int DT) {
  const float e = aoq_masked(each, fabsf(xv) == a0);
  return aoq_round_to(ga + aoq_round_to(e * aoq_sgn(xv), DT), DT);
}

// n + (a == b), a count: on the GPU a `set` to 0 or -1 and a subtraction
// (ptxas: a compare, a select, and two subtractions folded into one 3-input
// add, 2.5 instructions per count where a compare into a predicate takes 3)
__device__ __forceinline__ int add_eq(int n, float a, float b) {
#ifdef __CUDA_ARCH__
  int d;
  asm("set.eq.s32.f32 %0, %1, %2;" : "=r"(d) : "f"(a), "f"(b));
  return n - d;
#else
  return n + (a == b);
#endif
}

// ---------------------------------------------------------------------------
// forward: out / codes / scales / zeros for one row per block
// ---------------------------------------------------------------------------
// Fast paths.  The forward is bound by the integer/compare pipe, not by
// memory, when every element goes through the general functions' NaN, Inf and
// overflow handling.  A row (fp8: its amax) or a group (int4 asym: its max and
// min) shown finite and small enough once, a uniform branch, runs per-element
// code without that handling, with the roundings of aoq_math.h's fast section
// and plain fminf/fmaxf; everything else runs the general code.  Outputs are
// the same bits either way (the emulator tests compare both paths with the CPU
// kernels; tests/fast_paths.c checks the roundings over their whole domains).

#ifdef AOQ_EMU
// the emulator's tests count the groups each path ran (lane 0 of each group),
// and the lanes of reciprocal rows whose fp8 values had to be divided
// (fp8_group)
extern "C" {
int64_t aoq_emu_fast_groups = 0, aoq_emu_general_groups = 0, aoq_emu_divided_lanes = 0;
int64_t aoq_emu_bwd_fast_groups = 0, aoq_emu_bwd_general_groups = 0;
}
#define AOQ_COUNT_PATH(fast) (void)((fast) ? aoq_emu_fast_groups++ : aoq_emu_general_groups++)
#define AOQ_COUNT_BWD_PATH(fast) (void)((fast) ? aoq_emu_bwd_fast_groups++ : aoq_emu_bwd_general_groups++)
#define AOQ_COUNT_DIVIDED() (void)aoq_emu_divided_lanes++
#else
#define AOQ_COUNT_PATH(fast) (void)0
#define AOQ_COUNT_BWD_PATH(fast) (void)0
#define AOQ_COUNT_DIVIDED() (void)0
#endif

// the largest amax of an fp8 fast row: its fp8 values, group scales and every
// product stay finite, and the bf16 roundings inside aoq_bf16_round_fast's
// domain (nonzero magnitudes from 2^-126, past the eps-clamped scales' reach,
// to below 2^110)
template <int DT>
__device__ __forceinline__ float fast_amax() {
  return DT == AOQ_F16 ? 16384.f : 0x1p100f;
}

// bf16 by the hardware's conversion too (as aoq_math.h's fp16 functions on
// a GPU), built with -DAOQ_BF16_HW_ROUND=1 (an experiment for a
// GPU to time, tools/gpu_check.sh extra: one conversion and one shift or
// mask in place of Veltkamp's three float ops, but on the integer and
// conversion pipes, whose rates on this work no one has measured here)
#ifndef AOQ_BF16_HW_ROUND
#define AOQ_BF16_HW_ROUND 0
#endif
__device__ __forceinline__ float bf16_round_hw(float x) {
#ifdef __CUDA_ARCH__
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return aoq_u2f((uint32_t)h << 16);
#else
  return aoq_bf16_round(x);
#endif
}

// aoq_round_to for the fast paths (bf16: aoq_bf16_round_fast, within its
// domain; fp16: aoq_f16_round, the hardware's conversions; the sign of a
// zero kept either way)
template <int DT>
__device__ __forceinline__ float round_fast(float x) {
  return DT == AOQ_BF16 ? (AOQ_BF16_HW_ROUND ? bf16_round_hw(x) : aoq_bf16_round_fast(x))
                        : DT == AOQ_F16 ? aoq_f16_round(x) : x;
}

// clamp(x, lo, hi) for x that is not NaN
__device__ __forceinline__ float clamp_fast(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// clamp(t, -448, 448) before the e4m3 rounding, for t = x / s_row (or x
// times 1 / s_row) of a fast row: s_row = D(a / 448) is within 2^-8 of a /
// 448 where it is a normal of D (bf16 and fp32: always; fp16 scales may be
// subnormal, and keep the clamp), so |t| <= 449.8 and aoq_fp8_e4m3_round_fast
// rounds it to +-448 by itself (up to 464)
template <int DT>
__device__ __forceinline__ float fp8_clamp_fast(float t) {
  return DT == AOQ_F16 ? clamp_fast(t, -AOQ_FP8_MAX, AOQ_FP8_MAX) : t;
}

// clamp(q, -8, 7) of a fp8-int4 code q = rint(D(wd * rcp)) in a group whose
// rcp is finite: |wd| <= m, sg = max(D(m / 8), eps) is at least m / 8 less
// 2^-5 of it (fp16's subnormal m / 8 near eps; 2^-8 otherwise) and rcp =
// D(1 / sg) at most 2^-8 above 1 / sg, so |wd * rcp| < 8.5 and q >= -8: only
// the +max's 8 clips
__device__ __forceinline__ float fast_code_clamp(float q) { return fminf(q, 7.f); }

template <int W>
__device__ __forceinline__ float warp_max_fast(float v) {  // no NaN to propagate
  for (int off = W / 2; off >= 1; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, off));
  return v;
}
template <int W>
__device__ __forceinline__ float warp_min_fast(float v) {
  for (int off = W / 2; off >= 1; off >>= 1) v = fminf(v, __shfl_xor_sync(FULL, v, off));
  return v;
}

// store_chunk of values that are not NaN; EXACT:
// values the dtype holds (the fp8 forward's dequantized values, the fp8
// backward's rounded gradients), stored without rounding
template <int DT, int E, bool VEC, bool EXACT>
__device__ __forceinline__ void store_chunk_fast(void *p, int64_t idx, const float *v) {
  typedef typename Elt<DT>::T T;
  alignas(16) T raw[E];
#pragma unroll
  for (int e = 0; e < E; e++) {
    if (DT == AOQ_BF16) {
      const uint32_t u = aoq_f2u(v[e]);
      raw[e] = (uint16_t)((EXACT ? u : u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else if (DT == AOQ_F16) {
      raw[e] = aoq_f32_to_f16_bits(v[e]);
    } else {
      aoq_store(raw, e, v[e], DT);
    }
  }
  copy_chunk<T, E, VEC>(reinterpret_cast<T *>(p) + idx, raw);
}

// The forward's layout.  It has no sums, so unlike the backward (bound to the
// canonical order's chunks of g / 32 elements per lane) it may give each lane
// EL consecutive elements of one group, 32 bytes (two 16-byte vectors): LPG =
// g / EL lanes share a group, and a warp covers GPW = 32 / LPG consecutive
// groups per step.  Fewer lanes per group than 32 means fewer shuffles and
// each group's scale computed by fewer lanes, for more elements each.
template <int DT, int E>
struct FwdLayout {
  static constexpr int EL = 32 / (int)sizeof(typename Elt<DT>::T);  // 16 (16-bit dtypes) or 8
  static constexpr int LPG = 32 * E / EL;                            // g >= 32 >= EL
  static constexpr int GPW = 32 / LPG;
};

// A fast row's e4m3(clamp(x / s)) without the division: t' = x * r (r the
// correctly rounded 1 / s, once per row) is within 2.5 float ulps of the
// quotient x / s, and t = RN(x / s) within half an ulp of it, so t and t'
// round alike to e4m3 unless an e4m3 midpoint lies within 3 ulps (of the
// quotient's binade: up to 6 of t''s) of t'.  A lane with a value that close
// (|t' - e4m3(t')| at least (1 - 2^-16) of half the e4m3 spacing; the margin
// 2^-16 of it is 8 ulps of t''s binade) divides instead.  Values past 448
// clamp to 448 either way.  Rows use it only where no normal e4m3 midpoint m
// (5 significant bits) can be the exact quotient of a value x of the dtype
// and s: x = m * s would need s's odd significand to have at most (bits of
// the dtype) - 4 bits, so a scale with one of the 4 lowest bits of the
// dtype's significand set qualifies.  The others (1 row in
// 16) divide: with bf16 weights, such rows put about 1 value in 400 on a
// midpoint, and near-midpoint lanes are each a branch of their own.
template <int DT>
__device__ __forceinline__ bool reciprocal_row(float s_row) {
  return (aoq_f2u(s_row) & (DT == AOQ_BF16 ? 0x000f0000u : DT == AOQ_F16 ? 0x0001e000u : 0xfu)) != 0;
}

template <int DT, int N>
__device__ __forceinline__ void fp8_round_by_reciprocal(const float *v, float r_row, float *t8, bool *near) {
  // half the e4m3 spacing is c / (1.5 * 2^24): the threshold is c * K
  const float K = (float)((1.0 - 0x1p-16) * 0x1p-24 / 1.5);
#pragma unroll
  for (int e = 0; e < N; e++) {
    const float t = fp8_clamp_fast<DT>(v[e] * r_row);
    const float c = aoq_fp8_e4m3_c(t);
    t8[e] = (t + c) - c;
    *near |= fabsf(t - t8[e]) >= c * K;
  }
}

// the fp8 round trip D(e4m3(x / s_row) * s_row) of N values v of a fast row
// (fp8_group's, fp8_rows_fwd_kernel's), in place: by r_row = 1 / s_row where
// that rounds alike (fp8_round_by_reciprocal), else by division
template <int DT, int N>
__device__ __forceinline__ void fp8_rt_fast(float *v, float s_row, float r_row) {
  float t8[N];
  bool near = r_row == 0.f;
  if (!near) fp8_round_by_reciprocal<DT, N>(v, r_row, t8, &near);
  if (near) {  // rare in a reciprocal row (a lane's own branch: no shuffles)
    if (r_row != 0.f) AOQ_COUNT_DIVIDED();
#pragma unroll
    for (int e = 0; e < N; e++) t8[e] = aoq_fp8_e4m3_round_fast(fp8_clamp_fast<DT>(v[e] / s_row));
  }
#pragma unroll
  for (int e = 0; e < N; e++) v[e] = round_fast<DT>(t8[e] * s_row);
}

// one fp8-int4 group: this lane's N values v of the weight -> dequantized y,
// codes qf (as float, 8 added), the group's scale; W lanes share the group;
// fast: the row is a fast row, r_row = 1 / s_row where reciprocal_row, else
// 0 (divide).  Returns whether the group took the fast path.
template <int DT, int N, int W, int AWQ>
__device__ __forceinline__ bool fp8_group(float *v, float s_row, float r_row, bool fast, float *y, float *qf,
                                          float *sc) {
  float m = 0.f;
  if (fast) {
    fp8_rt_fast<DT, N>(v, s_row, r_row);
#pragma unroll
    for (int e = 0; e < N; e++) m = fmaxf(m, fabsf(v[e]));
    m = warp_max_fast<W>(m);
  } else {
#pragma unroll
    for (int e = 0; e < N; e++) {
      v[e] = aoq_fp8_rt(v[e], s_row, DT);
      m = nanmax(m, v[e] < 0.f ? -v[e] : v[e]);
    }
    m = warp_max<W>(m);
  }
  const aoq_sym_group p = aoq_sym_group_from_max(m, DT, AWQ);
  *sc = p.sdq;
  // fp16 scales: 1/sg or the awq scale may overflow, which the general code
  // handles (no shuffles below: the lanes of a warp may part here)
  if (fast && aoq_isfinite(p.rcp) && aoq_isfinite(p.sdq)) {
#pragma unroll
    for (int e = 0; e < N; e++) {
      const float qc = fast_code_clamp(aoq_rint(round_fast<DT>(v[e] * p.rcp)) + 0.0f);
      y[e] = round_fast<DT>(qc * p.sdq);
      qf[e] = qc + 8.f;
    }
    return true;
  }
#pragma unroll
  for (int e = 0; e < N; e++) {
    const float qc = aoq_clamp(aoq_sym_code_raw(v[e], &p, DT), -8.f, 7.f);
    y[e] = aoq_sym_deq(qc, &p, DT);
    qf[e] = qc == qc ? qc + 8.f : 0.f;
  }
  return false;
}

// An int4-asym torchao code rint((x - mn) / s) of a group whose range d is
// finite needs no clamp: 0 <= x - mn <= d, both rounded alike, and s =
// max(d, 1e-6) / 15 (or times the float 1 / 15) is at least 2^-23 less than
// d / 15, a normal, so the quotient is in [0, 15 + 2 ulps] and rounds into
// [0, 15].  (The awq codes, rint(x / s16) + zi, are clamped.)
//
// one int4-asym group, likewise.  Fast when the group's values, range, scale
// and zero point are finite: a lane holding an Inf or a NaN (its fmaf(x, 0, .)
// sum is NaN) sets its max to +Inf, which makes the range infinite.  The
// general code reduces again with shuffles, so the whole warp takes one path
// (the fast one only if every group of the warp's step is fast).
template <int DT, int N, int W, int AWQ>
__device__ __forceinline__ bool asym_group(const float *v, int cs, bool fast_ok, float *y, float *qf, float *sc,
                                           float *zr) {
  float mx = v[0], mn = v[0], chk = 0.f;
#pragma unroll
  for (int e = 0; e < N; e++) {
    mx = fmaxf(mx, v[e]);
    mn = fminf(mn, v[e]);
    chk = fmaf(v[e], 0.f, chk);
  }
  if (chk != 0.f) mx = INFINITY;
  aoq_asym_group p = aoq_asym_group_from_minmax(warp_max_fast<W>(mx), warp_min_fast<W>(mn), AWQ, cs);
  const bool fast = __all_sync(FULL, aoq_isfinite(p.d) && aoq_isfinite(AWQ ? p.s16 : p.z)) && fast_ok;
  if (fast) {
#pragma unroll
    for (int e = 0; e < N; e++) {
      const float q = aoq_asym_code_raw(v[e], &p, AWQ);
      const float qc = AWQ ? clamp_fast(q, 0.f, 15.f) : q;  // (torchao: in range, above)
      y[e] = aoq_asym_deq(qc, &p, AWQ);
      qf[e] = qc;
    }
  } else {
    mx = v[0];
    mn = v[0];
#pragma unroll
    for (int e = 0; e < N; e++) {
      mx = nanmax(mx, v[e]);
      mn = nanmin(mn, v[e]);
    }
    p = aoq_asym_group_from_minmax(warp_max<W>(mx), warp_min<W>(mn), AWQ, cs);
#pragma unroll
    for (int e = 0; e < N; e++) {
      const float qc = aoq_clamp(aoq_asym_code_raw(v[e], &p, AWQ), 0.f, 15.f);
      y[e] = aoq_asym_deq(qc, &p, AWQ);
      qf[e] = qc == qc ? qc : 0.f;
    }
  }
  *sc = AWQ ? p.s16 : p.s;
  *zr = AWQ ? p.zi : p.z;
  return fast;
}

// STAGE (fp8_int4 only): the row max's read also copies the row to dynamic
// shared memory (K elements), and the groups are read from there: one read of
// the weight instead of two (the copy is complete after block_max's barrier)
template <int DT, int E, bool VEC, bool STAGE, int SCHEME, int AWQ>
__global__ void __launch_bounds__(TPB) fq_fwd_kernel(const void *__restrict__ w, void *__restrict__ out,
                                                     uint8_t *__restrict__ codes, float *__restrict__ scales,
                                                     float *__restrict__ zeros, int64_t K, int cs, int fast_ok) {
  __shared__ float sh[AOQ_NW];
  extern __shared__ uint4 stage_mem[];
  typedef FwdLayout<DT, E> L;
  constexpr bool FP8 = SCHEME == AOQ_SCHEME_FP8_INT4;
  static_assert(FP8 || !STAGE, "only the fp8 forward stages its row");
  const int g = 32 * E;
  const int64_t n = blockIdx.x, base = n * K, G = K / g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / L::LPG, li = lane % L::LPG;  // this lane's group in a step, its place there
  // where the groups are read: the row at sbase (known at compile time, so
  // that the staged reads compile to shared-memory loads)
  const void *const src = STAGE ? (const void *)stage_mem : w;
  const int64_t sbase = STAGE ? 0 : base;
  float s_row = 0.f, r_row = 0.f;
  bool fast = false;
  if (FP8) {
    const float a0 = row_amax_chunks<DT, E, VEC, STAGE>(w, base, G, sh, stage_mem);
    s_row = aoq_fp8_scale_from_amax(a0, DT, cs);
    fast = fast_ok && a0 <= fast_amax<DT>() && s_row > 0.f;  // (false for a NaN)
    if (fast && reciprocal_row<DT>(s_row)) r_row = 1.0f / s_row;
  }
  // steps t = warp, warp + NW, ...: groups t * GPW + sub, AOQ_UF steps' loads in flight
  const int64_t steps = (G + L::GPW - 1) / L::GPW;
  for (int64_t t0 = warp; t0 < steps; t0 += AOQ_NW * AOQ_UF) {
    float vv[AOQ_UF][L::EL];
#pragma unroll
    for (int u = 0; u < AOQ_UF; u++) {
      const int64_t j = (t0 + u * AOQ_NW) * L::GPW + sub;
      if (t0 + u * AOQ_NW < steps && j < G) {
        load_chunk<DT, L::EL, VEC>(src, sbase + j * g + li * L::EL, vv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < L::EL; e++) vv[u][e] = 0.f;  // no group: zeros through the shuffles, nothing stored
      }
    }
#pragma unroll
    for (int u = 0; u < AOQ_UF; u++) {
      if (t0 + u * AOQ_NW >= steps) break;
      const int64_t j = (t0 + u * AOQ_NW) * L::GPW + sub;
      const int64_t idx = base + j * g + li * L::EL;
      float y[L::EL], qf[L::EL], sc, zr = 8.f;
      bool fast_group;
      if (FP8)
        fast_group = fp8_group<DT, L::EL, L::LPG, AWQ>(vv[u], s_row, r_row, fast, y, qf, &sc);
      else
        fast_group = asym_group<DT, L::EL, L::LPG, AWQ>(vv[u], cs, fast_ok, y, qf, &sc, &zr);
      if (j >= G) continue;
      if (out) {
        if (fast_group)
          store_chunk_fast<DT, L::EL, VEC, FP8>(out, idx, y);
        else
          store_chunk<DT, L::EL, VEC>(out, idx, y);
      }
      if (codes) {
#pragma unroll
        for (int e = 0; e < L::EL; e++) codes[idx + e] = (uint8_t)(int)qf[e];
      }
      if (li == 0) {
        AOQ_COUNT_PATH(fast_group);
        if (scales) scales[n * G + j] = sc;
        if (zeros) zeros[n * G + j] = zr;
      }
    }
  }
}

// The backward's fast groups (see each kernel for the domain and why): every
// weight of the lane 0 or at least 2^XLO in magnitude, every gradient 0 or in
// [2^GLO, 2^GHI] (no NaN or Inf).  As unsigned minima and a maximum of twice
// the bit patterns, the sign dropped: a zero maps to 0 (2b) and 0xffffffff
// (2b - 1), a NaN or Inf past any bound (so a weight's NaN or Inf passes
// here: the row's or group's own check sends it to the general code).
#define AOQ_TWICE(e) (2u * ((uint32_t)(127 + (e)) << 23))
// XHI < 128: the weights also at most 2^XHI in magnitude (no NaN or Inf).
template <int XLO, int GLO, int GHI, int XHI = 128>
struct BwdLaneCheck {
  uint32_t x_lo = 0xffffffffu, x_hi = 0u, g_lo = 0xffffffffu, g_hi = 0u;
  __device__ __forceinline__ void add(float x, float G) {
    const uint32_t x2 = 2u * aoq_f2u(x), g2 = 2u * aoq_f2u(G);
    x_lo = x2 - 1u < x_lo ? x2 - 1u : x_lo;
    if (XHI < 128) x_hi = x2 > x_hi ? x2 : x_hi;
    g_lo = g2 - 1u < g_lo ? g2 - 1u : g_lo;
    g_hi = g2 > g_hi ? g2 : g_hi;
  }
  __device__ __forceinline__ bool ok() const {
    return x_lo >= AOQ_TWICE(XLO) - 1u && (XHI >= 128 || x_hi <= AOQ_TWICE(XHI)) &&
           g_lo >= AOQ_TWICE(GLO) - 1u && g_hi <= AOQ_TWICE(GHI);
  }
};

// r with the sign bit of x: one 3-input logic op (nvcc splits the C form in two)
__device__ __forceinline__ float with_sign_of(float r, float x) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xb8;" : "=r"(d) : "r"(aoq_f2u(r)), "r"(0x80000000u), "r"(aoq_f2u(x)));
  return aoq_u2f(d);  // (b ? c : a) bitwise, b the sign mask
#else
  const uint32_t u = aoq_f2u(r);
  return aoq_u2f(u ^ ((u ^ aoq_f2u(x)) & 0x80000000u));
#endif
}

// aoq_fp8_e4m3_round(v) for a finite v: its magnitude clamped to 448 and
// rounded (the rounding is odd-symmetric: one clamp, not two), v's sign
// restored (a zero's too)
__device__ __forceinline__ float e4m3_round_finite(float v) {
  return with_sign_of(aoq_fp8_e4m3_round_fast(fminf(fabsf(v), AOQ_FP8_MAX)), v);
}

// aoq_in(x, lo, hi, st) as one compare of a magnitude, |x - c| <= h, with the
// bounds made inclusive once (st: x > lo && x < hi).  INT: x is an integer,
// +-Inf or NaN (the codes): c the bounds' midpoint, h half their distance,
// less 1 for st (x - c is exact up to 2^22, and past it stays past h; no
// bound near a subnormal, which a build with flush-to-zero would change).
// Otherwise the bounds are -hi and hi: c = 0, h = hi or, for st, the float
// below it.  A NaN is outside either way.
template <bool INT>
struct InRange {
  float c, h;
  __device__ __forceinline__ InRange(float l, float hi, int st)
      : c(INT ? 0.5f * (l + hi) : 0.f),
        h(INT ? 0.5f * (hi - l) - (st ? 1.f : 0.f) : (st ? nextafterf(hi, 0.f) : hi)) {}
  __device__ __forceinline__ bool operator()(float x) const { return fabsf(INT ? x - c : x) <= h; }
};

// aoq_round_to for the backward's fast groups (FAST: bf16 x = +-0 or 2^-126
// <= |x| < 2^110, aoq_bf16_round_fast's domain; a zero keeps its sign, as the
// gradients' zeros must)
template <int DT, bool FAST>
__device__ __forceinline__ float rnd(float x) {
  return FAST ? round_fast<DT>(x) : aoq_round_to(x, DT);
}

// fp8-int4 backward, the first step of a group: t = x / s_row, its e4m3
// value f8 = e4m3(clamp(t)) and the round trip wd = D(f8 * s_row); returns
// the lane's max |wd|.  FAST: a fast row (s_row in [2^-24, 2^24], amax at
// most fast_amax) whose lane holds weights 0 or at least 2^-40 (with the
// gradients checked for fp8_bwd_rest: BwdLaneCheck<-40, -60, 40>): t by
// aoq_div_by (x and t are 0 or in [2^-64, 2^33]), the fast roundings (f8 *
// s_row is 0 or in [2^-33, 2^33]); zeros of f8 and wd may come out +0, which
// nothing after depends on (the code of a zero is 0, sgn(+-0) = +0, and the
// sums they enter start at +0).
template <int DT, int C, int E, bool FAST>
__device__ __forceinline__ float fp8_bwd_first(const float (*x)[E], float s_row, float y_row, float (*t)[E],
                                               float (*f8)[E], float (*wd)[E]) {
  float m = 0.f;
#pragma unroll
  for (int k = 0; k < C; k++) {
#pragma unroll
    for (int e = 0; e < E; e++) {
      if (FAST) {
        t[k][e] = aoq_div_by(x[k][e], s_row, y_row);
        f8[k][e] = aoq_fp8_e4m3_round_fast(fp8_clamp_fast<DT>(t[k][e]));
        wd[k][e] = round_fast<DT>(f8[k][e] * s_row);
        m = fmaxf(m, fabsf(wd[k][e]));
      } else {
        t[k][e] = x[k][e] / s_row;
        f8[k][e] = aoq_fp8_e4m3_round(aoq_clamp(t[k][e], -AOQ_FP8_MAX, AOQ_FP8_MAX));
        wd[k][e] = aoq_round_to(f8[k][e] * s_row, DT);  // aoq_fp8_rt (s_row > 0 here)
        m = nanmax(m, wd[k][e] < 0.f ? -wd[k][e] : wd[k][e]);
      }
    }
  }
  return m;
}

// (ext ? each : each * 0) * sgn(x) for a finite x and each: the bits of the
// first with x's sign bit xor-ed in, or for x = +-0 each * 0 (sgn(+-0) = +0)
__device__ __forceinline__ float masked_times_sgn(float each, bool ext, float x) {
  const float v = ext ? each : each * 0.0f;
  return x == 0.f ? each * 0.0f : aoq_u2f(aoq_f2u(v) ^ (aoq_f2u(x) & 0x80000000u));
}

// the rest of a group's backward (its int4 stage, then the row stage's
// per-element part).  FAST: a fast lane (fp8_bwd_first) in a group whose
// 1 / sg and dequantizing scale are finite: every rounding by rnd (sg and
// the fp16 sdq in [2^-20, 2^30], rcp in [2^-30, 2^20], gradients 0 or in
// [2^-60, 2^40]: G * qc, D(G * sdq) * rcp and D(G * sdq) * wd are 0 or in
// [2^-113, 2^103]; fp16's D(G * sdq) may overflow, and a product be Inf or
// NaN, which its hardware rounding passes on), divisions by s_row by
// aoq_div_by (gt is an e4m3 value);
// FIN, where the group's `each` is 0 or in [2^-100, 2^100], the last
// roundings too (gwd + each * sgn(wd): 0 or in [2^-117, 2^101]) and, but
// for fp16 (whose gwd may overflow), the e4m3 rounding of gh * s_row
template <int DT, int E, bool FAST, bool FIN>
__device__ __forceinline__ void fp8_bwd_tail(const float *x, const float *t, const float *f8, const float *wd,
                                             const float *gwd, const aoq_sym_group &p, float each, float s_row,
                                             float y_row, float a0, const InRange<false> &in_t, float *gx,
                                             float &acc_a, float &acc_b, int &cnt_row) {
#pragma unroll
  for (int e = 0; e < E; e++) {
    const int ext = fabsf(wd[e]) == p.m;
    // (FIN: each is a value of D, so each * sgn(wd), +-each or a zero, needs no rounding)
    const float gh = FIN ? rnd<DT, true>(gwd[e] + masked_times_sgn(each, ext, wd[e]))
                         : aoq_round_to(gwd[e] + aoq_round_to(aoq_masked(each, ext) * aoq_sgn(wd[e]), DT), DT);
    // row stage
    acc_a += gh * f8[e];
    float gt;
    if (FIN && DT != AOQ_F16) {
      gt = e4m3_round_finite(gh * s_row);  // (finite here: e4m3 saturates as the clamp does)
    } else {
      gt = aoq_fp8_e4m3_round(gh * s_row);
    }
    if (!in_t(t[e])) gt = 0.f;
    gx[e] = FAST ? round_fast<DT>(aoq_div_by(gt, s_row, y_row)) : gt / s_row;
    acc_b += -gt * (FAST ? aoq_div_by(t[e], s_row, y_row) : t[e] / s_row);
    cnt_row = add_eq(cnt_row, fabsf(x[e]), a0);
  }
}

// (C chunks of E per lane, 32 / C lanes per group: see fp8_int4_bwd_kernel;
// acc_a, acc_b the canonical lanes' row sums, one per chunk; cnt_row counts
// only where live, the lane's group being one of the row)
template <int DT, int C, int E, bool FAST>
__device__ __forceinline__ void fp8_bwd_rest(const float (*x)[E], const float (*Gv)[E], const float (*t)[E],
                                             const float (*f8)[E], const float (*wd)[E], const aoq_sym_group &p,
                                             float s_row, float y_row, float a0, int awq, int st,
                                             const InRange<true> &in_q, const InRange<false> &in_t, bool live,
                                             float (*gx)[E], float *acc_a, float *acc_b, int &cnt_row) {
  constexpr int W = 32 / C;
  float gwd[C][E], q2[C][E], t1[C], t2[C];
  int cnt = 0;
#pragma unroll
  for (int k = 0; k < C; k++) {
    t1[k] = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) {
      // aoq_sym_code_raw (0 for wd = 0: FAST, a finite rcp gives it; FAST,
      // its zero may be -0, which only enters the mask and sums that start at
      // +0), clamped (FAST: at least -8 already, see fast_code_clamp)
      const float r = aoq_rint(rnd<DT, FAST>(wd[k][e] * p.rcp));
      q2[k][e] = FAST ? r : wd[k][e] != 0.f ? r + 0.0f : 0.f;
      const float qc = FAST ? fast_code_clamp(q2[k][e]) : aoq_clamp(q2[k][e], -8.f, 7.f);
      t1[k] += awq ? Gv[k][e] * qc : rnd<DT, FAST>(Gv[k][e] * qc);  // (the sums start at +0)
    }
  }
  const float g_sg_a = aoq_round_to(chunks_sum<C>(t1), DT);
#pragma unroll
  for (int k = 0; k < C; k++) {
    t2[k] = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) {
      const float gd = rnd<DT, FAST>(Gv[k][e] * (awq ? p.sdq : p.sg));
      const float gq = in_q(q2[k][e]) ? gd : 0.f;
      gwd[k][e] = FAST ? rnd<DT, true>(gq * p.rcp) : aoq_sym_gwd(gq, &p, DT);
      t2[k] += rnd<DT, FAST>(gq * wd[k][e]);
      cnt = add_eq(cnt, fabsf(wd[k][e]), p.m);
    }
  }
  const float g_r = aoq_round_to(chunks_sum<C>(t2), DT);
  float g_sg = aoq_sym_gsg(g_sg_a, g_r, &p, DT);
  if (!aoq_ge(p.m8, aoq_eps_in(1e-6f, DT), st)) g_sg = 0.f;
  const float g_m = aoq_round_to(g_sg * 0.125f, DT);
  cnt = lanes_isum<W>(cnt);
  const float each = cnt ? aoq_round_to(g_m / (float)cnt, DT) : 0.f;
  const float ae = fabsf(each);
  // (no shuffles below: the groups of a warp may part here)
  int cr = 0;
  if (FAST && (ae == 0.f || (ae >= 0x1p-100f && ae <= 0x1p100f))) {
#pragma unroll
    for (int k = 0; k < C; k++)
      fp8_bwd_tail<DT, E, FAST, FAST>(x[k], t[k], f8[k], wd[k], gwd[k], p, each, s_row, y_row, a0, in_t, gx[k],
                                      acc_a[k], acc_b[k], cr);
  } else {
#pragma unroll
    for (int k = 0; k < C; k++)
      fp8_bwd_tail<DT, E, FAST, false>(x[k], t[k], f8[k], wd[k], gwd[k], p, each, s_row, y_row, a0, in_t, gx[k],
                                       acc_a[k], acc_b[k], cr);
  }
  if (live) cnt_row += cr;
}

// row_fix in a fast row whose `each` is 0 or within [2^-100, 2^100]: ga is a
// gx of the row, an e4m3 value over s_row (bf16: 0, NaN, or within [2^-33,
// 2^33]), so both roundings stay in rnd's domain (sums 0 or within [2^-107,
// 2^101]; fp16 and fp32 round as row_fix does)
template <int DT>
__device__ __forceinline__ float row_fix_fast(float ga, float xv, float each, float a0) {
  return rnd<DT, true>(ga + masked_times_sgn(each, fabsf(xv) == a0, xv));  // (exact, as in fp8_bwd_tail)
}

// The row's last step in a fast row of a 16-bit dtype, on the raw bits, two
// elements per 32-bit word.  row_fix_fast adds a signed zero z (each * 0 *
// sgn(x): each's sign, flipped by a negative nonzero x) to every element but
// the row's extremes: for a ga of the row (0, NaN, or gt / s_row within
// 2^-33 .. 2^33, inside rnd's domain) that returns ga itself unless ga = -0
// and z = +0, which give +0.  So a word's halves keep their bits but for that sign, cleared
// with integer ops (a half's magnitude plus 0x7fff carries into its bit 15
// exactly when it is nonzero; no carry crosses into the other half).  Halves
// where |x| = a0 (the extremes, `each` added) or ga is NaN are flagged for
// row_fix_fast and the general store instead (a NaN stays a NaN there).
struct PackedFix {
  uint32_t aa, se, nanoff;  // a0's bits, z's sign from each, |h| + nanoff carries for a NaN h
  template <int DT>
  __device__ __forceinline__ static PackedFix make(float a0, float each) {
    const uint32_t a = DT == AOQ_BF16 ? aoq_f2u(a0) >> 16 : aoq_f32_to_f16_bits(a0);
    const uint32_t no = DT == AOQ_BF16 ? 0x8000u - 0x7f81u : 0x8000u - 0x7c01u;
    return PackedFix{a | a << 16, (aoq_f2u(each) >> 31) * 0x80008000u, no | no << 16};
  }
  // ga's word fixed; flag's bit 15 or 31 set where a half needs row_fix_fast
  __device__ __forceinline__ uint32_t word(uint32_t x, uint32_t ga, uint32_t &flag) const {
    const uint32_t xm = x & 0x7fff7fffu, gm = ga & 0x7fff7fffu;
    const uint32_t ext = (xm ^ aa) + 0x7fff7fffu;  // bit 15/31 clear: |x| = a0
    flag |= ~ext | (gm + nanoff);
    const uint32_t zs = (x & (xm + 0x7fff7fffu)) ^ se;  // bit 15/31: z's sign
    return ga & ~(0x80008000u & ~(gm + 0x7fff7fffu) & ~zs);
  }
  // 8 elements (x's and ga's 16-byte words): their row_fix_fast, element by
  // element where a half is flagged
  template <int DT>
  __device__ __forceinline__ uint4 fix8(uint4 xw, uint4 gv, float each, float a0) const {
    uint32_t flag = 0;
    uint4 o;
    o.x = word(xw.x, gv.x, flag);
    o.y = word(xw.y, gv.y, flag);
    o.z = word(xw.z, gv.z, flag);
    o.w = word(xw.w, gv.w, flag);
    if (flag & 0x80008000u) {  // an extreme or a NaN: element by element
      alignas(16) uint16_t xr[8], gr[8];
      *reinterpret_cast<uint4 *>(xr) = xw;
      *reinterpret_cast<uint4 *>(gr) = gv;
#pragma unroll
      for (int e = 0; e < 8; e++) aoq_store(gr, e, row_fix_fast<DT>(aoq_load(gr, e, DT), aoq_load(xr, e, DT), each, a0), DT);
      o = *reinterpret_cast<const uint4 *>(gr);
    }
    return o;
  }
};

// ---------------------------------------------------------------------------
// backward, fp8-int4 (one row per block)
// ---------------------------------------------------------------------------
// Layout: C = AOQ_FP8_BWD_C(E) chunks per lane (4; 2 for g = 256, 8 for
// g = 32: 16 elements per lane for g >= 128, 8 below), W = 32 / C lanes per
// group, C groups per warp step.  Each lane holds the chunks of the canonical lanes L, L + W,
// ... of its group, and the row sums run in the canonical order of NW * C
// virtual warps of 32 lanes (fq_cpu.c): the lanes of virtual warp warp * C +
// lane / W take its groups v, v + NW * C, ... in order, each summing its
// canonical lanes' chunks in its own accumulators.  So the group sums (chunks_sum) and the row
// sums (block_sum_chunks) are those of the canonical order, with the
// per-group work (the group's max, scales, sums and `each`) spread over C
// times as many elements per lane.
// STAGE: dynamic shared memory holds the row (K elements, copied by the row
// max's read) and its gradient before the last step (K more), so that the
// weight is read once, the upstream gradient once and gw written once
// (at most 128 registers: two blocks per SM, which the staging is sized for;
// bf16 fits, fp16 and fp32 spill a few bytes at g = 128)
template <int DT, int E, bool VEC, bool STAGE>
__global__ void __launch_bounds__(TPB, 2) fp8_int4_bwd_kernel(const void *__restrict__ grad,
                                                           const void *__restrict__ w, void *__restrict__ gw,
                                                           int64_t K, int awq, int cs, int st, int fast_ok) {
  typedef typename Elt<DT>::T T;
  constexpr int C = AOQ_FP8_BWD_C(E), W = 32 / C, NV = AOQ_NW * C;
  __shared__ float sh[NV];
  __shared__ int shi[AOQ_NW];
  extern __shared__ uint4 stage_mem[];
  T *const xs = reinterpret_cast<T *>(stage_mem), *const gs = xs + K;
  const int g = 32 * E;
  const int64_t n = blockIdx.x, base = n * K, G = K / g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int L = lane % W, v = warp * C + lane / W;  // this lane's place in its group, its virtual warp
  const float a0 = row_amax_chunks<DT, E, VEC, STAGE>(w, base, G, sh, xs);
  const float s_row = aoq_fp8_scale_from_amax(a0, DT, cs);
  if (s_row == 0.f) {  // forward gave 0 (torchao: NaN)
    for (int64_t k = threadIdx.x; k < K; k += TPB) aoq_store(gw, base + k, 0.f, DT);
    return;
  }
  // a fast row (see fp8_bwd_first): s_row in aoq_div_by's divisor range (the
  // kernels for unaligned tensors, rare, keep to the general code: half the
  // code to compile)
  const bool fast_row = VEC && fast_ok && a0 <= fast_amax<DT>() && s_row >= 0x1p-24f && s_row <= 0x1p24f;
  const float y_row = fast_row ? 1.0f / s_row : 0.f;
  const InRange<true> in_q(-8.f, 7.f, st);  // torch's clamp masks
  const InRange<false> in_t(-AOQ_FP8_MAX, AOQ_FP8_MAX, st);
  float acc_a[C], acc_b[C];
#pragma unroll
  for (int k = 0; k < C; k++) acc_a[k] = acc_b[k] = 0.f;
  int cnt_row = 0;
  // steps of C groups per warp (one per virtual warp: v, v + NV, ...), UB
  // steps' loads in flight (the knob, up to the 16 elements of each tensor
  // that 128 registers hold)
  constexpr int UBK = STAGE ? AOQ_UBS : AOQ_UB, UB = C * E * UBK > 16 ? 16 / (C * E) : UBK;
  for (int64_t i0 = 0; warp * C + NV * i0 < G; i0 += UB) {
    float xx[UB][C][E], gg[UB][C][E];
#pragma unroll
    for (int u = 0; u < UB; u++) {
      const int64_t j = v + NV * (i0 + u);
#pragma unroll
      for (int k = 0; k < C; k++) {
        const int64_t o = j * g + (L + W * k) * E;
        if (j < G) {
          load_chunk<DT, E, VEC>(STAGE ? (const void *)xs : w, (STAGE ? 0 : base) + o, xx[u][k]);
          load_chunk<DT, E, VEC>(grad, base + o, gg[u][k]);
        } else {
#pragma unroll
          for (int e = 0; e < E; e++) xx[u][k][e] = gg[u][k][e] = 0.f;  // no group: zeros (sums unchanged)
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UB; u++) {
      if (warp * C + NV * (i0 + u) >= G) break;
      const int64_t j = v + NV * (i0 + u);
      const bool live = j < G;
      const float(*x)[E] = xx[u];
      const float(*Gv)[E] = gg[u];
      float t[C][E], f8[C][E], wd[C][E], gx[C][E];
      BwdLaneCheck<-40, -60, 40> chk;
#pragma unroll
      for (int k = 0; k < C; k++)
#pragma unroll
        for (int e = 0; e < E; e++) chk.add(x[k][e], Gv[k][e]);
      // (the warp's C groups take one path: the shuffles need the whole warp)
      const bool fast = fast_row && __all_sync(FULL, chk.ok());
      const float m = fast ? warp_max_fast<W>(fp8_bwd_first<DT, C, E, true>(x, s_row, y_row, t, f8, wd))
                           : warp_max<W>(fp8_bwd_first<DT, C, E, false>(x, s_row, y_row, t, f8, wd));
      const aoq_sym_group p = aoq_sym_group_from_max(m, DT, awq);
      const bool fast_group = fast && __all_sync(FULL, aoq_isfinite(p.rcp) && aoq_isfinite(p.sdq));
      if (fast_group)
        fp8_bwd_rest<DT, C, E, true>(x, Gv, t, f8, wd, p, s_row, y_row, a0, awq, st, in_q, in_t, live, gx, acc_a,
                                     acc_b, cnt_row);
      else
        fp8_bwd_rest<DT, C, E, false>(x, Gv, t, f8, wd, p, s_row, y_row, a0, awq, st, in_q, in_t, live, gx, acc_a,
                                      acc_b, cnt_row);
      if (!live) continue;
      if (L == 0) AOQ_COUNT_BWD_PATH(fast_group);
      // D(gx) (a fast group's gx is rounded already), row extremes fixed below
#pragma unroll
      for (int k = 0; k < C; k++) {
        const int64_t o = j * g + (L + W * k) * E;
        void *const dst = STAGE ? (void *)gs : gw;
        const int64_t at = (STAGE ? 0 : base) + o;
        if (fast_group)
          store_chunk_fast<DT, E, VEC, true>(dst, at, gx[k]);
        else
          store_chunk<DT, E, VEC>(dst, at, gx[k]);
      }
    }
  }
  const float sum_a = block_sum_chunks<C>(acc_a, sh);
  const float sum_b = block_sum_chunks<C>(acc_b, sh);
  cnt_row = block_isum(cnt_row, shi);
  float g_a = aoq_round_to(aoq_div_scalar(aoq_round_to(sum_a + sum_b, DT), AOQ_FP8_MAX, cs), DT);
  if (!aoq_ge(a0, aoq_eps_in(1e-12f, DT), st)) g_a = 0.f;
  const float each = cnt_row ? aoq_round_to(g_a / (float)cnt_row, DT) : 0.f;
  const float ae = fabsf(each);
  const bool fix_fast = fast_row && (ae == 0.f || (ae >= 0x1p-100f && ae <= 0x1p100f));
  if (DT != AOQ_F32 && fix_fast) {  // (VEC: fast_row) 8 elements per thread and step, as words
    const PackedFix pf = PackedFix::make<DT>(a0, each);
    if (!STAGE) __syncthreads();  // gw of this row, written above by other threads, is visible
    const uint4 *const xsrc = reinterpret_cast<const uint4 *>(STAGE ? (const void *)xs : w) + (STAGE ? 0 : base / 8);
    const uint4 *const gsrc = reinterpret_cast<const uint4 *>(STAGE ? (const void *)gs : gw) + (STAGE ? 0 : base / 8);
    uint4 *const dst = reinterpret_cast<uint4 *>(gw) + base / 8;
    for (int64_t i = threadIdx.x; i < K / 8; i += TPB) dst[i] = pf.fix8<DT>(xsrc[i], gsrc[i], each, a0);
    return;
  }
  if (STAGE) {
    // chunks of xs and gs (complete: block_sum_chunks's barriers): one write of gw
    for (int64_t j = warp; j < G; j += AOQ_NW) {
      const int64_t o = j * g + lane * E;
      float xv[E], ga[E];
      load_chunk<DT, E, VEC>(xs, o, xv);
      load_chunk<DT, E, VEC>(gs, o, ga);
      if (fix_fast) {
#pragma unroll
        for (int e = 0; e < E; e++) ga[e] = row_fix_fast<DT>(ga[e], xv[e], each, a0);
      } else {
#pragma unroll
        for (int e = 0; e < E; e++) ga[e] = row_fix(ga[e], xv[e], each, a0, DT);
      }
      store_chunk<DT, E, VEC>(gw, base + o, ga);
    }
    return;
  }
  __syncthreads();  // gw of this row, written above by other threads, is visible
  for (int64_t k = threadIdx.x; k < K; k += TPB) {
    const float ga = aoq_load(gw, base + k, DT), xv = aoq_load(w, base + k, DT);
    aoq_store(gw, base + k, fix_fast ? row_fix_fast<DT>(ga, xv, each, a0) : row_fix(ga, xv, each, a0, DT), DT);
  }
}

// ---------------------------------------------------------------------------
// backward, int4-asym (one row per block, everything per group)
// ---------------------------------------------------------------------------
// a / b for the group's scale b: IEEE division, or (FAST) aoq_div_by with y = 1 / b
template <bool FAST>
__device__ __forceinline__ float div_g(float a, float b, float y) {
  return FAST ? aoq_div_by(a, b, y) : a / b;
}

// The fast groups' domain, where every quotient of the group's body is one of
// aoq_div_by (b = s or s16 in [2^-24, 2^24]; numerators 0 or in [2^-96,
// 2^96]): scale at most 2^24 (at least 2^-24 by construction: s >= 1e-6 / 15,
// s16 its fp16 rounding), and per lane (BwdLaneCheck<-40, -70, 70, 60>) every
// weight 0 or within [2^-40, 2^60] in magnitude (so x - mn is 0 or at least
// 2^-63, an ulp of 2^-40, and (x - mn) / s at least 2^-87; x / s16 is in
// [2^-64, 2^84]), every gradient 0 or in [2^-70, 2^70] (G * s in [2^-94,
// 2^94]).
//
// The int4-asym backward's layout: 8 lanes per group (4 groups per warp
// step), each lane holding the chunks (E = g / 32 elements) of the canonical
// lanes L, L + 8, L + 16 and L + 24 of its group (L = lane % 8).  Its sums are
// those of the canonical order: each chunk summed in order, the halving
// tree's first two levels (lanes l + 16, then l + 8) inside the lane, the last
// three across its 8 lanes.  A quarter of the shuffles, and of the per-group
// scalar work per element, of one canonical lane per thread.
constexpr int AB_C = 4;  // chunks per lane

// the canonical warp sum of a group from this lane's chunk sums s[c] (result
// in all 8 lanes of the group)
__device__ __forceinline__ float group_sum(const float *s) { return chunks_sum<AB_C>(s); }
__device__ __forceinline__ int group_isum(int v) { return lanes_isum<32 / AB_C>(v); }

// one group's gradient (this lane's AB_C chunks of E elements) once p is
// known; FAST: its divisions by the scale as aoq_div_by (the same bits in the
// domain above)
template <int E, bool FAST>
__device__ __forceinline__ void asym_bwd_group(const float (*x)[E], const float (*Gv)[E], const aoq_asym_group &p,
                                               int awq, int cs, int st, const InRange<true> &in_q, float (*gx)[E]) {
  float g_s, g_mn; /* g_s ends as the gradient of the group max */
  float a[AB_C], b[AB_C], c[AB_C], d[AB_C];
  if (!awq) {
    const float y = FAST ? 1.0f / p.s : 0.f;
    float u[AB_C][E];
#pragma unroll
    for (int k = 0; k < AB_C; k++) {
      a[k] = b[k] = 0.f;
#pragma unroll
      for (int e = 0; e < E; e++) {
        u[k][e] = div_g<FAST>(x[k][e] - p.mn, p.s, y);  // aoq_asym_code_raw's quotient
        a[k] += Gv[k][e];
        const float q = aoq_rint(u[k][e]);
        b[k] += Gv[k][e] * ((FAST ? q : aoq_clamp(q, 0.f, 15.f)) - 8.f);  // (FAST: in range, see asym_group)
      }
    }
    const float g_z = group_sum(a), g_s_a = group_sum(b);
#pragma unroll
    for (int k = 0; k < AB_C; k++) {
      c[k] = d[k] = 0.f;
#pragma unroll
      for (int e = 0; e < E; e++) {
        float q = aoq_rint(u[k][e]);
        float gq = in_q(q) ? Gv[k][e] * p.s : 0.f;
        gx[k][e] = div_g<FAST>(gq, p.s, y);
        c[k] += -gq * div_g<FAST>(u[k][e], p.s, y);
        d[k] += gx[k][e];
      }
    }
    const float g_s_b = group_sum(c), g_mn_a = -group_sum(d);
    aoq_asym_gminmax_torchao(g_s_a, g_s_b, g_z, g_mn_a, &p, cs, st, &g_s, &g_mn);
  } else {
    const float y = FAST ? 1.0f / p.s16 : 0.f;
    float xs[AB_C][E];
#pragma unroll
    for (int k = 0; k < AB_C; k++) {
      a[k] = b[k] = 0.f;
#pragma unroll
      for (int e = 0; e < E; e++) {
        xs[k][e] = div_g<FAST>(x[k][e], p.s16, y);  // aoq_asym_code_raw's quotient
        a[k] += Gv[k][e] * p.s16;
        b[k] += Gv[k][e] * (aoq_clamp(aoq_rint(xs[k][e]) + p.zi, 0.f, 15.f) - p.zi);
      }
    }
    const float g_z_a = -group_sum(a), g_s_a = group_sum(b);
#pragma unroll
    for (int k = 0; k < AB_C; k++) {
      c[k] = d[k] = 0.f;
#pragma unroll
      for (int e = 0; e < E; e++) {
        float v = aoq_rint(xs[k][e]) + p.zi;
        float gv = in_q(v) ? Gv[k][e] * p.s16 : 0.f;
        gx[k][e] = div_g<FAST>(gv, p.s16, y);
        c[k] += -gv * div_g<FAST>(xs[k][e], p.s16, y);
        d[k] += gv;
      }
    }
    const float g_s_b = group_sum(c), g_z_b = group_sum(d);
    aoq_asym_gminmax_awq(g_s_a, g_s_b, g_z_a, g_z_b, &p, st, &g_s, &g_mn);
  }
  int cx = 0, cn = 0;
#pragma unroll
  for (int k = 0; k < AB_C; k++) {
#pragma unroll
    for (int e = 0; e < E; e++) {
      cx = add_eq(cx, x[k][e], p.mx);
      cn = add_eq(cn, x[k][e], p.mn);
    }
  }
  cx = group_isum(cx);
  cn = group_isum(cn);
  const float ex = cx ? g_s / (float)cx : 0.f, en = cn ? g_mn / (float)cn : 0.f;
#pragma unroll
  for (int k = 0; k < AB_C; k++) {
#pragma unroll
    for (int e = 0; e < E; e++)
      gx[k][e] = (gx[k][e] + aoq_masked(ex, x[k][e] == p.mx)) + aoq_masked(en, x[k][e] == p.mn);
  }
}

template <int DT, int E, bool VEC>
__global__ void __launch_bounds__(TPB) asym_bwd_kernel(const void *__restrict__ grad, const void *__restrict__ w,
                                                       void *__restrict__ gw, int64_t K, int awq, int cs, int st,
                                                       int fast_ok) {
  const int g = 32 * E;
  constexpr int GPW = 32 / 8;                // groups per warp step
  constexpr int UB = E >= 8 ? 1 : AOQ_UB;  // steps' loads in flight
  const int64_t n = blockIdx.x, base = n * K, G = K / g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane >> 3, L = lane & 7;  // this lane's group in a step, its place there
  const int64_t steps = (G + GPW - 1) / GPW;
  const InRange<true> in_q(0.f, 15.f, st);  // torch's clamp mask of the codes
  for (int64_t t0 = warp; t0 < steps; t0 += AOQ_NW * UB) {
    float xx[UB][AB_C][E], gg[UB][AB_C][E];
#pragma unroll
    for (int u = 0; u < UB; u++) {
      const int64_t j = (t0 + u * AOQ_NW) * GPW + sub;
#pragma unroll
      for (int k = 0; k < AB_C; k++) {
        if (t0 + u * AOQ_NW < steps && j < G) {
          load_chunk<DT, E, VEC>(w, base + j * g + (L + 8 * k) * E, xx[u][k]);
          load_chunk<DT, E, VEC>(grad, base + j * g + (L + 8 * k) * E, gg[u][k]);
        } else {
#pragma unroll
          for (int e = 0; e < E; e++) xx[u][k][e] = gg[u][k][e] = 0.f;  // no group: zeros through the shuffles
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UB; u++) {
      if (t0 + u * AOQ_NW >= steps) break;
      const int64_t j = (t0 + u * AOQ_NW) * GPW + sub;
      const float(*x)[E] = xx[u];
      const float(*Gv)[E] = gg[u];
      float gx[AB_C][E];
      aoq_asym_group p;
      bool fast = false;
      // (as in the fp8 backward, the kernels for unaligned tensors keep to the general code)
      if (VEC && fast_ok) {
        // weights in [-2^60, 2^60] (no NaN, so fminf / fmaxf give the group's
        // min and max; their zeros' signs matter nowhere), checked per lane
        float mx = x[0][0], mn = x[0][0];
        BwdLaneCheck<-40, -70, 70, 60> chk;
#pragma unroll
        for (int k = 0; k < AB_C; k++) {
#pragma unroll
          for (int e = 0; e < E; e++) {
            mx = fmaxf(mx, x[k][e]);
            mn = fminf(mn, x[k][e]);
            chk.add(x[k][e], Gv[k][e]);
          }
        }
        p = aoq_asym_group_from_minmax(warp_max_fast<8>(mx), warp_min_fast<8>(mn), awq, cs);
        fast = __all_sync(FULL, chk.ok() && (awq ? p.s16 : p.s) <= 0x1p24f);
      }
      if (!fast) {  // the NaN-propagating max and min
        float mx = x[0][0], mn = x[0][0];
#pragma unroll
        for (int k = 0; k < AB_C; k++) {
#pragma unroll
          for (int e = 0; e < E; e++) {
            mx = nanmax(mx, x[k][e]);
            mn = nanmin(mn, x[k][e]);
          }
        }
        p = aoq_asym_group_from_minmax(warp_max<8>(mx), warp_min<8>(mn), awq, cs);
      }
      if (fast)
        asym_bwd_group<E, true>(x, Gv, p, awq, cs, st, in_q, gx);
      else
        asym_bwd_group<E, false>(x, Gv, p, awq, cs, st, in_q, gx);
      if (j >= G) continue;
      if (L == 0) AOQ_COUNT_BWD_PATH(fast);
#pragma unroll
      for (int k = 0; k < AB_C; k++) store_chunk<DT, E, VEC>(gw, base + j * g + (L + 8 * k) * E, gx[k]);
    }
  }
}

// ---------------------------------------------------------------------------
// fp8 activation rows
// ---------------------------------------------------------------------------
// STAGE: the row, copied to dynamic shared memory by the row max's read, is
// read from there (each element or chunk by the thread that copied it).
// VEC: x and out 16-byte aligned and K a multiple of V = 16 bytes of
// elements: the row in chunks of V (chunk c by thread c mod TPB, one 16-byte
// load each), its max as row_amax_chunks takes it (fmaxf beside a fmaf(x, 0)
// sum, the NaN-propagating max again for a thread that saw an Inf or NaN),
// and a fast row (as the fp8-int4 forward's: amax at most fast_amax, a
// positive scale) through fp8_rt_fast.  Otherwise element by element, the
// general code.
template <int DT>
struct RowsV {  // the elements of a 16-byte chunk of an activation row
  static constexpr int V = 16 / (int)sizeof(typename Elt<DT>::T);
};

// row amax |x| (NaN-propagating) of an activation row of C chunks of V, each
// thread taking chunks t, t + TPB, ... with vector loads (16-byte aligned, K
// a multiple of V); fmaxf beside a fmaf(x, 0, .) check as row_amax_chunks;
// STAGE: the row also copied to stage, complete when block_max returns
template <int DT, bool STAGE>
__device__ float rows_amax_vec(const void *x, int64_t base, int64_t C, float *sh, void *stage) {
  constexpr int V = RowsV<DT>::V;
  float a = 0.f, chk = 0.f;
#pragma unroll 2
  for (int64_t c = threadIdx.x; c < C; c += TPB) {
    float v[V];
    load_chunk<DT, V, true, STAGE>(x, base + c * V, v, stage, c * V);
#pragma unroll
    for (int e = 0; e < V; e++) {
      a = fmaxf(a, fabsf(v[e]));
      chk = fmaf(v[e], 0.f, chk);
    }
  }
  if (chk != 0.f) {
    a = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += TPB) {
      float v[V];
      load_chunk<DT, V, true>(x, base + c * V, v);
#pragma unroll
      for (int e = 0; e < V; e++) a = nanmax(a, v[e] < 0.f ? -v[e] : v[e]);
    }
  }
  return block_max(a, sh);
}

template <int DT, bool VEC, bool STAGE>
__global__ void __launch_bounds__(TPB) fp8_rows_fwd_kernel(const void *__restrict__ x, void *__restrict__ out,
                                                           int64_t K, int cs, int fast_ok) {
  __shared__ float sh[AOQ_NW];
  extern __shared__ uint4 stage_mem[];
  const int64_t base = (int64_t)blockIdx.x * K;
  if (!VEC) {
    const float s = aoq_fp8_scale_from_amax(row_amax<DT, STAGE>(x, base, K, sh, stage_mem), DT, cs);
    for (int64_t k = threadIdx.x; k < K; k += TPB)
      aoq_store(out, base + k, aoq_fp8_rt_act(STAGE ? aoq_load(stage_mem, k, DT) : aoq_load(x, base + k, DT), s, DT),
                DT);
    return;
  }
  constexpr int V = RowsV<DT>::V;
  const int64_t C = K / V;
  const float a0 = rows_amax_vec<DT, STAGE>(x, base, C, sh, stage_mem);
  const float s_row = aoq_fp8_scale_from_amax(a0, DT, cs);
  const bool fast = fast_ok && a0 <= fast_amax<DT>() && s_row > 0.f;  // (false for a NaN)
  const float r_row = fast && reciprocal_row<DT>(s_row) ? 1.0f / s_row : 0.f;
#pragma unroll 2
  for (int64_t c = threadIdx.x; c < C; c += TPB) {
    float v[V];
    load_chunk<DT, V, true>(STAGE ? (const void *)stage_mem : x, (STAGE ? 0 : base) + c * V, v);
    if (fast) {
      float x0[V];
#pragma unroll
      for (int e = 0; e < V; e++) x0[e] = v[e];
      fp8_rt_fast<DT, V>(v, s_row, r_row);
      // (its zeros come out +0; torch's have the sign of x, as s_row > 0)
#pragma unroll
      for (int e = 0; e < V; e++) v[e] = with_sign_of(v[e], x0[e]);
      store_chunk_fast<DT, V, true, true>(out, base + c * V, v);
    } else {
#pragma unroll
      for (int e = 0; e < V; e++) v[e] = aoq_fp8_rt_act(v[e], s_row, DT);
      store_chunk<DT, V, true>(out, base + c * V, v);
    }
  }
}

// one element of an activation row's backward (torchao's autograd through
// fp8_rows): t = x / s_row; acc_a += gh * e4m3(clamp(t)); gt = e4m3(gh *
// s_row), 0 outside t's clamp; acc_b += -gt * (t / s_row); returns gt / s_row
// (to be rounded to D).  FAST: a fast row (s_row in [2^-24, 2^24], amax at most
// fast_amax) and an element whose x is 0 or at least 2^-40 and whose gh is 0
// or within [2^-60, 2^40] in magnitude (BwdLaneCheck<-40, -60, 40>, as the
// fp8-int4 backward's lanes): every quotient by aoq_div_by (x, t and gt / e4m3
// values 0 or within [2^-64, 2^33]), the e4m3 roundings the fast ones (t
// saturates by itself, as in the forward; gh * s_row finite, its magnitude
// clamped and rounded, its sign restored); zeros of e4m3(clamp(t)) may come
// out +0, which only enters a sum that starts at +0
template <int DT, bool FAST>
__device__ __forceinline__ float rows_bwd_elem(float xv, float gh, float s_row, float y_row,
                                               const InRange<false> &in_t, float &acc_a, float &acc_b) {
  const float t = FAST ? aoq_div_by(xv, s_row, y_row) : xv / s_row;
  acc_a += gh * (FAST ? aoq_fp8_e4m3_round_fast(fp8_clamp_fast<DT>(t))
                      : aoq_fp8_e4m3_round(aoq_clamp(t, -AOQ_FP8_MAX, AOQ_FP8_MAX)));
  const float v = gh * s_row;
  float gt = FAST ? e4m3_round_finite(v) : aoq_fp8_e4m3_round(v);
  if (!in_t(t)) gt = 0.f;
  acc_b += -gt * (FAST ? aoq_div_by(t, s_row, y_row) : t / s_row);
  return FAST ? aoq_div_by(gt, s_row, y_row) : gt / s_row;
}

// The row is cut into chunks of V elements (16 bytes, RowsV), thread t taking
// chunks t, t + TPB, ... (the last one short where V does not divide K); the
// sums (acc_a, acc_b) run in that order, element by element within a chunk
// (the canonical order: fq_cpu.c's row_sum_chunked), whichever path each
// element takes.  VEC (buffers 16-byte aligned, K a multiple of V): the
// chunks move as 16-byte vectors, two per thread in flight; else element by
// element, in the same order.  Fast rows (rows_bwd_elem) take the
// fast path element by element, and their last step row_fix_fast where `each`
// is in its range.  STAGE: shared memory holds the row (K elements) and its
// gradient before the last step (K more).
template <int DT, bool VEC, bool STAGE>
__global__ void __launch_bounds__(TPB) fp8_rows_bwd_kernel(const void *__restrict__ grad,
                                                           const void *__restrict__ x, void *__restrict__ gx,
                                                           int64_t K, int cs, int st, int fast_ok) {
  typedef typename Elt<DT>::T T;
  constexpr int V = RowsV<DT>::V;
  // chunks per thread whose loads are in flight together (in the sums' order;
  // one in the rare kernels that load element by element: with two they
  // spill 28 bytes for bf16 on sm_90, with one still 4 unstaged)
  constexpr int UR = VEC ? 2 : 1;
  __shared__ float sh[AOQ_NW];
  __shared__ int shi[AOQ_NW];
  extern __shared__ uint4 stage_mem[];
  T *const xs = reinterpret_cast<T *>(stage_mem), *const gs = xs + K;
  void *const dst = STAGE ? (void *)gs : gx;  // where the first pass writes gt / s_row, rounded
  const int64_t base = (int64_t)blockIdx.x * K, dbase = STAGE ? 0 : base;
  const int64_t C = (K + V - 1) / V;
  const float a0 = VEC ? rows_amax_vec<DT, STAGE>(x, base, C, sh, xs) : row_amax<DT, STAGE>(x, base, K, sh, xs);
  const float s_row = aoq_fp8_scale_from_amax(a0, DT, cs);
  if (s_row == 0.f) {
    for (int64_t k = threadIdx.x; k < K; k += TPB) aoq_store(gx, base + k, 0.f, DT);
    return;
  }
  const bool fast_row = fast_ok && a0 <= fast_amax<DT>() && s_row >= 0x1p-24f && s_row <= 0x1p24f;
  const float y_row = fast_row ? 1.0f / s_row : 0.f;
  const InRange<false> in_t(-AOQ_FP8_MAX, AOQ_FP8_MAX, st);  // torch's clamp mask of t
  const void *const xsrc = STAGE ? (const void *)xs : x;
  const int64_t xbase = STAGE ? 0 : base;
  float acc_a = 0.f, acc_b = 0.f;
  int cnt_row = 0;
  for (int64_t c0 = threadIdx.x; c0 < C; c0 += UR * TPB) {
    float xv[UR][V], gh[UR][V];
#pragma unroll
    for (int u = 0; u < UR; u++) {
      const int64_t k0 = (c0 + u * TPB) * V;
      if (VEC) {
        if (k0 < K) {
          load_chunk<DT, V, true>(xsrc, xbase + k0, xv[u]);
          load_chunk<DT, V, true>(grad, base + k0, gh[u]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; e++) {
          xv[u][e] = gh[u][e] = 0.f;
          if (k0 + e < K) {
            xv[u][e] = aoq_load(xsrc, xbase + k0 + e, DT);
            gh[u][e] = aoq_load(grad, base + k0 + e, DT);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UR; u++) {
      const int64_t k0 = (c0 + u * TPB) * V;
      if (k0 >= K) break;
      float q[V];
      bool all_fast = true;
#pragma unroll
      for (int e = 0; e < V; e++) {
        if (!VEC && k0 + e >= K) break;
        BwdLaneCheck<-40, -60, 40> chk;
        chk.add(xv[u][e], gh[u][e]);
        const bool fast = fast_row && chk.ok();
        AOQ_COUNT_BWD_PATH(fast);
        q[e] = fast ? round_fast<DT>(rows_bwd_elem<DT, true>(xv[u][e], gh[u][e], s_row, y_row, in_t, acc_a, acc_b))
                    : rows_bwd_elem<DT, false>(xv[u][e], gh[u][e], s_row, y_row, in_t, acc_a, acc_b);
        all_fast = all_fast && fast;
        cnt_row = add_eq(cnt_row, fabsf(xv[u][e]), a0);
      }
      if (VEC) {
        if (all_fast)  // (values of D, no NaN: stored as they are)
          store_chunk_fast<DT, V, true, true>(dst, dbase + k0, q);
        else
          store_chunk<DT, V, true>(dst, dbase + k0, q);
      } else {
#pragma unroll
        for (int e = 0; e < V; e++)
          if (k0 + e < K) aoq_store(dst, dbase + k0 + e, q[e], DT);
      }
    }
  }
  const float sum_a = block_sum(acc_a, sh);
  const float sum_b = block_sum(acc_b, sh);
  cnt_row = block_isum(cnt_row, shi);
  float g_a = aoq_round_to(aoq_div_scalar(aoq_round_to(sum_a + sum_b, DT), AOQ_FP8_MAX, cs), DT);
  if (!aoq_ge(a0, aoq_eps_in(1e-12f, DT), st)) g_a = 0.f;
  const float each = cnt_row ? aoq_round_to(g_a / (float)cnt_row, DT) : 0.f;
  const float ae = fabsf(each);
  const bool fix_fast = fast_row && (ae == 0.f || (ae >= 0x1p-100f && ae <= 0x1p100f));
  if (VEC && DT != AOQ_F32 && fix_fast) {  // each thread its own chunks again, as words (PackedFix)
    const PackedFix pf = PackedFix::make<DT>(a0, each);
    const uint4 *const xw = reinterpret_cast<const uint4 *>(xsrc) + xbase / 8;
    const uint4 *const gw = reinterpret_cast<const uint4 *>(dst) + dbase / 8;
    uint4 *const out = reinterpret_cast<uint4 *>(gx) + base / 8;
    for (int64_t c = threadIdx.x; c < C; c += TPB) out[c] = pf.fix8<DT>(xw[c], gw[c], each, a0);
  } else if (VEC) {  // each thread its own chunks again (written above by itself)
    for (int64_t c = threadIdx.x; c < C; c += TPB) {
      float ga[V], xv[V];
      load_chunk<DT, V, true>(dst, dbase + c * V, ga);
      load_chunk<DT, V, true>(xsrc, xbase + c * V, xv);
#pragma unroll
      for (int e = 0; e < V; e++)
        ga[e] = fix_fast ? row_fix_fast<DT>(ga[e], xv[e], each, a0) : row_fix(ga[e], xv[e], each, a0, DT);
      store_chunk<DT, V, true>(gx, base + c * V, ga);
    }
  } else {
    if (!STAGE) __syncthreads();  // gx of this row, written above by other threads, is visible
    for (int64_t k = threadIdx.x; k < K; k += TPB) {
      const float ga = aoq_load(dst, dbase + k, DT), xv = aoq_load(xsrc, xbase + k, DT);
      aoq_store(gx, base + k, fix_fast ? row_fix_fast<DT>(ga, xv, each, a0) : row_fix(ga, xv, each, a0, DT), DT);
    }
  }
}

// ---------------------------------------------------------------------------
// AWQ pack: codes [R, C] -> int32 [C, R/8]
// ---------------------------------------------------------------------------
__global__ void pack_awq_kernel(const uint8_t *__restrict__ codes, int32_t *__restrict__ packed, int64_t R,
                                int64_t C) {
  const int64_t W = R / 8;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // over C * W, c fastest
  if (i >= C * W) return;
  const int64_t c = i % C, wi = i / C;
  const int order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 8; j++) word |= ((uint32_t)(codes[(wi * 8 + j) * C + c] & 0xF)) << (4 * order[j]);
  packed[c * W + wi] = (int32_t)word;
}

// ---------------------------------------------------------------------------
// launch helpers
// ---------------------------------------------------------------------------
// The last CUDA error seen by a launcher on this thread, for the message the
// op layer raises (aoq_cuda_last_error).
thread_local cudaError_t last_error = cudaSuccess;

struct DeviceGuard {
  int prev;
  bool ok;
  explicit DeviceGuard(int dev) : prev(-1), ok(true) {
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    if (prev != dev) {
      cudaError_t e = cudaSetDevice(dev);
      ok = e == cudaSuccess;
      if (!ok) last_error = e;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Staging: the fp8 kernels copy their row to shared memory in the row max's
// read (and keep the row's gradient there in the backward), which saves a
// read of the weight in the forward and three passes over global memory in
// the backward.  Used when `bytes` of dynamic shared memory per block fit on
// the device with two blocks per SM; AOQ_CUDA_STAGE=0 in the environment turns
// it off (the streaming kernels, for comparison; read at each launch, so a
// CUDA graph keeps the kernels chosen when it was captured).  Any failure
// here just means no staging.
const size_t stage_slack = 2048;  // per block: the static shared arrays and the runtime's reserve

// Kernel K may use all the dynamic shared memory the device allows (the 48 KiB
// default counts static and dynamic together): set once per device (the
// attribute belongs to the current device's context), always to the same
// value, so that concurrent launchers cannot lower each other's limit.
template <auto K>
bool allow_smem(int device, int optin) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device >= 0 && device < 64 ? 1ull << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return true;
  if (cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - (int)stage_slack) !=
      cudaSuccess)
    return false;
  done.fetch_or(bit, std::memory_order_release);
  return true;
}

// PLAIN, or STAGED with *smem = bytes of dynamic shared memory
template <auto PLAIN, auto STAGED>
decltype(PLAIN) choose(bool want_stage, int device, size_t bytes, size_t *smem) {
  *smem = 0;
  const char *env = getenv("AOQ_CUDA_STAGE");
  if (!want_stage || (env && env[0] == '0')) return PLAIN;
  int optin = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess) {
    cudaGetLastError();
    return PLAIN;
  }
  if (bytes + stage_slack > (size_t)optin || 2 * (bytes + stage_slack) > (size_t)per_sm) return PLAIN;
  if (!allow_smem<STAGED>(device, optin)) {
    cudaGetLastError();
    return PLAIN;
  }
  *smem = bytes;
  return STAGED;
}

// dynamic shared memory of the last fake-quant kernel launched (any thread),
// for the tests to see which variant ran
std::atomic<int64_t> last_stage_bytes{-1};

int finish() {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return AOQ_OK;
  last_error = e;
  return AOQ_ERR_CUDA;
}

#define AOQ_DISPATCH_E(g, ...)                    \
  switch (g) {                                    \
    case 32: { constexpr int E = 1; __VA_ARGS__; } break; \
    case 64: { constexpr int E = 2; __VA_ARGS__; } break; \
    case 128: { constexpr int E = 4; __VA_ARGS__; } break; \
    case 256: { constexpr int E = 8; __VA_ARGS__; } break; \
    default: return AOQ_ERR_ARG;                  \
  }
#define AOQ_DISPATCH_AWQ(awq, ...)                \
  if (awq) { constexpr int AWQ = 1; __VA_ARGS__; } \
  else { constexpr int AWQ = 0; __VA_ARGS__; }
#define AOQ_DISPATCH_DT(dt, ...)                  \
  switch (dt) {                                   \
    case AOQ_BF16: { constexpr int DT = AOQ_BF16; __VA_ARGS__; } break; \
    case AOQ_F16: { constexpr int DT = AOQ_F16; __VA_ARGS__; } break; \
    case AOQ_F32: { constexpr int DT = AOQ_F32; __VA_ARGS__; } break; \
    default: return AOQ_ERR_ARG;                  \
  }

}  // namespace

// AOQ_CUDA_FAST=0: every row and group through the general code (read at
// each launch, like AOQ_CUDA_STAGE), for comparison
static int fast_enabled() {
  const char *env = getenv("AOQ_CUDA_FAST");
  return !(env && env[0] == '0');
}

extern "C" int64_t aoq_cuda_last_stage_bytes(void) { return last_stage_bytes.load(); }

extern "C" const char *aoq_cuda_last_error(void) {
  return last_error == cudaSuccess ? "no CUDA error recorded" : cudaGetErrorString(last_error);
}

extern "C" int aoq_cuda_fq_fwd(const void *w, void *out, uint8_t *codes, float *scales, float *zeros,
                               int64_t N, int64_t K, int64_t g, int dt, int scheme, int awq, int cs,
                               int device, void *stream) {
  if (N <= 0 || K <= 0 || K % g || N > 0x7fffffff) return AOQ_ERR_ARG;
  DeviceGuard guard(device);
  if (!guard.ok) return AOQ_ERR_CUDA;
  cudaStream_t strm = (cudaStream_t)stream;
  const bool vec = aligned16(w) && (!out || aligned16(out));
  const int fast_ok = fast_enabled();
  AOQ_DISPATCH_DT(dt, AOQ_DISPATCH_E(g, AOQ_DISPATCH_AWQ(awq, {
    size_t smem = 0;
    if (scheme == AOQ_SCHEME_FP8_INT4) {
      constexpr int S = AOQ_SCHEME_FP8_INT4;
      const size_t bytes = (size_t)K * sizeof(typename Elt<DT>::T);
      auto kern = vec ? choose<fq_fwd_kernel<DT, E, true, false, S, AWQ>, fq_fwd_kernel<DT, E, true, true, S, AWQ>>(
                            true, device, bytes, &smem)
                      : choose<fq_fwd_kernel<DT, E, false, false, S, AWQ>,
                               fq_fwd_kernel<DT, E, false, true, S, AWQ>>(true, device, bytes, &smem);
      kern<<<(unsigned)N, TPB, smem, strm>>>(w, out, codes, scales, zeros, K, cs, fast_ok);
    } else {
      constexpr int S = AOQ_SCHEME_INT4_ASYM;
      auto kern = vec ? fq_fwd_kernel<DT, E, true, false, S, AWQ> : fq_fwd_kernel<DT, E, false, false, S, AWQ>;
      kern<<<(unsigned)N, TPB, 0, strm>>>(w, out, codes, scales, zeros, K, cs, fast_ok);
    }
    last_stage_bytes = (int64_t)smem;
  })));
  return finish();
}

extern "C" int aoq_cuda_fq_bwd(const void *grad, const void *w, void *gw, int64_t N, int64_t K, int64_t g,
                               int dt, int scheme, int awq, int cs, int st, int device, void *stream) {
  if (N <= 0 || K <= 0 || K % g || N > 0x7fffffff) return AOQ_ERR_ARG;
  DeviceGuard guard(device);
  if (!guard.ok) return AOQ_ERR_CUDA;
  cudaStream_t strm = (cudaStream_t)stream;
  const bool vec = aligned16(w) && aligned16(grad) && aligned16(gw);
  const int fast_ok = fast_enabled();
  AOQ_DISPATCH_DT(dt, AOQ_DISPATCH_E(g, {
    if (scheme == AOQ_SCHEME_FP8_INT4) {
      const size_t bytes = 2 * (size_t)K * sizeof(typename Elt<DT>::T);
      size_t smem;
      auto kern =
          vec ? choose<fp8_int4_bwd_kernel<DT, E, true, false>, fp8_int4_bwd_kernel<DT, E, true, true>>(
                    true, device, bytes, &smem)
              : choose<fp8_int4_bwd_kernel<DT, E, false, false>, fp8_int4_bwd_kernel<DT, E, false, true>>(
                    true, device, bytes, &smem);
      kern<<<(unsigned)N, TPB, smem, strm>>>(grad, w, gw, K, awq, cs, st, fast_ok);
      last_stage_bytes = (int64_t)smem;
    } else {
      if (vec)
        asym_bwd_kernel<DT, E, true><<<(unsigned)N, TPB, 0, strm>>>(grad, w, gw, K, awq, cs, st, fast_ok);
      else
        asym_bwd_kernel<DT, E, false><<<(unsigned)N, TPB, 0, strm>>>(grad, w, gw, K, awq, cs, st, fast_ok);
      last_stage_bytes = 0;
    }
  }));
  return finish();
}

extern "C" int aoq_cuda_fp8_rows_fwd(const void *x, void *out, int64_t R, int64_t K, int dt, int cs, int device,
                                     void *stream) {
  if (R <= 0 || K <= 0 || R > 0x7fffffff) return AOQ_ERR_ARG;
  DeviceGuard guard(device);
  if (!guard.ok) return AOQ_ERR_CUDA;
  AOQ_DISPATCH_DT(dt, {
    size_t smem;
    const bool vec = aligned16(x) && aligned16(out) && K % (16 / sizeof(typename Elt<DT>::T)) == 0;
    const size_t bytes = (size_t)K * sizeof(typename Elt<DT>::T);
    auto kern = vec ? choose<fp8_rows_fwd_kernel<DT, true, false>, fp8_rows_fwd_kernel<DT, true, true>>(
                          true, device, bytes, &smem)
                    : choose<fp8_rows_fwd_kernel<DT, false, false>, fp8_rows_fwd_kernel<DT, false, true>>(
                          true, device, bytes, &smem);
    kern<<<(unsigned)R, TPB, smem, (cudaStream_t)stream>>>(x, out, K, cs, fast_enabled());
    last_stage_bytes = (int64_t)smem;
  });
  return finish();
}

extern "C" int aoq_cuda_fp8_rows_bwd(const void *grad, const void *x, void *gx, int64_t R, int64_t K, int dt,
                                     int cs, int st, int device, void *stream) {
  if (R <= 0 || K <= 0 || R > 0x7fffffff) return AOQ_ERR_ARG;
  DeviceGuard guard(device);
  if (!guard.ok) return AOQ_ERR_CUDA;
  AOQ_DISPATCH_DT(dt, {
    size_t smem;
    const bool vec = aligned16(grad) && aligned16(x) && aligned16(gx) && K % RowsV<DT>::V == 0;
    const size_t bytes = 2 * (size_t)K * sizeof(typename Elt<DT>::T);
    auto kern = vec ? choose<fp8_rows_bwd_kernel<DT, true, false>, fp8_rows_bwd_kernel<DT, true, true>>(
                          true, device, bytes, &smem)
                    : choose<fp8_rows_bwd_kernel<DT, false, false>, fp8_rows_bwd_kernel<DT, false, true>>(
                          true, device, bytes, &smem);
    kern<<<(unsigned)R, TPB, smem, (cudaStream_t)stream>>>(grad, x, gx, K, cs, st, fast_enabled());
    last_stage_bytes = (int64_t)smem;
  });
  return finish();
}

extern "C" int aoq_cuda_pack_awq(const uint8_t *codes, int32_t *packed, int64_t R, int64_t C, int device,
                                 void *stream) {
  if (R < 0 || C < 0 || R % 8) return AOQ_ERR_ARG;
  const int64_t total = C * (R / 8);
  if (total == 0) return AOQ_OK;
  DeviceGuard guard(device);
  if (!guard.ok) return AOQ_ERR_CUDA;
  const int threads = 256;
  pack_awq_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
      codes, packed, R, C);
  return finish();
}
