/* Every float of each fast path's domain against the general function
 * (csrc/kernels/aoq_math.h), and aoq_div_by against the division.  Run by
 * tests/test_cuda_emu.py; argv[1] is a stride over the bit patterns (1: all
 * of them, about half a minute), argv[2] the fp16 check's.  Prints one line
 * per mismatch (at most 10) and exits 1 if there was any. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/aoq_math.h"

static int bad = 0;

static void report(const char *what, uint32_t u, float want, float got) {
  if (bad++ < 10) printf("%s(%08x): want %08x, got %08x\n", what, u, aoq_f2u(want), aoq_f2u(got));
}

/* every float a, a + stride, ... in [lo, hi] with both signs: fast(x) against
 * general(x), whose zero is taken as +0 (as aoq_fp8_e4m3_round_fast gives it)
 * unless signed_zero */
static uint64_t check(const char *what, uint64_t lo, uint64_t hi, uint64_t stride, float (*general)(float),
                      float (*fast)(float), int signed_zero) {
  uint64_t n = 0;
  for (uint64_t a = lo; a <= hi; a += stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const uint32_t u = (uint32_t)a | (s << 31);
      const float x = aoq_u2f(u);
      float want = general(x);
      const float got = fast(x);
      if (want == 0.f && !signed_zero) want = 0.f;
      if (aoq_f2u(want) != aoq_f2u(got)) report(what, u, want, got);
      n++;
    }
  }
  return n;
}

/* aoq_div_by(a, b, 1 / b) against a / b for every significand of a in [1, 2)
 * (stride apart) times 2^ea, both signs, and b = (1 + mb / 2^23) * 2^eb.
 * Inside the domain (no under- or overflow) the result only depends on the
 * significands; the exponents test its edges. */
static uint64_t check_div(uint32_t mb, int ea, int eb, uint64_t stride) {
  const float b = aoq_u2f(((uint32_t)(127 + eb) << 23) | mb), y = 1.0f / b;
  uint64_t n = 0;
  for (uint64_t ma = 0; ma < (1u << 23); ma += stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const float a = aoq_u2f((s << 31) | ((uint32_t)(127 + ea) << 23) | (uint32_t)ma);
      const float want = a / b, got = aoq_div_by(a, b, y);
      if (aoq_f2u(want) != aoq_f2u(got)) {
        if (bad++ < 10) printf("div_by(%a, %a): want %a, got %a\n", a, b, want, got);
      }
      n++;
    }
  }
  return n;
}

/* the GPU's fp16 conversions (aoq_math.h's __CUDA_ARCH__ branches of
 * aoq_f32_to_f16_bits and aoq_f16_round: PTX cvt.rn, IEEE
 * round-to-nearest-even) against the code the CPU kernels and the
 * emulator run, on every float but NaN (both
 * signs; overflow to inf, subnormals, the sign of a zero), the C compiler's
 * _Float16 conversion standing in for the hardware's */
static uint64_t check_f16(uint64_t stride) {
  uint64_t n = 0;
  for (uint64_t a = 0; a <= 0x7f800000u; a += stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const uint32_t u = (uint32_t)a | (s << 31);
      const float x = aoq_u2f(u);
      const _Float16 h = (_Float16)x;
      uint16_t hb;
      memcpy(&hb, &h, sizeof hb);
      if (aoq_f2u(aoq_f16_round(x)) != aoq_f2u((float)h)) report("f16_round", u, (float)h, aoq_f16_round(x));
      if (aoq_f32_to_f16_bits(x) != hb && bad++ < 10)
        printf("f32_to_f16_bits(%08x): want %04x, got %04x\n", u, hb, aoq_f32_to_f16_bits(x));
      n++;
    }
  }
  return n;
}

int main(int argc, char **argv) {
  const uint64_t stride = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
  uint64_t n = 0;
  /* 0 up to 448 (0x43e00000) */
  n += check("fp8_e4m3_round_fast", 0, 0x43e00000u, stride, aoq_fp8_e4m3_round, aoq_fp8_e4m3_round_fast, 0);
  /* zeros (their signs kept), and 2^-126 (0x00800000) up to below 2^110
   * (0x76800000) */
  n += check("bf16_round_fast", 0, 0, 1, aoq_bf16_round, aoq_bf16_round_fast, 1);
  n += check("bf16_round_fast", 0x00800000u, 0x767fffffu, stride, aoq_bf16_round, aoq_bf16_round_fast, 1);
  printf("%llu floats checked, %d mismatches\n", (unsigned long long)n, bad);
  /* argv[2]: the fp16 check's stride (1 where the compiler converts with
   * F16C instructions, seconds; libgcc's soft conversion takes minutes) */
  const uint64_t nh = check_f16(argc > 2 ? strtoull(argv[2], NULL, 10) : stride);
  printf("%llu fp16 conversions checked, %d mismatches\n", (unsigned long long)nh, bad);
  /* aoq_div_by: b's significand at the ends of [1, 2) and spread over it
   * (an LCG), every a; its domain's corners (b in [2^23, 2^24) and [2^-24,
   * 2^-23), a in [2^-96, 2^-95) and [2^95, 2^96): quotients down to 2^-120,
   * up to 2^120) */
  uint64_t nd = 0;
  uint32_t r = 12345u;
  for (int i = 0; i < 40; i++) {
    r = r * 1664525u + 1013904223u;
    const uint32_t mb = i == 0 ? 0u : i == 1 ? 1u : i == 2 ? 0x7fffffu : i == 3 ? 0x7ffffeu : i == 4 ? 0x400000u
                        : i < 12 ? 0x7fffffu - (r >> 22) : r >> 9;
    nd += check_div(mb, 0, 0, stride);
    if (i < 6) {
      nd += check_div(mb, -96, 23, stride) + check_div(mb, 95, -24, stride);
      nd += check_div(mb, -96, -24, stride) + check_div(mb, 95, 23, stride);
    }
  }
  /* the zeros keep their sign */
  for (int s = 0; s < 2; s++) {
    const float a = s ? -0.0f : 0.0f, b = 0.1f;
    if (aoq_f2u(aoq_div_by(a, b, 1.0f / b)) != aoq_f2u(a / b)) {
      if (bad++ < 10) printf("div_by(%a, %a): the zero's sign\n", a, b);
    }
    nd++;
  }
  printf("%llu divisions checked, %d mismatches\n", (unsigned long long)nd, bad);
  return bad != 0;
}
