/* Scalar numerics shared by the CPU (.c) and CUDA (.cu) kernels.
 *
 * Every function here is the single definition of one rounding step of
 * SPEC.md; the CPU kernels, the CUDA kernels and the C reference all call
 * these, so a change of numerics is a change in one place.
 *
 * Build rule: compile with contraction of a*b+c into FMA disabled
 * (gcc -ffp-contract=off, nvcc --fmad=false): torch rounds every product
 * and every sum separately, and so must we.
 */
#ifndef AOQ_MATH_H
#define AOQ_MATH_H

#include <stdint.h>
#include <string.h>
#ifndef __CUDACC__
#include <math.h> /* fmaf */
#endif

#ifdef __CUDACC__
#define AOQ_HD __host__ __device__ __forceinline__
#else
#define AOQ_HD static inline
#endif

/* dtype codes used across the C layer (not torch's codes) */
enum { AOQ_F32 = 0, AOQ_F16 = 1, AOQ_BF16 = 2 };

/* scheme / mode flags */
enum { AOQ_SCHEME_FP8_INT4 = 0, AOQ_SCHEME_INT4_ASYM = 1 };

/* warps per row-block of the CUDA kernels; fixes the canonical sum order */
#define AOQ_NW 8
/* chunks of E = g / 32 elements per thread in the fp8-int4 backward (32 / C
 * lanes per group, C groups per warp; 16 elements per lane for g >= 128, as
 * many as 128 registers hold for bf16; 8 for g = 64 and 32: 8 chunks of 2
 * spilled, and each chunk has its own row-sum accumulators); its row sums run over AOQ_NW * C
 * "virtual warps" of 32 canonical lanes (fq_cpu.c) */
#define AOQ_FP8_BWD_C(E) ((E) == 8 ? 2 : (E) == 1 ? 8 : 4)
#define AOQ_FP8_BWD_CMAX 8

/* status codes returned by launchers */
enum { AOQ_OK = 0, AOQ_ERR_ARG = 1, AOQ_ERR_CUDA = 2, AOQ_ERR_NOMEM = 3, AOQ_ERR_STREAM = 4 };

AOQ_HD uint32_t aoq_f2u(float f) {
#ifdef __CUDA_ARCH__
  return (uint32_t)__float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
AOQ_HD float aoq_u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

AOQ_HD int aoq_isnan(float x) { return x != x; }
AOQ_HD int aoq_isfinite(float x) { return (aoq_f2u(x) & 0x7f800000u) != 0x7f800000u; }

/* round-half-to-even to an integer-valued float (torch.round / nearbyintf) */
AOQ_HD float aoq_rint(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  /* (|x| + 2^23) - 2^23 rounds half to even in the default rounding mode;
   * portable (no SSE4.1 roundps needed), branch-free, vectorizable. */
  uint32_t u = aoq_f2u(x);
  float ax = aoq_u2f(u & 0x7fffffffu);
  float r = aoq_u2f(aoq_f2u((ax + 8388608.0f) - 8388608.0f) | (u & 0x80000000u));
  return ax < 8388608.0f ? r : x; /* already integral, inf or NaN */
#endif
}

/* ---- bf16 ---------------------------------------------------------------- */
AOQ_HD uint16_t aoq_f32_to_bf16_bits(float f) {
  uint32_t u = aoq_f2u(f);
  uint16_t r = (uint16_t)((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return f != f ? (uint16_t)0x7FC0 : r;
}
AOQ_HD float aoq_bf16_bits_to_f32(uint16_t h) { return aoq_u2f(((uint32_t)h) << 16); }

/* ---- fp16 (IEEE binary16), round-to-nearest-even, overflow to inf --------
 * On a GPU, the three functions below are the hardware's conversions (PTX
 * cvt.rn.f16.f32 and cvt.f32.f16, one instruction each where the code
 * here takes ten to twenty): the same values for every float and fp16 but
 * NaN (tests/fast_paths.c checks the float-to-fp16 code here against the C
 * compiler's IEEE conversion on all 2^32 floats; fp16 to float is exact),
 * and for a NaN a NaN of other bits (fp16 0x7fff, float 0x7fffffff).
 * Nothing depends on a NaN's bits: the GPU's float arithmetic makes NaNs of
 * its own, and the tests, like torch's CPU and GPU results, agree on where
 * the NaNs are, not on their bits.  The bf16 and fp32 kernels use them too,
 * for AWQ's fp16 scales (aoq_rows.h).  The emulator and the CPU kernels run
 * the code here. */
AOQ_HD uint16_t aoq_f32_to_f16_bits(float f) {
#ifdef __CUDA_ARCH__
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  uint32_t u = aoq_f2u(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
  if (a < 0x38800000u) {                                   /* below 2^-14: subnormal */
    /* add 0.5 (2^-1): the float sum rounds (RNE) at bit 2^-24 */
    float r = aoq_u2f(a) + 0.5f;
    return (uint16_t)(sign | (aoq_f2u(r) - 0x3f000000u));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd;
  return (uint16_t)(sign | (a >> 13));
#endif
}
AOQ_HD float aoq_f16_bits_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
#else
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    /* zero or subnormal: m * 2^-24 is exact in float */
    float v = (float)m * 5.9604644775390625e-08f;
    return aoq_u2f(aoq_f2u(v) | sign);
  }
  if (e == 31) return aoq_u2f(sign | 0x7f800000u | (m << 13));
  return aoq_u2f(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

/* Value of bf16(x) / fp16(x) as float, branch-free (vectorizable). */
AOQ_HD float aoq_bf16_round(float x) {
  uint32_t u = aoq_f2u(x);
  float r = aoq_u2f((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
  return x != x ? x : r;
}
AOQ_HD float aoq_f16_round(float x) {
#ifdef __CUDA_ARCH__
  return aoq_f16_bits_to_f32(aoq_f32_to_f16_bits(x)); /* (see the fp16 section) */
#else
  uint32_t u = aoq_f2u(x);
  uint32_t sign = u & 0x80000000u, a = u ^ sign;
  float ax = aoq_u2f(a);
  /* normal range: round the mantissa to 10 bits */
  float rn = aoq_u2f((a + 0xfffu + ((a >> 13) & 1u)) & 0xffffe000u);
  /* below 2^-14: multiples of 2^-24; the float add rounds half to even */
  float rs = (ax + 0.5f) - 0.5f;
  float r = a < 0x38800000u ? rs : rn;
  r = a >= 0x477ff000u ? aoq_u2f(0x7f800000u) : r; /* rounds to >= 65520: inf */
  r = aoq_u2f(aoq_f2u(r) | sign);
  return x != x ? x : r;
#endif
}

/* Round a float to the value the dtype holds, returned as float. */
AOQ_HD float aoq_round_to(float x, int dt) {
  if (dt == AOQ_BF16) return aoq_bf16_round(x);
  if (dt == AOQ_F16) return aoq_f16_round(x);
  return x;
}

/* Load element i of a D-typed buffer as float. */
AOQ_HD float aoq_load(const void *p, int64_t i, int dt) {
  if (dt == AOQ_BF16) return aoq_bf16_bits_to_f32(((const uint16_t *)p)[i]);
  if (dt == AOQ_F16) return aoq_f16_bits_to_f32(((const uint16_t *)p)[i]);
  return ((const float *)p)[i];
}
/* Store float x (already a value of dtype dt, or to be rounded) at element i. */
AOQ_HD void aoq_store(void *p, int64_t i, float x, int dt) {
  if (dt == AOQ_BF16)
    ((uint16_t *)p)[i] = aoq_f32_to_bf16_bits(x);
  else if (dt == AOQ_F16)
    ((uint16_t *)p)[i] = aoq_f32_to_f16_bits(x);
  else
    ((float *)p)[i] = x;
}

/* ---- float8 e4m3fn ------------------------------------------------------ */
/* Value of float8_e4m3fn(x) as float: round-to-nearest-even, saturating
 * finite overflow to +-448 (torch >= 2.12 eager cast), NaN stays NaN. */
AOQ_HD float aoq_fp8_e4m3_round(float x) {
  uint32_t u = aoq_f2u(x);
  uint32_t sign = u & 0x80000000u, a = u ^ sign;
  float ax = aoq_u2f(a);
  /* normal: round the mantissa to 3 bits, saturating at 448 (0x7e) */
  uint32_t n = (a + 0x7ffffu + ((a >> 20) & 1u)) & 0xfff00000u;
  n = n > 0x43e00000u ? 0x43e00000u : n;
  /* below 2^-6: multiples of 2^-9; the float add rounds half to even */
  float rs = (ax + 16384.0f) - 16384.0f;
  float r = a < (121u << 23) ? rs : aoq_u2f(n);
  r = a >= (1087u << 20) ? 448.0f : r; /* >= 480 or inf: saturate */
  r = aoq_u2f(aoq_f2u(r) | sign);
  return x != x ? x : r;
}

/* ---- fast paths of the CUDA kernels ------------------------------------ */
/* Each equals the general function above wherever its stated domain holds
 * (tests/fast_paths.c checks every float there), except that
 * aoq_fp8_e4m3_round_fast's zero comes out +0 (nothing the kernels compute
 * from it depends on that sign); the kernels use them only for rows and
 * groups known to stay in that domain. */

/* aoq_fp8_e4m3_round(x) for |x| <= 448 (after the clamp), as RN(x + c) - c
 * with c = 1.5 * 2^(e + 20) (e the exponent of x: 2^e is x with its sign
 * and fraction bits cleared), at least 1.5 * 2^14 (below 2^-6 the
 * subnormal spacing 2^-9): c's float ulp is the grid spacing 2^(e - 3), x + c
 * stays in c's binade, the difference is exact, and ties go to even because
 * c / ulp = 3 * 2^22 is even.  One integer op, a multiply, a max and two
 * adds, instead of a chain of integer ops and NaN selects. */
AOQ_HD float aoq_fp8_e4m3_c(float x) { /* its c */
  const float c = aoq_u2f(aoq_f2u(x) & 0x7f800000u) * 1572864.0f; /* 1.5 * 2^20 */
  return c > 24576.0f ? c : 24576.0f;
}
AOQ_HD float aoq_fp8_e4m3_round_fast(float x) {
  const float c = aoq_fp8_e4m3_c(x);
  return (x + c) - c;
}

/* aoq_bf16_round(x) for x = +-0 or 2^-126 <= |x| < 2^110, the sign of a zero
 * kept: Veltkamp's splitting, h = x * (2^16 + 1), x rounded to 24 - 16 = 8
 * significant bits is h - (h - x), which rounds half to even on every float
 * of the domain (tests/fast_paths.c: all of them; h stays finite, and a
 * nonzero x normal, below 2^111).  A multiply and two subtractions, all on
 * the float pipe (no integer op); each rounded on its own: CUDA's __fmul_rn
 * and __fsub_rn are never contracted into a fused multiply-add, which would
 * compute h - x exactly and break the splitting (the host code is built with
 * -ffp-contract=off). */
AOQ_HD float aoq_bf16_round_fast(float x) {
#ifdef __CUDA_ARCH__
  const float h = __fmul_rn(x, 65537.0f);
  return __fsub_rn(h, __fsub_rn(h, x));
#else
  const float h = x * 65537.0f;
  return h - (h - x);
#endif
}

/* a / b (IEEE, round to nearest) from y = 1 / b (IEEE), for a divisor that a
 * whole group or row shares: q0 = a * y is within an ulp of a / b, e = b * q0
 * - a is exact (one fma), and q0 - e * y rounds to a / b (Markstein's
 * correction), for b in [2^-24, 2^24] and a = +-0 or |a| in [2^-96, 2^96]:
 * no quotient, residual or product leaves the normal range (below |a| =
 * 2^-102 the residual loses bits).  A zero a keeps its sign (b > 0).  Three
 * multiply-adds instead of a division with its range check and slow path;
 * tests/fast_paths.c checks it against the division. */
AOQ_HD float aoq_div_by(float a, float b, float y) {
  const float q0 = a * y;
  const float e = fmaf(b, q0, -a);
  return fmaf(-e, y, q0);
}

/* Constants as torch sees them after casting a Python scalar to dtype D. */
AOQ_HD float aoq_eps_in(float eps, int dt) { return aoq_round_to(eps, dt); }

/* clamp(x, min=lo) with torch semantics: NaN propagates. */
AOQ_HD float aoq_clamp_min(float x, float lo) { return x < lo ? lo : x; }
/* clamp(x, lo, hi) with NaN propagating. */
AOQ_HD float aoq_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
AOQ_HD float aoq_sgn(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : (x == 0.f ? 0.f : x)); }

/* `x / c` for a Python-scalar divisor c, the way torch computes it on the
 * device: CPU divides; CUDA multiplies by the float reciprocal. */
AOQ_HD float aoq_div_scalar(float x, float c, int cuda_semantics) {
  return cuda_semantics ? x * (1.0f / c) : x / c;
}

#endif
