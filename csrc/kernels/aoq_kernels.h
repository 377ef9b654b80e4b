/* Plain C entry points of the kernels: pointers, sizes, flags, a stream.
 * No torch types.  CPU versions in fq_cpu.c, CUDA versions in fq_cuda.cu.
 *
 * Tensors are contiguous row-major.  w, out, grad, gw: [N, K] of dtype dt.
 * codes: uint8 [N, K] (unsigned code, 0..15), scales / zeros: float [N, K/g]
 * (exact values of the scale and zero the fake quant used).  Any of out,
 * codes, scales, zeros may be NULL.
 */
#ifndef AOQ_KERNELS_H
#define AOQ_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* scheme: AOQ_SCHEME_FP8_INT4 / AOQ_SCHEME_INT4_ASYM; awq: 0 torchao, 1 AWQ-exact;
 * cs: torch CUDA scalar-division semantics (1 only to emulate/verify the GPU). */
int aoq_cpu_fq_fwd(const void *w, void *out, uint8_t *codes, float *scales, float *zeros,
                   int64_t N, int64_t K, int64_t g, int dt, int scheme, int awq, int cs);
/* st: torch's clamp-backward convention, 1 = exclusive bounds (torch >= 2.14) */
int aoq_cpu_fq_bwd(const void *grad, const void *w, void *gw, int64_t N, int64_t K, int64_t g,
                   int dt, int scheme, int awq, int cs, int st);
/* fp8 per-row activation fake quant over rows of length K. */
int aoq_cpu_fp8_rows_fwd(const void *x, void *out, int64_t R, int64_t K, int dt, int cs);
int aoq_cpu_fp8_rows_bwd(const void *grad, const void *x, void *gx, int64_t R, int64_t K, int dt,
                         int cs, int st);
/* AWQ pack: codes uint8 [R, C] (row-major, values 0..15) -> int32 [C, R/8]
 * (transposed, 8 consecutive rows per word in AWQ order). R % 8 == 0. */
int aoq_cpu_pack_awq(const uint8_t *codes, int32_t *packed, int64_t R, int64_t C);

/* torch-order sums (CPU, torchao mode, torch's division rule): vw = the
 * float lanes of the running torch's CPU sum kernel (4..32; 0 = always the
 * canonical order); half_ok = its bf16/fp16 sums add the two halves of each
 * 2*vw-element load (else those sums keep the canonical order).  Returns
 * AOQ_ERR_ARG for an unsupported vw.  Also: one torch-order sum, for the
 * probe that finds vw. */
int aoq_cpu_set_torch_sum(int vw, int half_ok);
float aoq_cpu_torch_sum(const float *x, int64_t n, int vw, int half);

#ifdef AOQ_WITH_CUDA
/* cudaGetErrorString of the last error a launcher on this thread saw. */
const char *aoq_cuda_last_error(void);
/* Bytes of shared memory the last fake-quant kernel launched (fq_fwd, fq_bwd,
 * fp8_rows_*; any thread) staged its row in: 0 when unstaged, -1 before any. */
int64_t aoq_cuda_last_stage_bytes(void);
int aoq_cuda_fq_fwd(const void *w, void *out, uint8_t *codes, float *scales, float *zeros,
                    int64_t N, int64_t K, int64_t g, int dt, int scheme, int awq, int cs,
                    int device, void *stream);
int aoq_cuda_fq_bwd(const void *grad, const void *w, void *gw, int64_t N, int64_t K, int64_t g,
                    int dt, int scheme, int awq, int cs, int st, int device, void *stream);
int aoq_cuda_fp8_rows_fwd(const void *x, void *out, int64_t R, int64_t K, int dt, int cs,
                          int device, void *stream);
int aoq_cuda_fp8_rows_bwd(const void *grad, const void *x, void *gx, int64_t R, int64_t K,
                          int dt, int cs, int st, int device, void *stream);
int aoq_cuda_pack_awq(const uint8_t *codes, int32_t *packed, int64_t R, int64_t C, int device,
                      void *stream);
#endif

#ifdef __cplusplus
}
#endif
#endif
