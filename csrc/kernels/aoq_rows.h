/* Per-row algorithms shared by the CPU and CUDA kernels (reference-grade:
 * scalar, one row of a [N, K] weight at a time, every step rounded as
 * SPEC.md says).  The CPU kernel runs these per row on OpenMP threads; the
 * CUDA kernel runs the same math with a block per row (see fq_cuda.cu) and
 * is tested bit for bit against them.
 *
 * Notation: x = fp32(w row), dt = storage dtype D of w, g = group size,
 * cs = 1 for CUDA torch semantics of `tensor / python_scalar` (torchao
 * mode only; the AWQ modes are our own formulas and always divide).
 */
#ifndef AOQ_ROWS_H
#define AOQ_ROWS_H

#include "aoq_math.h"

#define AOQ_FP8_MAX 448.0f

/* vectorization hints for the host compiler (ignored by nvcc) */
#if defined(__CUDACC__) || !defined(_OPENMP)
#define AOQ_SIMD_MAX_OR(m, f)
#define AOQ_SIMD_MAXMIN_OR(a, b, f)
#else
#define AOQ_PRAGMA(x) _Pragma(#x)
#define AOQ_SIMD_MAX_OR(m, f) AOQ_PRAGMA(omp simd reduction(max : m) reduction(| : f))
#define AOQ_SIMD_MAXMIN_OR(a, b, f) \
  AOQ_PRAGMA(omp simd reduction(max : a) reduction(min : b) reduction(| : f))
#endif

/* Gradient masks of torch's clamp backward: inclusive bounds up to torch
 * 2.13 (lo <= x <= hi), exclusive from torch 2.14 (lo < x < hi).  `st`
 * selects the exclusive rule; ops.py detects which one the running torch uses. */
AOQ_HD int aoq_in(float x, float lo, float hi, int st) {
  return st ? (x > lo && x < hi) : (x >= lo && x <= hi);
}
AOQ_HD int aoq_ge(float x, float lo, int st) { return st ? x > lo : x >= lo; }

/* ---------------------------------------------------------------------- */
/* Stage 1 of fp8-int4 (also the whole fp8 activation fake quant):
 * per-row fp8 scale and the fp8 round trip, wd = D(fp32(e4m3(x/s)) * s).
 * Returns s_row (0 when the row scale underflows: then wd = 0). */
AOQ_HD float aoq_fp8_scale_from_amax(float a, int dt, int cs) {
  a = aoq_clamp_min(a, aoq_eps_in(1e-12f, dt));
  return aoq_round_to(aoq_div_scalar(a, AOQ_FP8_MAX, cs), dt);
}

AOQ_HD float aoq_fp8_row_scale(const float *x, int64_t K, int dt, int cs, float *amax_out) {
  float a = 0.f;
  int nan = 0;
  AOQ_SIMD_MAX_OR(a, nan)
  for (int64_t k = 0; k < K; k++) {
    float v = x[k] < 0.f ? -x[k] : x[k];
    nan |= aoq_isnan(v);
    a = v > a ? v : a;
  }
  if (nan) a = aoq_u2f(0x7fc00000u);
  if (amax_out) *amax_out = a;
  return aoq_fp8_scale_from_amax(a, dt, cs);
}

AOQ_HD float aoq_fp8_rt(float x, float s_row, int dt) {
  float t = aoq_clamp(x / s_row, -AOQ_FP8_MAX, AOQ_FP8_MAX);
  float r = aoq_round_to(aoq_fp8_e4m3_round(t) * s_row, dt);
  return s_row == 0.f ? 0.f : r; /* torchao gives NaN here (fp16 rows of zeros); we give 0 */
}

/* The fp8 activation fake quant of one element: aoq_fp8_rt, but where the
 * row scale underflows to 0 (fp16 rows of amax below about 2^-15) x's signed
 * zero, as torchao's clamp(x / 0) * 0 for x != 0 (NaN for x = ±0: ours +0). */
AOQ_HD float aoq_fp8_rt_act(float x, float s_row, int dt) {
  float r = aoq_fp8_rt(x, s_row, dt);
  return s_row == 0.f && x != 0.f ? aoq_u2f(aoq_f2u(x) & 0x80000000u) : r;
}

/* ---------------------------------------------------------------------- */
/* Stage 2 of fp8-int4: symmetric int4 over one group of the fp8-rounded
 * row.  Inputs wd[0..g) (values of D).  Writes out (values of D, unrounded
 * storage is the caller's), codes q+8, and the group scale.
 * awq: dequantize with fp16(s_g) instead of s_g. */
typedef struct {
  float sg;   /* group scale as D value */
  float rcp;  /* D(1/sg) */
  float sdq;  /* scale used by the dequantize: sg, or fp16(sg) in awq mode */
  float m;    /* amax |wd| */
  float m8;   /* D(m / 8) before the eps clamp */
} aoq_sym_group;

/* from the group's amax |wd| (NaN if the group has a NaN) */
AOQ_HD aoq_sym_group aoq_sym_group_from_max(float m, int dt, int awq) {
  aoq_sym_group p;
  p.m = m;
  p.m8 = aoq_round_to(m * 0.125f, dt); /* /8 is exact in any rounding mode */
  p.sg = aoq_clamp_min(p.m8, aoq_eps_in(1e-6f, dt));
  p.rcp = aoq_round_to(1.0f / p.sg, dt);
  p.sdq = awq ? aoq_f16_bits_to_f32(aoq_f32_to_f16_bits(p.sg)) : p.sg;
  return p;
}

AOQ_HD aoq_sym_group aoq_sym_group_params(const float *wd, int64_t g, int dt, int awq) {
  float m = 0.f;
  int nan = 0;
  AOQ_SIMD_MAX_OR(m, nan)
  for (int64_t k = 0; k < g; k++) {
    float v = wd[k] < 0.f ? -wd[k] : wd[k];
    nan |= aoq_isnan(v);
    m = v > m ? v : m;
  }
  if (nan) m = aoq_u2f(0x7fc00000u);
  return aoq_sym_group_from_max(m, dt, awq);
}

/* signed code in [-8, 7] (as float; NaN propagates), before/after clamp */
AOQ_HD float aoq_sym_code_raw(float wd, const aoq_sym_group *p, int dt) {
  /* fp16: a scale below 1/65504 has an infinite reciprocal, and torchao's
   * 0 * inf gives NaN for the zeros of such a group; their code is 0. */
  float r = aoq_rint(aoq_round_to(wd * p->rcp, dt)) + 0.0f;
  return wd == 0.f ? 0.f : r;
}
AOQ_HD float aoq_sym_deq(float qc, const aoq_sym_group *p, int dt) {
  return aoq_round_to(qc * p->sdq, dt);
}

/* ---- backward helpers ------------------------------------------------ */
/* torch's amax/amin backward gives every element `each * mask` (then times
 * sgn(x) for abs): the non-extremes get a signed zero, which decides the sign
 * of zero gradients.  0 * inf (fp16 overflow of `each`) is taken as a signed
 * 0, not NaN: where torch's gradient overflows we stay finite. */
AOQ_HD float aoq_masked(float each, int mask) {
  if (mask) return each;
  return (aoq_isfinite(each) || aoq_isnan(each)) ? each * 0.0f : aoq_u2f(aoq_f2u(each) & 0x80000000u);
}

/* d/d wd of D(wd * rcp): torch's D(gq * rcp); when fp16's 1/sg overflowed
 * (sg < 1/65504; torch: inf or 0*inf = NaN) the finite gq / sg. */
AOQ_HD float aoq_sym_gwd(float gq, const aoq_sym_group *p, int dt) {
  return aoq_isfinite(p->rcp) ? aoq_round_to(gq * p->rcp, dt) : aoq_round_to(gq * (1.0f / p->sg), dt);
}

/* gradient of the group scale: torch's D(g_sg_a + D(-g_r * D(rcp*rcp))), or,
 * where that overflows fp16 (torch: inf/NaN), the same sum in fp32. */
AOQ_HD float aoq_sym_gsg(float g_sg_a, float g_r, const aoq_sym_group *p, int dt) {
  float b = aoq_round_to(-g_r * aoq_round_to(p->rcp * p->rcp, dt), dt);
  float s = aoq_round_to(g_sg_a + b, dt);
  if (aoq_isfinite(s) || !aoq_isfinite(g_sg_a) || !aoq_isfinite(g_r)) return s;
  float r32 = 1.0f / p->sg;
  return aoq_round_to(g_sg_a + (g_r == 0.f ? 0.f : -g_r * (r32 * r32)), dt);
}

/* ---------------------------------------------------------------------- */
/* int4 asymmetric [0, 15], recentred to 8 (torchao, fp32 throughout). */
typedef struct {
  float mx, mn, d, s, z;
  /* awq mode: */
  float s16, zi;
} aoq_asym_group;

/* from the group's max and min (both NaN if the group has a NaN) */
AOQ_HD aoq_asym_group aoq_asym_group_from_minmax(float mx, float mn, int awq, int cs) {
  aoq_asym_group p;
  p.mx = mx;
  p.mn = mn;
  p.d = mx - mn;
  float dc = aoq_clamp_min(p.d, 1e-6f);
  if (awq) {
    p.s = dc / 15.0f;
    p.s16 = aoq_f16_bits_to_f32(aoq_f32_to_f16_bits(p.s));
    /* + 0: a zero point of zero is +0 whichever signed zero the group's min
     * was (the CPU and GPU reductions may meet +0 and -0 in either order) */
    p.zi = aoq_clamp(aoq_rint(-mn / p.s16), 0.f, 15.f) + 0.0f;
    p.z = 0.f;
  } else {
    p.s = aoq_div_scalar(dc, 15.0f, cs);
    p.z = mn + p.s * 8.0f;
    p.s16 = 0.f;
    p.zi = 0.f;
  }
  return p;
}

AOQ_HD aoq_asym_group aoq_asym_group_params(const float *x, int64_t g, int awq, int cs) {
  float mx = x[0], mn = x[0];
  int nan = 0;
  AOQ_SIMD_MAXMIN_OR(mx, mn, nan)
  for (int64_t k = 0; k < g; k++) {
    nan |= aoq_isnan(x[k]);
    mx = x[k] > mx ? x[k] : mx;
    mn = x[k] < mn ? x[k] : mn;
  }
  if (nan) mx = mn = aoq_u2f(0x7fc00000u);
  return aoq_asym_group_from_minmax(mx, mn, awq, cs);
}

/* unclamped code (float) */
AOQ_HD float aoq_asym_code_raw(float x, const aoq_asym_group *p, int awq) {
  if (awq) return aoq_rint(x / p->s16) + p->zi;
  return aoq_rint((x - p->mn) / p->s);
}
AOQ_HD float aoq_asym_deq(float qc, const aoq_asym_group *p, int awq) {
  if (awq) return (qc - p->zi) * p->s16;
  return (qc - 8.0f) * p->s + p->z;
}

/* The group's gradients of its max (g_mx) and min (g_mn) in the int4-asym
 * backward, from the partial sums over the group (summed in the canonical
 * order by the caller).  torchao mode: scale d/15 and zero mn + 8s. */
AOQ_HD void aoq_asym_gminmax_torchao(float g_s_a, float g_s_b, float g_z, float g_mn_a,
                                     const aoq_asym_group *p, int cs, int st, float *g_mx,
                                     float *g_mn) {
  float g_s = (g_s_a + g_s_b) + g_z * 8.0f;
  float g_d = aoq_div_scalar(g_s, 15.0f, cs);
  if (!aoq_ge(p->d, 1e-6f, st)) g_d = 0.f;
  *g_mx = g_d;
  *g_mn = (g_mn_a + g_z) - g_d;
}
/* awq mode: fp16 scale s16 and integer zero clamp(rint(-mn / s16), 0, 15). */
AOQ_HD void aoq_asym_gminmax_awq(float g_s_a, float g_s_b, float g_z_a, float g_z_b,
                                 const aoq_asym_group *p, int st, float *g_mx, float *g_mn) {
  float g_z = g_z_a + g_z_b;
  const float zr = aoq_rint(-p->mn / p->s16);
  if (!aoq_in(zr, 0.f, 15.f, st)) g_z = 0.f;
  const float g_negmn = g_z / p->s16;
  const float g_s_c = -g_z * ((-p->mn / p->s16) / p->s16);
  const float g_s = (g_s_a + g_s_b) + g_s_c;
  float g_d = g_s / 15.0f;
  if (!aoq_ge(p->d, 1e-6f, st)) g_d = 0.f;
  *g_mx = g_d;
  *g_mn = -g_negmn - g_d;
}

#endif
