/* CPU kernels: fake-quant forward/backward for both schemes and modes, the
 * fp8 activation fake quant, and the AWQ int4 pack.  Plain C over pointers.
 * Rows run in parallel on OpenMP threads; inner loops are simple counted
 * loops over contiguous floats.  Numerics: aoq_rows.h / aoq_math.h.
 *
 * Reductions (sums) in the backward: in torchao mode with torch's CPU
 * division rule, torch's own CPU order (aoq_cpu_torch_sum below), so the
 * gradient is torch autograd's bit for bit.  Otherwise (awq modes, and the
 * CUDA division rule the GPU tests compare against) one canonical order, the
 * natural one of the CUDA kernel (fq_cuda.cu: a block of AOQ_NW warps per
 * row), so the CPU and GPU gradients agree bit for bit:
 *   group sum (g elements, E = g/32 per lane): lane l adds its contiguous
 *     chunk l*E .. l*E+E-1 in order, then a halving tree over the 32 lanes
 *     (lane l += lane l+off, off = 16, 8, 4, 2, 1);
 *   row sum over groups (fp8-int4 weights): NV = NW * AOQ_FP8_BWD_C(E)
 *     virtual warps of 32 lanes, warp v taking groups v, v+NV, ... in order,
 *     its lane l adding its chunk of each; halving tree in each virtual warp,
 *     then over them;
 *   row sum of an activation row (any K): the row cut into chunks of 16
 *     bytes of its dtype (V = 8 bf16/fp16 or 4 fp32 elements, the last chunk
 *     short where V does not divide K); thread t of NW*32 adds the elements
 *     of chunks t, t+NW*32, ... in order; halving tree in each warp, then
 *     over warps.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "aoq_kernels.h"
#include "aoq_rows.h"

#define NW AOQ_NW
#define AOQ_INLINE static inline __attribute__((always_inline))

#ifdef _OPENMP
static int n_threads(void) { return omp_get_max_threads(); }
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int n_threads(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

/* per-thread scratch, allocated before the parallel region (so a failed
 * allocation never leaves a thread out of a worksharing loop) */
static float *scratch(int64_t per_thread, int64_t rows, int *nt) {
  *nt = n_threads();
  if (rows < *nt) *nt = rows > 0 ? (int)rows : 1;
  return (float *)malloc((size_t)(*nt) * (size_t)per_thread * sizeof(float));
}

static void tree32(float *lane) {
  for (int off = 16; off >= 1; off >>= 1)
    for (int l = 0; l < off; l++) lane[l] += lane[l + off];
}

/* halving tree in each of nv (virtual) warps, then over the warps */
static float tree_block(float (*acc)[32], int nv) {
  float ws[NW * AOQ_FP8_BWD_CMAX];
  for (int w = 0; w < nv; w++) {
    tree32(acc[w]);
    ws[w] = acc[w][0];
  }
  for (int off = nv / 2; off >= 1; off >>= 1)
    for (int w = 0; w < off; w++) ws[w] += ws[w + off];
  return ws[0];
}

/* lane l of 32 adds its E consecutive elements in order; E a constant here
 * so the lanes vectorize (strided loads) */
AOQ_INLINE float group_sum_e(const float *v, const int E) {
  float lane[32];
  for (int l = 0; l < 32; l++) lane[l] = 0.f; /* 0 + v: as the GPU, -0 sums to +0 */
  for (int e = 0; e < E; e++)
    for (int l = 0; l < 32; l++) lane[l] += v[l * E + e];
  tree32(lane);
  return lane[0];
}

static float group_sum(const float *v, int64_t g) {
  switch (g) {
    case 32: return group_sum_e(v, 1);
    case 64: return group_sum_e(v, 2);
    case 128: return group_sum_e(v, 4);
    default: return group_sum_e(v, 8);
  }
}

AOQ_INLINE float row_sum_grouped_e(const float *v, int64_t K, const int E) {
  float acc[NW * AOQ_FP8_BWD_CMAX][32];
  const int nv = NW * AOQ_FP8_BWD_C(E);
  const int64_t g = 32 * E, G = K / g;
  memset(acc, 0, (size_t)nv * sizeof acc[0]);
  for (int64_t j = 0; j < G; j++) {
    float *a = acc[j % nv];
    const float *vj = v + j * g;
    for (int e = 0; e < E; e++)
      for (int l = 0; l < 32; l++) a[l] += vj[l * E + e];
  }
  return tree_block(acc, nv);
}

static float row_sum_grouped(const float *v, int64_t K, int64_t g) {
  switch (g) {
    case 32: return row_sum_grouped_e(v, K, 1);
    case 64: return row_sum_grouped_e(v, K, 2);
    case 128: return row_sum_grouped_e(v, K, 4);
    default: return row_sum_grouped_e(v, K, 8);
  }
}

/* an activation row (fp8_rows backward): cut into chunks of V elements (16
 * bytes of the row's dtype: 8 of bf16/fp16, 4 of fp32; the last one short
 * where V does not divide K); thread t of the block (TPB = 32 * NW threads)
 * adds the elements of chunks t, t + TPB, ... in order, and its warp's lane
 * t % 32 holds the sum */
static float row_sum_chunked(const float *v, int64_t K, int V) {
  float acc[NW][32];
  memset(acc, 0, sizeof acc);
  const int64_t C = (K + V - 1) / V;
  for (int64_t c = 0; c < C; c++) {
    float *a = &acc[(c / 32) % NW][c % 32];
    const int64_t k0 = c * V, k1 = k0 + V < K ? k0 + V : K;
    for (int64_t k = k0; k < k1; k++) *a += v[k];
  }
  return tree_block(acc, NW);
}

/* ---- torch's own CPU summation order -------------------------------------
 * torch autograd sums the per-element terms of a group (or row) with ATen's
 * cascade_sum over a contiguous inner dimension: vw-lane vector accumulators,
 * four of them interleaved (ilp), a 4-level cascade every 16 steps, the
 * vector tail, then a scalar tail and the lanes added in order into a zero.
 * bf16/fp16 tensors are loaded 2*vw elements at a time and the two halves
 * added in float first.  Emulated here so that in torchao mode on the CPU the
 * extreme elements get torch's gradient bit for bit; vw comes from a probe of
 * the running torch (ao_awq_export/ops.py). */
#define AOQ_TV_MAX 32
/* set from Python with the GIL held, read by kernels running without it:
 * relaxed atomics (only the sum order depends on them) */
static int g_torch_vw = 0, g_torch_half = 0;
#define TORCH_VW() __atomic_load_n(&g_torch_vw, __ATOMIC_RELAXED)
#define TORCH_HALF() __atomic_load_n(&g_torch_half, __ATOMIC_RELAXED)

int aoq_cpu_set_torch_sum(int vw, int half_ok) {
  if (vw != 0 && (vw < 4 || vw > AOQ_TV_MAX || (vw & (vw - 1)))) return AOQ_ERR_ARG;
  __atomic_store_n(&g_torch_vw, vw, __ATOMIC_RELAXED);
  __atomic_store_n(&g_torch_half, half_ok != 0, __ATOMIC_RELAXED);
  return AOQ_OK;
}

static int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t r = 0;
  for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) r++;
  return r;
}

/* dst[l] += one loaded vector (bf16/fp16: the two halves of 2*VW added first) */
AOQ_INLINE void tv_load_add(float *dst, const float *src, const int VW, int half) {
  if (half)
    for (int l = 0; l < VW; l++) dst[l] += src[l] + src[VW + l];
  else
    for (int l = 0; l < VW; l++) dst[l] += src[l];
}

/* after the interleaved accumulators p[0..3] (ilp steps): the vector tail
 * into p[0], p[1..3] folded into it, the scalar tail, the lanes in order */
AOQ_INLINE float tv_finish(const float *x, int64_t n, const int VW, int half,
                           float p[4][AOQ_TV_MAX], int64_t ilp) {
  const int64_t vn = half ? 2 * VW : VW, vs = n / vn;
  for (int64_t i = ilp * 4; i < vs; i++) tv_load_add(p[0], x + i * vn, VW, half);
  for (int k = 1; k < 4; k++)
    for (int l = 0; l < VW; l++) p[0][l] += p[k][l];
  float r = 0.f;
  for (int64_t k = vs * vn; k < n; k++) r += x[k];
  for (int l = 0; l < VW; l++) r += p[0][l];
  return r;
}

/* The common case (fewer than 16*4 vectors: every group, short rows): no
 * cascade level completes, so only the four interleaved accumulators remain
 * (adding the other levels' +0 changes nothing: an accumulator that starts
 * at +0 never holds -0).  VW a constant here. */
AOQ_INLINE float torch_sum_short(const float *x, int64_t n, const int VW, int half) {
  const int64_t vn = half ? 2 * VW : VW, ilp = n / vn / 4;
  float p[4][AOQ_TV_MAX];
  for (int k = 0; k < 4; k++)
    for (int l = 0; l < VW; l++) p[k][l] = 0.f;
  for (int64_t i = 0; i < ilp; i++)
    for (int k = 0; k < 4; k++) tv_load_add(p[k], x + (i * 4 + k) * vn, VW, half);
  return tv_finish(x, n, VW, half, p, ilp);
}

float aoq_cpu_torch_sum(const float *x, int64_t n, int vw, int half) {
  const int64_t vn = half ? 2 * vw : vw, vs = n / vn, ilp = vs / 4;
  if (n < vn) { /* shorter than one vector: torch's scalar row_sum, 4 interleaved sums */
    float p[4] = {0.f, 0.f, 0.f, 0.f};
    const int64_t q = n / 4;
    for (int64_t i = 0; i < q; i++)
      for (int k = 0; k < 4; k++) p[k] += x[i * 4 + k];
    for (int64_t i = q * 4; i < n; i++) p[0] += x[i];
    return ((p[0] + p[1]) + p[2]) + p[3];
  }
  if (ilp < 16) { /* 16 = the smallest cascade step */
    if (vw == 8) return torch_sum_short(x, n, 8, half);
    if (vw == 16) return torch_sum_short(x, n, 16, half);
    return torch_sum_short(x, n, vw, half);
  }
  float acc[4][4][AOQ_TV_MAX]; /* cascade level, interleaved row, lane */
  memset(acc, 0, sizeof acc);
  int64_t lp = ceil_log2(ilp) / 4;
  if (lp < 4) lp = 4;
  const int64_t step = (int64_t)1 << lp, mask = step - 1;
  int64_t i = 0;
  while (i + step <= ilp) {
    for (int64_t j = 0; j < step; j++, i++)
      for (int k = 0; k < 4; k++) tv_load_add(acc[0][k], x + (i * 4 + k) * vn, vw, half);
    for (int j = 1; j < 4; j++) {
      for (int k = 0; k < 4; k++)
        for (int l = 0; l < vw; l++) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if (i & (mask << (j * lp))) break;
    }
  }
  for (; i < ilp; i++)
    for (int k = 0; k < 4; k++) tv_load_add(acc[0][k], x + (i * 4 + k) * vn, vw, half);
  for (int j = 1; j < 4; j++)
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < vw; l++) acc[0][k][l] += acc[j][k][l];
  return tv_finish(x, n, vw, half, acc[0], ilp);
}

/* a sum in the order the caller's mode asks for: torch's (tv > 0) or the
 * canonical one of the CUDA kernel */
static float gsum(const float *v, int64_t g, int tv, int half) {
  return tv ? aoq_cpu_torch_sum(v, g, tv, half) : group_sum(v, g);
}

/* 16-bit elements go through memcpy: a tensor's data need not be 2-byte
 * aligned (torch.frombuffer with an odd offset); compilers turn these into
 * plain (unaligned) loads and stores */
AOQ_INLINE uint16_t ld16(const unsigned char *p, int64_t k) {
  uint16_t v;
  memcpy(&v, p + 2 * k, sizeof v);
  return v;
}

AOQ_INLINE void st16(unsigned char *p, int64_t k, uint16_t v) { memcpy(p + 2 * k, &v, sizeof v); }

AOQ_INLINE void load_row(const void *p, int64_t off, float *dst, int64_t K, int dt) {
  if (dt == AOQ_BF16) {
    const unsigned char *s = (const unsigned char *)p + 2 * off;
    for (int64_t k = 0; k < K; k++) dst[k] = aoq_bf16_bits_to_f32(ld16(s, k));
  } else if (dt == AOQ_F16) {
    const unsigned char *s = (const unsigned char *)p + 2 * off;
    for (int64_t k = 0; k < K; k++) dst[k] = aoq_f16_bits_to_f32(ld16(s, k));
  } else {
    memcpy(dst, (const float *)p + off, (size_t)K * sizeof(float));
  }
}

AOQ_INLINE void store_row(void *p, int64_t off, const float *src, int64_t K, int dt) {
  if (dt == AOQ_BF16) {
    unsigned char *d = (unsigned char *)p + 2 * off;
    for (int64_t k = 0; k < K; k++) st16(d, k, aoq_f32_to_bf16_bits(src[k]));
  } else if (dt == AOQ_F16) {
    unsigned char *d = (unsigned char *)p + 2 * off;
    for (int64_t k = 0; k < K; k++) st16(d, k, aoq_f32_to_f16_bits(src[k]));
  } else {
    memcpy((float *)p + off, src, (size_t)K * sizeof(float));
  }
}

/* ------------------------------------------------------------------ */
/* forward, one row.  Always inlined into a switch on dt so every dtype  */
/* branch folds away and the element loops (branch-free math) vectorize. */
/* ------------------------------------------------------------------ */
AOQ_INLINE void fq_fwd_row(float *x, float *y, float *qf, uint8_t *codes, float *scales,
                           float *zeros, int64_t K, int64_t g, int dt, int scheme, int awq, int cs) {
  const int64_t G = K / g;
  if (scheme == AOQ_SCHEME_FP8_INT4) {
    float s_row = aoq_fp8_row_scale(x, K, dt, cs, NULL);
#pragma omp simd
    for (int64_t k = 0; k < K; k++) x[k] = aoq_fp8_rt(x[k], s_row, dt); /* x := wd */
    for (int64_t j = 0; j < G; j++) {
      const float *wd = x + j * g;
      float *yj = y + j * g, *qj = qf + j * g;
      float m = 0.f;
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t k = 0; k < g; k++) {
        float v = wd[k] < 0.f ? -wd[k] : wd[k];
        nan |= v != v;
        m = v > m ? v : m;
      }
      aoq_sym_group p = aoq_sym_group_from_max(nan ? aoq_u2f(0x7fc00000u) : m, dt, awq);
#pragma omp simd
      for (int64_t k = 0; k < g; k++) {
        float qc = aoq_clamp(aoq_sym_code_raw(wd[k], &p, dt), -8.f, 7.f);
        yj[k] = aoq_sym_deq(qc, &p, dt);
        qj[k] = qc + 8.f;
      }
      if (scales) scales[j] = p.sdq;
      if (zeros) zeros[j] = 8.f;
    }
  } else {
    for (int64_t j = 0; j < G; j++) {
      const float *xg = x + j * g;
      float *yj = y + j * g, *qj = qf + j * g;
      float mx = xg[0], mn = xg[0];
      int nan = 0;
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(| : nan)
      for (int64_t k = 0; k < g; k++) {
        nan |= xg[k] != xg[k];
        mx = xg[k] > mx ? xg[k] : mx;
        mn = xg[k] < mn ? xg[k] : mn;
      }
      if (nan) mx = mn = aoq_u2f(0x7fc00000u);
      aoq_asym_group p = aoq_asym_group_from_minmax(mx, mn, awq, cs);
#pragma omp simd
      for (int64_t k = 0; k < g; k++) {
        float qc = aoq_clamp(aoq_asym_code_raw(xg[k], &p, awq), 0.f, 15.f);
        yj[k] = aoq_asym_deq(qc, &p, awq);
        qj[k] = qc;
      }
      if (scales) scales[j] = awq ? p.s16 : p.s;
      if (zeros) zeros[j] = awq ? p.zi : p.z;
    }
  }
  if (codes)
    for (int64_t k = 0; k < K; k++) codes[k] = qf[k] == qf[k] ? (uint8_t)(int)qf[k] : 0; /* NaN: 0 */
}

AOQ_INLINE void fq_fwd_rows(const void *w, void *out, uint8_t *codes, float *scales, float *zeros,
                            int64_t N, int64_t K, int64_t g, int dt, int scheme, int awq, int cs,
                            float *x, float *y, float *qf) {
#pragma omp for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    load_row(w, n * K, x, K, dt);
    fq_fwd_row(x, y, qf, codes ? codes + n * K : NULL, scales ? scales + n * (K / g) : NULL,
               zeros ? zeros + n * (K / g) : NULL, K, g, dt, scheme, awq, cs);
    if (out) store_row(out, n * K, y, K, dt);
  }
}

__attribute__((target_clones("avx2", "default"))) static void fq_fwd_dispatch(
    const void *w, void *out, uint8_t *codes, float *scales, float *zeros, int64_t N, int64_t K,
    int64_t g, int dt, int scheme, int awq, int cs, float *x, float *y, float *qf) {
  if (dt == AOQ_BF16)
    fq_fwd_rows(w, out, codes, scales, zeros, N, K, g, AOQ_BF16, scheme, awq, cs, x, y, qf);
  else if (dt == AOQ_F16)
    fq_fwd_rows(w, out, codes, scales, zeros, N, K, g, AOQ_F16, scheme, awq, cs, x, y, qf);
  else
    fq_fwd_rows(w, out, codes, scales, zeros, N, K, g, AOQ_F32, scheme, awq, cs, x, y, qf);
}

int aoq_cpu_fq_fwd(const void *w, void *out, uint8_t *codes, float *scales, float *zeros,
                   int64_t N, int64_t K, int64_t g, int dt, int scheme, int awq, int cs) {
  if (N < 0 || K <= 0 || g <= 0 || K % g) return AOQ_ERR_ARG;
  int nt;
  float *buf = scratch(3 * K, N, &nt);
  if (!buf) return AOQ_ERR_NOMEM;
#pragma omp parallel num_threads(nt)
  {
    float *b = buf + (int64_t)thread_id() * 3 * K;
    fq_fwd_dispatch(w, out, codes, scales, zeros, N, K, g, dt, scheme, awq, cs, b, b + K, b + 2 * K);
  }
  free(buf);
  return AOQ_OK;
}

/* ------------------------------------------------------------------ */
/* backward of stage 1 (fp8 row round trip), given g_h = d loss / d wd   */
/* as fp32, writes gx (values of D) into gw.  Also the whole backward   */
/* of the fp8 activation fake quant.  tmp: K floats.                    */
/* ------------------------------------------------------------------ */
/* torch's two-pass reduction: a sum whose output is one number, over at
 * least GRAIN_SIZE (32768) elements, with tp > 1 threads: at::parallel_for
 * cuts it into min(tp, ceil(K / 32768)) chunks of ceil(K / chunks), each
 * summed as usual into its thread's slot of a tp-long buffer of zeros, and
 * the buffer is then summed the same way. */
static float torch_sum_two_pass(const float *v, int64_t K, int tv, int tp) {
  const int64_t grain = 32768;
  int64_t nc = (K + grain - 1) / grain;
  if (nc > tp) nc = tp;
  const int64_t chunk = (K + nc - 1) / nc;
  float part[256];
  for (int t = 0; t < tp; t++) part[t] = 0.f;
  for (int64_t c = 0; c < nc; c++) {
    const int64_t b = c * chunk, e = b + chunk < K ? b + chunk : K;
    if (b < e) part[c] = 0.f + aoq_cpu_torch_sum(v + b, e - b, tv, 0);
  }
  return aoq_cpu_torch_sum(part, tp, tv, 0);
}

/* tp: the torch thread count when this row is the op's only row, else 0 */
AOQ_INLINE float row_sum(const float *v, int64_t K, int64_t g, int dt, int tv, int tp) {
  if (tv) { /* torchao sums this row in fp32 */
    if (tp > 1 && tp <= 256 && K >= 32768) return torch_sum_two_pass(v, K, tv, tp);
    return aoq_cpu_torch_sum(v, K, tv, 0);
  }
  return g > 0 ? row_sum_grouped(v, K, g) : row_sum_chunked(v, K, dt == AOQ_F32 ? 4 : 8);
}

/* g: group size of the weight row (sum order), 0 for an activation row */
AOQ_INLINE void fp8_row_bwd(const float *x, const float *gh, float *gw, float *tmp, int64_t K, int64_t g,
                        int dt, int cs, int st, int tv, int tp) {
  float a0;
  float s_row = aoq_fp8_row_scale(x, K, dt, cs, &a0);
  if (s_row == 0.f) { /* scale underflow (fp16): forward gave 0, torchao NaN */
    for (int64_t k = 0; k < K; k++) gw[k] = 0.f;
    return;
  }
  /* d/ds_row of h = fp32(w8) * s_row  ->  sum g_h * w8 */
  #pragma omp simd
  for (int64_t k = 0; k < K; k++) {
    float t = aoq_clamp(x[k] / s_row, -AOQ_FP8_MAX, AOQ_FP8_MAX);
    tmp[k] = gh[k] * aoq_fp8_e4m3_round(t);
  }
  float sum_a = row_sum(tmp, K, g, dt, tv, tp);
  #pragma omp simd
  for (int64_t k = 0; k < K; k++) {
    float t = x[k] / s_row;
    /* gradient of `fp8_tensor.to(float32)`: cast back to float8 (torchao) */
    float gt = aoq_fp8_e4m3_round(gh[k] * s_row);
    if (!aoq_in(t, -AOQ_FP8_MAX, AOQ_FP8_MAX, st)) gt = 0.f;
    gw[k] = gt / s_row;
    tmp[k] = -gt * (t / s_row);
  }
  float sum_b = row_sum(tmp, K, g, dt, tv, tp);
  float g_sD = aoq_round_to(sum_a + sum_b, dt);
  float g_a = aoq_round_to(aoq_div_scalar(g_sD, AOQ_FP8_MAX, cs), dt);
  if (!aoq_ge(a0, aoq_eps_in(1e-12f, dt), st)) g_a = 0.f;
  int64_t cnt = 0;
  for (int64_t k = 0; k < K; k++) cnt += ((x[k] < 0.f ? -x[k] : x[k]) == a0);
  float each = cnt ? aoq_round_to(g_a / (float)cnt, dt) : 0.f;
#pragma omp simd
  for (int64_t k = 0; k < K; k++) {
    float ga = aoq_round_to(gw[k], dt);
    float e = aoq_masked(each, (x[k] < 0.f ? -x[k] : x[k]) == a0);
    gw[k] = aoq_round_to(ga + aoq_round_to(e * aoq_sgn(x[k]), dt), dt);
  }
}

/* backward of the fp8-int4 group stage: G (values of D), wd -> gwd (D) */
AOQ_INLINE void sym_group_bwd(const float *wd, const float *G, float *gwd, float *tmp, int64_t g, int dt,
                          int awq, int st, int tv) {
  const int half = dt != AOQ_F32; /* torchao sums this stage in the weight dtype */
  if (half && !TORCH_HALF()) tv = 0;
  aoq_sym_group p = aoq_sym_group_params(wd, g, dt, awq);
  #pragma omp simd
  for (int64_t k = 0; k < g; k++) {
    float qc = aoq_clamp(aoq_sym_code_raw(wd[k], &p, dt), -8.f, 7.f);
    tmp[k] = awq ? G[k] * qc : aoq_round_to(G[k] * qc, dt);
  }
  float g_sg_a = aoq_round_to(gsum(tmp, g, tv, half), dt);
  #pragma omp simd
  for (int64_t k = 0; k < g; k++) {
    float q2 = aoq_sym_code_raw(wd[k], &p, dt);
    float gd = aoq_round_to(G[k] * (awq ? p.sdq : p.sg), dt);
    float gq = aoq_in(q2, -8.f, 7.f, st) ? gd : 0.f;
    gwd[k] = aoq_sym_gwd(gq, &p, dt);
    tmp[k] = aoq_round_to(gq * wd[k], dt);
  }
  float g_r = aoq_round_to(gsum(tmp, g, tv, half), dt);
  float g_sg = aoq_sym_gsg(g_sg_a, g_r, &p, dt);
  if (!aoq_ge(p.m8, aoq_eps_in(1e-6f, dt), st)) g_sg = 0.f;
  float g_m = aoq_round_to(g_sg * 0.125f, dt);
  int64_t cnt = 0;
  for (int64_t k = 0; k < g; k++) cnt += ((wd[k] < 0.f ? -wd[k] : wd[k]) == p.m);
  float each = cnt ? aoq_round_to(g_m / (float)cnt, dt) : 0.f;
#pragma omp simd
  for (int64_t k = 0; k < g; k++) {
    float e = aoq_masked(each, (wd[k] < 0.f ? -wd[k] : wd[k]) == p.m);
    gwd[k] = aoq_round_to(gwd[k] + aoq_round_to(e * aoq_sgn(wd[k]), dt), dt);
  }
}

/* backward of int4-asym over one group: x, G fp32 -> gx fp32 */
AOQ_INLINE void asym_group_bwd(const float *x, const float *G, float *gx, float *tmp, int64_t g, int awq,
                           int cs, int st, int tv) {
  aoq_asym_group p = aoq_asym_group_params(x, g, awq, cs);
  float g_s, g_mn; /* g_s ends as the gradient of the group max */
  if (!awq) {
    float g_z = gsum(G, g, tv, 0);
    for (int64_t k = 0; k < g; k++)
      tmp[k] = G[k] * (aoq_clamp(aoq_asym_code_raw(x[k], &p, 0), 0.f, 15.f) - 8.f);
    float g_s_a = gsum(tmp, g, tv, 0);
    #pragma omp simd
    for (int64_t k = 0; k < g; k++) {
      float u = (x[k] - p.mn) / p.s;
      float q = aoq_rint(u);
      float gq = aoq_in(q, 0.f, 15.f, st) ? G[k] * p.s : 0.f;
      gx[k] = gq / p.s;
      tmp[k] = -gq * (u / p.s);
    }
    float g_s_b = gsum(tmp, g, tv, 0);
    float g_mn_a = -gsum(gx, g, tv, 0);
    aoq_asym_gminmax_torchao(g_s_a, g_s_b, g_z, g_mn_a, &p, cs, st, &g_s, &g_mn);
  } else {
    for (int64_t k = 0; k < g; k++) tmp[k] = G[k] * p.s16;
    float g_z_a = -group_sum(tmp, g);
    for (int64_t k = 0; k < g; k++)
      tmp[k] = G[k] * (aoq_clamp(aoq_asym_code_raw(x[k], &p, 1), 0.f, 15.f) - p.zi);
    float g_s_a = group_sum(tmp, g);
    #pragma omp simd
    for (int64_t k = 0; k < g; k++) {
      float v = aoq_asym_code_raw(x[k], &p, 1);
      float gv = aoq_in(v, 0.f, 15.f, st) ? G[k] * p.s16 : 0.f;
      gx[k] = gv / p.s16;
      tmp[k] = -gv * ((x[k] / p.s16) / p.s16);
    }
    float g_s_b = group_sum(tmp, g);
    for (int64_t k = 0; k < g; k++) {
      float v = aoq_asym_code_raw(x[k], &p, 1);
      tmp[k] = aoq_in(v, 0.f, 15.f, st) ? G[k] * p.s16 : 0.f;
    }
    float g_z_b = group_sum(tmp, g);
    aoq_asym_gminmax_awq(g_s_a, g_s_b, g_z_a, g_z_b, &p, st, &g_s, &g_mn);
  }
  int64_t cx = 0, cn = 0;
  for (int64_t k = 0; k < g; k++) {
    cx += (x[k] == p.mx);
    cn += (x[k] == p.mn);
  }
  float ex = cx ? g_s / (float)cx : 0.f, en = cn ? g_mn / (float)cn : 0.f;
#pragma omp simd
  for (int64_t k = 0; k < g; k++) gx[k] = (gx[k] + aoq_masked(ex, x[k] == p.mx)) + aoq_masked(en, x[k] == p.mn);
}

AOQ_INLINE void fq_bwd_rows(const void *grad, const void *w, void *gw, int64_t N, int64_t K,
                            int64_t g, int dt, int scheme, int awq, int cs, int st, int tp, float *b) {
  float *x = b, *G = b + K, *wd = b + 2 * K, *gg = b + 3 * K, *tmp = b + 4 * K;
  const int tv = (!awq && !cs) ? TORCH_VW() : 0; /* torchao mode, torch's CPU rules */
#pragma omp for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    load_row(w, n * K, x, K, dt);
    load_row(grad, n * K, G, K, dt);
    if (scheme == AOQ_SCHEME_FP8_INT4) {
      float s_row = aoq_fp8_row_scale(x, K, dt, cs, NULL);
#pragma omp simd
      for (int64_t k = 0; k < K; k++) wd[k] = aoq_fp8_rt(x[k], s_row, dt);
      for (int64_t j = 0; j < K / g; j++)
        sym_group_bwd(wd + j * g, G + j * g, gg + j * g, tmp, g, dt, awq, st, tv);
      fp8_row_bwd(x, gg, wd, tmp, K, g, dt, cs, st, tv, N == 1 ? tp : 0); /* wd := gw (D) */
      store_row(gw, n * K, wd, K, dt);
    } else {
      for (int64_t j = 0; j < K / g; j++)
        asym_group_bwd(x + j * g, G + j * g, gg + j * g, tmp, g, awq, cs, st, tv);
      store_row(gw, n * K, gg, K, dt);
    }
  }
}

__attribute__((target_clones("avx2", "default"))) static void fq_bwd_dispatch(
    const void *grad, const void *w, void *gw, int64_t N, int64_t K, int64_t g, int dt, int scheme,
    int awq, int cs, int st, int tp, float *b) {
  if (dt == AOQ_BF16)
    fq_bwd_rows(grad, w, gw, N, K, g, AOQ_BF16, scheme, awq, cs, st, tp, b);
  else if (dt == AOQ_F16)
    fq_bwd_rows(grad, w, gw, N, K, g, AOQ_F16, scheme, awq, cs, st, tp, b);
  else
    fq_bwd_rows(grad, w, gw, N, K, g, AOQ_F32, scheme, awq, cs, st, tp, b);
}

int aoq_cpu_fq_bwd(const void *grad, const void *w, void *gw, int64_t N, int64_t K, int64_t g,
                   int dt, int scheme, int awq, int cs, int st) {
  if (N < 0 || K <= 0 || g <= 0 || K % g) return AOQ_ERR_ARG;
  int nt;
  const int tp = n_threads(); /* torch's intra-op threads (the same OpenMP runtime) */
  float *buf = scratch(5 * K, N, &nt);
  if (!buf) return AOQ_ERR_NOMEM;
#pragma omp parallel num_threads(nt)
  fq_bwd_dispatch(grad, w, gw, N, K, g, dt, scheme, awq, cs, st, tp, buf + (int64_t)thread_id() * 5 * K);
  free(buf);
  return AOQ_OK;
}

/* ------------------------------------------------------------------ */
/* fp8 per-row activation fake quant                                    */
/* ------------------------------------------------------------------ */
AOQ_INLINE void rows_rows(const void *grad, const void *x, void *out, int64_t R, int64_t K, int dt,
                          int cs, int st, int tp, float *b) {
  float *xr = b, *G = b + K, *o = b + 2 * K, *tmp = b + 3 * K;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < R; r++) {
    load_row(x, r * K, xr, K, dt);
    if (grad) {
      load_row(grad, r * K, G, K, dt);
      fp8_row_bwd(xr, G, o, tmp, K, 0, dt, cs, st, cs ? 0 : TORCH_VW(), R == 1 ? tp : 0);
    } else {
      float s = aoq_fp8_row_scale(xr, K, dt, cs, NULL);
#pragma omp simd
      for (int64_t k = 0; k < K; k++) o[k] = aoq_fp8_rt_act(xr[k], s, dt);
    }
    store_row(out, r * K, o, K, dt);
  }
}

__attribute__((target_clones("avx2", "default"))) static void rows_dispatch(
    const void *grad, const void *x, void *out, int64_t R, int64_t K, int dt, int cs, int st, int tp,
    float *b) {
  if (dt == AOQ_BF16)
    rows_rows(grad, x, out, R, K, AOQ_BF16, cs, st, tp, b);
  else if (dt == AOQ_F16)
    rows_rows(grad, x, out, R, K, AOQ_F16, cs, st, tp, b);
  else
    rows_rows(grad, x, out, R, K, AOQ_F32, cs, st, tp, b);
}

static int rows_run(const void *grad, const void *x, void *out, int64_t R, int64_t K, int dt, int cs,
                    int st) {
  if (R < 0 || K <= 0) return AOQ_ERR_ARG;
  int nt;
  const int tp = n_threads(); /* torch's intra-op threads */
  float *buf = scratch(4 * K, R, &nt);
  if (!buf) return AOQ_ERR_NOMEM;
#pragma omp parallel num_threads(nt)
  rows_dispatch(grad, x, out, R, K, dt, cs, st, tp, buf + (int64_t)thread_id() * 4 * K);
  free(buf);
  return AOQ_OK;
}

int aoq_cpu_fp8_rows_fwd(const void *x, void *out, int64_t R, int64_t K, int dt, int cs) {
  return rows_run(NULL, x, out, R, K, dt, cs, 0);
}

int aoq_cpu_fp8_rows_bwd(const void *grad, const void *x, void *gx, int64_t R, int64_t K, int dt,
                         int cs, int st) {
  return rows_run(grad, x, gx, R, K, dt, cs, st);
}

/* ------------------------------------------------------------------ */
/* AWQ pack                                                             */
/* ------------------------------------------------------------------ */
int aoq_cpu_pack_awq(const uint8_t *codes, int32_t *packed, int64_t R, int64_t C) {
  static const int order[8] = {0, 4, 1, 5, 2, 6, 3, 7}; /* logical column j -> nibble slot */
  if (R < 0 || C < 0 || R % 8) return AOQ_ERR_ARG;
  const int64_t W = R / 8;
#pragma omp parallel for schedule(static)
  for (int64_t wi = 0; wi < W; wi++) {
    const uint8_t *rows = codes + wi * 8 * C; /* 8 rows, read as 8 contiguous streams */
    for (int64_t c = 0; c < C; c++) {
      uint32_t word = 0;
      for (int j = 0; j < 8; j++) word |= ((uint32_t)(rows[j * C + c] & 0xF)) << (4 * order[j]);
      packed[c * W + wi] = (int32_t)word;
    }
  }
  return AOQ_OK;
}
