/* Every float of each fast path's domain against the general function
 * (csrc/kernels/aoq_math.h).  Run by tests/test_cuda_emu.py; argv[1] is a
 * stride over the bit patterns (1: all of them, a few seconds).  Prints one
 * line per mismatch (at most 10) and exits 1 if there was any. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/aoq_math.h"

static int bad = 0;

static void report(const char *what, uint32_t u, float want, float got) {
  if (bad++ < 10) printf("%s(%08x): want %08x, got %08x\n", what, u, aoq_f2u(want), aoq_f2u(got));
}

int main(int argc, char **argv) {
  const uint64_t stride = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
  uint64_t n = 0;
  /* both signs, from 0 up to 448 (0x43e00000) */
  for (uint64_t a = 0; a <= 0x43e00000u; a += stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const uint32_t u = (uint32_t)a | (s << 31);
      const float x = aoq_u2f(u);
      float want = aoq_fp8_e4m3_round(x);
      const float got = aoq_fp8_e4m3_round_fast(x);
      if (want == 0.f) want = 0.f; /* the fast path's zero is +0 */
      if (aoq_f2u(want) != aoq_f2u(got)) report("fp8_e4m3_round_fast", u, want, got);
      n++;
    }
  }
  /* zeros, then 2^-126 (0x00800000) up to 2^110 (0x76800000), both signs */
  for (uint64_t a = 0; a < 0x76800000u; a = a == 0 ? 0x00800000u : a + stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const uint32_t u = (uint32_t)a | (s << 31);
      const float x = aoq_u2f(u);
      float want = aoq_bf16_round(x);
      const float got = aoq_bf16_round_fast(x);
      if (want == 0.f) want = 0.f; /* the fast path's zero is +0 */
      if (aoq_f2u(want) != aoq_f2u(got)) report("bf16_round_fast", u, want, got);
      n++;
    }
  }
  printf("%llu floats checked, %d mismatches\n", (unsigned long long)n, bad);
  return bad != 0;
}
