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

/* every float a, a + stride, ... in [lo, hi] with both signs: fast(x) against
 * general(x), whose zero is taken as +0 (as the fast paths give it) */
static uint64_t check(const char *what, uint64_t lo, uint64_t hi, uint64_t stride, float (*general)(float),
                      float (*fast)(float)) {
  uint64_t n = 0;
  for (uint64_t a = lo; a <= hi; a += stride) {
    for (uint32_t s = 0; s < 2; s++) {
      const uint32_t u = (uint32_t)a | (s << 31);
      const float x = aoq_u2f(u);
      float want = general(x);
      const float got = fast(x);
      if (want == 0.f) want = 0.f;
      if (aoq_f2u(want) != aoq_f2u(got)) report(what, u, want, got);
      n++;
    }
  }
  return n;
}

int main(int argc, char **argv) {
  const uint64_t stride = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
  uint64_t n = 0;
  /* 0 up to 448 (0x43e00000) */
  n += check("fp8_e4m3_round_fast", 0, 0x43e00000u, stride, aoq_fp8_e4m3_round, aoq_fp8_e4m3_round_fast);
  /* zeros, and 2^-126 (0x00800000) up to below 2^110 (0x76800000) */
  n += check("bf16_round_fast", 0, 0, 1, aoq_bf16_round, aoq_bf16_round_fast);
  n += check("bf16_round_fast", 0x00800000u, 0x767fffffu, stride, aoq_bf16_round, aoq_bf16_round_fast);
  printf("%llu floats checked, %d mismatches\n", (unsigned long long)n, bad);
  return bad != 0;
}
