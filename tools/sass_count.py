"""Instructions per element of the CUDA forward's hot loop, read off the SASS
(no GPU needed): a proxy for speed where the kernel is bound by instruction
issue rather than memory.  Compiles csrc/kernels/fq_cuda.cu (or the version at
--rev) for sm_90 in variants fixed at compile time: the fake-quant launch
(out only: no codes, scales or zeros), CUDA division semantics (cs = 1), and
each of the fast and general paths alone (the fast one without the branch
that divides: fp8 rows whose scale has few significant bits, 1 in 16, and
lanes near e4m3 midpoints); then counts the instructions of one
forward step (a lane's 32 bytes of a group: load, quantize, store) compiled
into a kernel of its own, minus the division slow-path calls, per element.
Sources before the forward's own layout (--rev of an older commit): the
kernel's main loop (the longest backward branch), per element of one
iteration (AOQ_U groups of E = g / 32 per thread).  By class:

  alu   integer, logic, compare, select, min/max (16 lanes/SMSP/clock on
        sm_80/sm_90: half the rate of fp32 math)
  fma   fp32 add/mul/fma, IMAD (32 lanes/clock)
  xu    MUFU (reciprocal), FRND, F2I/I2F conversions (a quarter rate)
  other loads, stores, shuffles, branches, moves

Needs nvcc and cuobjdump + nvdisasm on PATH (pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm: they land under
site-packages/nvidia/cu13/bin).

    python tools/sass_count.py [--rev GITREV] [--dtype 2] [--e 4]
    python tools/sass_count.py --backward [--dtype 2] [--e 4]   (seconds)
    python tools/sass_count.py --rows [--dtype 2]               (the fp8 activation rows)
"""
import argparse
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALU = {"FSETP", "FSEL", "FMNMX", "LOP3", "ISETP", "SHF", "IADD3", "SEL", "PRMT", "VIMNMX", "IMNMX", "PLOP3",
       "FCHK", "LEA", "P2R", "R2P", "BMSK", "SGXT", "LOP", "IABS", "VIADD"}
FMA = {"FFMA", "FMUL", "FADD", "IMAD", "HADD2", "HFMA2", "HMUL2"}
XU = {"MUFU", "FRND", "F2I", "I2F", "F2F", "F2FP"}
VARIANTS = [("fp8_int4", "torchao", 0, 0), ("fp8_int4", "awq", 0, 1), ("int4_asym", "torchao", 1, 0),
            ("int4_asym", "awq", 1, 1)]


def find_tool(name):
    for d in os.environ.get("PATH", "").split(os.pathsep) + [
            os.path.join(p, "nvidia", "cu13", "bin") for p in sys.path if p.endswith("site-packages")]:
        if os.path.exists(os.path.join(d, name)):
            return d
    raise SystemExit(f"{name} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def variant_source(src, path):
    """The source with the fake-quant outputs, cs = 1 and one path fixed."""
    fast = path == "fast"
    subs = [("if (codes) {", "if (false) {"), ("if (scales)", "if (false)"), ("if (zeros)", "if (false)")]
    if "bool fast = false;" in src:  # the kernels with fast paths
        subs += [("if (out) {", "if (true) {"), ("  bool fast = false;\n", "  bool fast = false;\n  cs = 1;\n"),
                 ("if (fast && aoq_isfinite(p.rcp) && aoq_isfinite(p.sdq)) {", f"if ({str(fast).lower()}) {{"),
                 ("  if (fast) {\n", f"  if ({str(fast).lower()}) {{\n"),
                 # the division branch (fp8 rows that divide, or rare lanes near e4m3
                 # midpoints) left out, the check that decides it kept (a select in
                 # place of the branch uses it: ptxas drops a value only an empty asm reads)
                 ("  if (near) {  // rare in a reciprocal row",
                  "  if (near) t8[0] = 0.f;\n  if (false) {  // rare in a reciprocal row")]
        if subs[-1][0] not in src:  # before fp8_rt_fast (2026-12-03): inside fp8_group
            subs[-1] = ("    if (near) {", "    if (near) t8[0] = 0.f;\n    if (false) {")
    elif fast:
        return None
    else:  # before them: scheme and awq were kernel arguments
        subs += [("if (out) store_chunk", "if (true) store_chunk"),
                 ("  const int g = 32 * E;\n  const int64_t n = blockIdx.x, base = n * K, G = K / g;\n"
                  "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n  float s_row = 0.f;",
                  "  const int g = 32 * E;\n  const int64_t n = blockIdx.x, base = n * K, G = K / g;\n"
                  "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n  float s_row = 0.f;\n"
                  "  scheme = AOQ_M_SCHEME; awq = AOQ_M_AWQ; cs = 1;")]
    for a, b in subs:
        if a not in src:
            raise SystemExit(f"sass_count: the kernel source changed (no {a!r}); update variant_source")
        src = src.replace(a, b)
    if "struct FwdLayout" in src:  # the step kernel, at the end of the kernels' anonymous namespace
        src = src.replace("\n}  // namespace\n", "\n" + STEP_KERNEL + "}  // namespace\n", 1)
    return src


# The fast-path kernels: one forward step (one lane's 32 bytes of a group) in a
# kernel of its own, since the main loop comes in versions (full and tail
# steps) whose code a static count cannot tell apart.
STEP_KERNEL = """
template <int DT, int E, int SCHEME, int AWQ>
__global__ void aoq_measure_step(const void *__restrict__ w, void *__restrict__ out, float s_row, float r_row,
                                 int cs) {
  typedef FwdLayout<DT, E> L;
  constexpr bool FP8 = SCHEME == AOQ_SCHEME_FP8_INT4;
  const int64_t idx = (int64_t)(blockIdx.x * blockDim.x + threadIdx.x) * L::EL;
  float v[L::EL], y[L::EL], qf[L::EL], sc, zr;
  load_chunk<DT, L::EL, true>(w, idx, v);
  bool fg;
  if (FP8)
    fg = fp8_group<DT, L::EL, L::LPG, AWQ>(v, s_row, r_row, true, y, qf, &sc);
  else
    fg = asym_group<DT, L::EL, L::LPG, AWQ>(v, cs, true, y, qf, &sc, &zr);
  if (fg)
    store_chunk_fast<DT, L::EL, true, FP8>(out, idx, y);
  else
    store_chunk<DT, L::EL, true>(out, idx, y);
}
AOQ_M_INSTANTIATE
"""


# The backward: one group of each kernel's body (a lane's share: int4 asym
# AB_C chunks of E, fp8-int4 AOQ_FP8_BWD_C(E) chunks of E) in a kernel of its own, on the
# fast and on the general path (the fp8 fast tail with `each` in range).
BWD_KERNELS = """
template <int DT, int E, bool FAST>
__global__ void aoq_measure_asym_bwd(const void *__restrict__ grad, const void *__restrict__ w,
                                     void *__restrict__ gw, int cs, int st) {
  const int64_t idx = (int64_t)(blockIdx.x * blockDim.x + threadIdx.x) * E;
  float x[AB_C][E], Gv[AB_C][E], gx[AB_C][E];
  for (int k = 0; k < AB_C; k++) {
    load_chunk<DT, E, true>(w, idx + k * 8 * E, x[k]);
    load_chunk<DT, E, true>(grad, idx + k * 8 * E, Gv[k]);
  }
  float mx = x[0][0], mn = x[0][0];
  aoq_asym_group p;
  bool ok = true;
  if (FAST) {  // as asym_bwd_kernel: fminf / fmaxf and the lane check (its vote kept by a select)
    BwdLaneCheck<-40, -70, 70, 60> chk;
    for (int k = 0; k < AB_C; k++)
      for (int e = 0; e < E; e++) {
        mx = fmaxf(mx, x[k][e]);
        mn = fminf(mn, x[k][e]);
        chk.add(x[k][e], Gv[k][e]);
      }
    p = aoq_asym_group_from_minmax(warp_max_fast<8>(mx), warp_min_fast<8>(mn), AOQ_M_AWQ, cs);
    ok = __all_sync(FULL, chk.ok() && (AOQ_M_AWQ ? p.s16 : p.s) <= 0x1p24f);
  } else {
    for (int k = 0; k < AB_C; k++)
      for (int e = 0; e < E; e++) {
        mx = nanmax(mx, x[k][e]);
        mn = nanmin(mn, x[k][e]);
      }
    p = aoq_asym_group_from_minmax(warp_max<8>(mx), warp_min<8>(mn), AOQ_M_AWQ, cs);
  }
  asym_bwd_group<E, FAST>(x, Gv, p, AOQ_M_AWQ, cs, st, InRange<true>(0.f, 15.f, st), gx);
  if (!ok) gx[0][0] = 0.f;
  for (int k = 0; k < AB_C; k++) store_chunk<DT, E, true>(gw, idx + k * 8 * E, gx[k]);
}
template <int DT, int E, bool FAST>
__global__ void aoq_measure_fp8_bwd(const void *__restrict__ grad, const void *__restrict__ w,
                                    void *__restrict__ gw, float s_row, float y_row, float a0, int st,
                                    float *acc) {
  constexpr int C = AOQ_FP8_BWD_C(E), W = 32 / C;
  const int64_t idx = (int64_t)(blockIdx.x * blockDim.x + threadIdx.x) * E;
  float x[C][E], Gv[C][E], gx[C][E], t[C][E], f8[C][E], wd[C][E];
  for (int k = 0; k < C; k++) {
    load_chunk<DT, E, true>(w, idx + k * W * E, x[k]);
    load_chunk<DT, E, true>(grad, idx + k * W * E, Gv[k]);
  }
  bool ok = true;
  if (FAST) {  // the lane check (its vote kept by a select)
    BwdLaneCheck<-40, -60, 40> chk;
    for (int k = 0; k < C; k++)
      for (int e = 0; e < E; e++) chk.add(x[k][e], Gv[k][e]);
    ok = __all_sync(FULL, chk.ok());
  }
  const float m = FAST ? warp_max_fast<W>(fp8_bwd_first<DT, C, E, true>(x, s_row, y_row, t, f8, wd))
                       : warp_max<W>(fp8_bwd_first<DT, C, E, false>(x, s_row, y_row, t, f8, wd));
  const aoq_sym_group p = aoq_sym_group_from_max(m, DT, AOQ_M_AWQ);
  float acc_a[C] = {}, acc_b[C] = {};
  int cnt_row = 0;
  const InRange<true> in_q(-8.f, 7.f, st);
  const InRange<false> in_t(-AOQ_FP8_MAX, AOQ_FP8_MAX, st);
  fp8_bwd_rest<DT, C, E, FAST>(x, Gv, t, f8, wd, p, s_row, y_row, a0, AOQ_M_AWQ, st, in_q, in_t, true, gx, acc_a,
                               acc_b, cnt_row);
  for (int k = 0; k < C; k++) {
    if (FAST)  // (a fast group's gx is rounded in its tail)
      store_chunk_fast<DT, E, true, true>(gw, idx + k * W * E, gx[k]);
    else
      store_chunk<DT, E, true>(gw, idx + k * W * E, gx[k]);
  }
  float r = cnt_row;
  for (int k = 0; k < C; k++) r += acc_a[k] + acc_b[k];
  acc[threadIdx.x] = ok ? r : 0.f;
}
"""


def functions(sass):
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip()
            out[cur] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if cur and m:
            out[cur].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def loop_counts(ins, whole=False):
    """Opcode counts of the longest loop (whole: of the whole kernel, up to its
    first EXIT), without the division slow-path calls."""
    if whole:
        end = next(a for a, i in ins if i.startswith("EXIT"))
        body = [(a, i) for a, i in ins if a < end]
    else:
        back = [(int(m.group(1), 16), a) for a, i in ins
                for m in [re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)$", i)] if m and "BRA.DIV" not in i]
        lo, hi = max(((t, a) for t, a in back if t <= a), key=lambda x: x[1] - x[0])
        body = [(a, i) for a, i in ins if lo <= a <= hi]
    skip = set()
    for k, (a, i) in enumerate(body):
        if "CALL.REL" in i:  # the call and its argument moves, after the branch around them
            j = k
            while j > 0 and "BRA" not in body[j - 1][1]:
                j -= 1
            skip.update(x[0] for x in body[j:k + 1])
            if k + 1 < len(body) and body[k + 1][1].startswith("IMAD.MOV"):
                skip.add(body[k + 1][0])
    ops = collections.Counter()
    for a, i in body:
        if a not in skip:
            ops[re.split(r"[ .]", i.split(" ", 1)[1] if i.startswith("@") else i)[0]] += 1
    return ops


def counts_row(ops, per):
    n = sum(ops.values())
    alu = sum(c for o, c in ops.items() if o in ALU)
    fma = sum(c for o, c in ops.items() if o in FMA)
    xu = sum(c for o, c in ops.items() if o in XU)
    return f"{n / per:.1f} | {alu / per:.1f} | {fma / per:.1f} | {xu / per:.1f} | {(n - alu - fma - xu) / per:.1f} |"


def backward(src, args, nvcc, env):
    """Instructions per element of one group of each backward kernel's body,
    fast and general paths (the working tree only)."""
    if "fp8_bwd_rest" not in src:
        raise SystemExit("sass_count --backward: no backward group functions in this fq_cuda.cu")
    body = src[:src.index("}  // namespace\n")]
    # the fp8 fast path measured with its tail's fast roundings (`each` in range)
    fin = "if (FAST && (ae == 0.f || (ae >= 0x1p-100f && ae <= 0x1p100f)))"
    if fin not in body:
        raise SystemExit(f"sass_count: the kernel source changed (no {fin!r}); update backward()")
    body = body.replace(fin, "if (FAST)")
    print(f"# fq_cuda.cu working tree: backward, sm_90, dtype {args.dtype}; instructions per element of one "
          "group's body (a lane's elements: int4 asym 4 chunks of E, fp8-int4 AOQ_FP8_BWD_C(E) chunks of E), per-group "
          "work included")
    print("| variant | E | path | total | alu | fma | xu | other |")
    print("|---|---|---|---|---|---|---|---|")
    es = [int(e) for e in args.e.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, awq in (("torchao", 0), ("awq", 1)):
            cu = os.path.join(tmp, f"bwd{awq}.cu")
            inst = []
            for e in es:
                for fast in ("true", "false"):
                    inst.append(f"template __global__ void aoq_measure_asym_bwd<{args.dtype}, {e}, {fast}>"
                                "(const void *, const void *, void *, int, int);")
                    inst.append(f"template __global__ void aoq_measure_fp8_bwd<{args.dtype}, {e}, {fast}>"
                                "(const void *, const void *, void *, float, float, float, int, float *);")
            with open(cu, "w") as f:
                f.write(body + BWD_KERNELS + "\n".join(inst) + "\n}  // namespace\n")
            cubin = cu + ".cubin"
            r = subprocess.run([nvcc, "-cubin", "-o", cubin, cu, "-O3", "--fmad=false", "-std=c++17",
                                "-DAOQ_WITH_CUDA=1", f"-DAOQ_M_AWQ={awq}", "-I" + os.path.join(ROOT, "csrc"),
                                "-I" + os.path.join(ROOT, "csrc", "kernels"), "-arch=sm_90", "-diag-suppress",
                                "128,177"], env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"nvcc failed on the backward variant {mode}:\n{r.stderr[-3000:]}")
            fns = functions(subprocess.run(["cuobjdump", "-sass", cubin], check=True, capture_output=True,
                                           text=True, env=env).stdout)
            for scheme, kern in (("int4_asym", "aoq_measure_asym_bwd"), ("fp8_int4", "aoq_measure_fp8_bwd")):
                for e in es:
                    chunks = 4 if scheme == "int4_asym" else (2 if e == 8 else 8 if e == 1 else 4)  # (AOQ_FP8_BWD_C)
                    for fast in ("true", "false"):
                        name = next(k for k in fns if f"{kern}<{args.dtype}, {e}, {fast}>" in k)
                        ops = loop_counts(fns[name], whole=True)
                        path = "fast" if fast == "true" else "general"
                        if args.dump:  # the SASS, to read where the instructions go
                            os.makedirs(args.dump, exist_ok=True)
                            with open(os.path.join(args.dump, f"{scheme}_{mode}_e{e}_{path}.sass"), "w") as f:
                                f.write("\n".join(f"/*{a:04x}*/ {i}" for a, i in fns[name]) + "\n")
                        print(f"| {scheme} {mode} | {e} | {path} | {counts_row(ops, chunks * e)}", flush=True)


# The fp8 activation rows (fake_quant_fp8_rows): the forward's step, the
# backward's first pass (fast: with its element checks) and its last step,
# each on one 16-byte chunk (fast or general) in a kernel of its own; per
# element, kernel overhead (indexing, the parameters, the accumulator stores:
# about 15-20 per kernel, the same on both paths) included, spread over the
# chunk's elements.
ROWS_KERNELS = """
template <int DT, bool FAST>
__global__ void aoq_measure_rows_fwd(const void *__restrict__ x, void *__restrict__ out, float s_row,
                                     float r_row) {
  constexpr int V = 16 / (int)sizeof(typename Elt<DT>::T);
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  float v[V];
  load_chunk<DT, V, true>(x, c * V, v);
  if (FAST) {
    float x0[V];
    for (int e = 0; e < V; e++) x0[e] = v[e];
    fp8_rt_fast<DT, V>(v, s_row, r_row);
    for (int e = 0; e < V; e++) v[e] = with_sign_of(v[e], x0[e]);
    store_chunk_fast<DT, V, true, true>(out, c * V, v);
  } else {
    for (int e = 0; e < V; e++) v[e] = aoq_fp8_rt(v[e], s_row, DT);
    store_chunk<DT, V, true>(out, c * V, v);
  }
}
template <int DT, bool FAST>
__global__ void aoq_measure_rows_bwd(const void *__restrict__ x, const void *__restrict__ grad,
                                     void *__restrict__ out, float s_row, float y_row, int st, float *accs) {
  constexpr int V = 16 / (int)sizeof(typename Elt<DT>::T);
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const InRange<false> in_t(-AOQ_FP8_MAX, AOQ_FP8_MAX, st);
  float acc_a = 0.f, acc_b = 0.f, xv[V], gh[V], q[V];
  load_chunk<DT, V, true>(x, c * V, xv);
  load_chunk<DT, V, true>(grad, c * V, gh);
  bool all_fast = true;
  for (int e = 0; e < V; e++) {  // (FAST: the general code of an element off the fast path left out)
    BwdLaneCheck<-40, -60, 40> chk;
    chk.add(xv[e], gh[e]);
    const bool fast = FAST && chk.ok();
    if (FAST)
      q[e] = fast ? round_fast<DT>(rows_bwd_elem<DT, true>(xv[e], gh[e], s_row, y_row, in_t, acc_a, acc_b)) : 0.f;
    else
      q[e] = rows_bwd_elem<DT, false>(xv[e], gh[e], s_row, y_row, in_t, acc_a, acc_b);
    all_fast = all_fast && fast;
  }
  if (all_fast)
    store_chunk_fast<DT, V, true, true>(out, c * V, q);
  else
    store_chunk<DT, V, true>(out, c * V, q);
  accs[2 * c] = acc_a;
  accs[2 * c + 1] = acc_b;
}
template <int DT, bool FAST>
__global__ void aoq_measure_rows_fix(const void *__restrict__ x, void *__restrict__ out, float each, float a0) {
  constexpr int V = 16 / (int)sizeof(typename Elt<DT>::T);
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (FAST && DT != AOQ_F32) {  // as words (PackedFix; an extreme's or a NaN's chunk element by element)
    const PackedFix pf = PackedFix::make<DT>(a0, each);
    reinterpret_cast<uint4 *>(out)[c] = pf.fix8<DT>(reinterpret_cast<const uint4 *>(x)[c],
                                                    reinterpret_cast<const uint4 *>(out)[c], each, a0);
    return;
  }
  float ga[V], xv[V];
  load_chunk<DT, V, true>(out, c * V, ga);
  load_chunk<DT, V, true>(x, c * V, xv);
  for (int e = 0; e < V; e++)
    ga[e] = FAST ? row_fix_fast<DT>(ga[e], xv[e], each, a0) : row_fix(ga[e], xv[e], each, a0, DT);
  store_chunk<DT, V, true>(out, c * V, ga);
}
"""


def rows(src, args, nvcc, env):
    """Instructions per element of the fp8 activation rows' kernels (working tree)."""
    if "rows_bwd_elem" not in src:
        raise SystemExit("sass_count --rows: no rows_bwd_elem in this fq_cuda.cu")
    # the rare branches' code left out (a flag still tested): divisions near
    # e4m3 midpoints, the last step's chunks holding an extreme or a NaN
    body = src[:src.index("}  // namespace\n")].replace(
        "  if (near) {  // rare in a reciprocal row", "  if (near) t8[0] = 0.f;\n  if (false) {  // rare in a reciprocal row"
    ).replace("    if (flag & 0x80008000u) {  // an extreme or a NaN: element by element",
              "    if (flag & 0x80008000u) o.x = 0;\n    if (false) {")
    d = args.dtype
    inst = []
    for fast in ("true", "false"):
        inst += [f"template __global__ void aoq_measure_rows_fwd<{d}, {fast}>(const void *, void *, float, float);",
                 f"template __global__ void aoq_measure_rows_bwd<{d}, {fast}>(const void *, const void *, void *, "
                 "float, float, int, float *);",
                 f"template __global__ void aoq_measure_rows_fix<{d}, {fast}>(const void *, void *, float, float);"]
    print(f"# fq_cuda.cu working tree: fp8 activation rows, sm_90, dtype {d}; instructions per element, each part "
          "on a 16-byte chunk in a kernel of its own (its overhead, about 15-20 per kernel, included)")
    print("| part | path | total | alu | fma | xu | other |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "rows.cu")
        with open(cu, "w") as f:
            f.write(body + ROWS_KERNELS + "\n".join(inst) + "\n}  // namespace\n")
        cubin = cu + ".cubin"
        r = subprocess.run([nvcc, "-cubin", "-o", cubin, cu, "-O3", "--fmad=false", "-std=c++17", "-DAOQ_WITH_CUDA=1",
                            "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(ROOT, "csrc", "kernels"),
                            "-arch=sm_90", "-diag-suppress", "128,177"], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"nvcc failed on the rows kernels:\n{r.stderr[-3000:]}")
        fns = functions(subprocess.run(["cuobjdump", "-sass", cubin], check=True, capture_output=True, text=True,
                                       env=env).stdout)
        v = 16 // (4 if d == 0 else 2)
        for part, kern, per in (("forward (a chunk)", "aoq_measure_rows_fwd", v),
                                ("backward, first pass (a chunk)", "aoq_measure_rows_bwd", v),
                                ("backward, last step (a chunk)", "aoq_measure_rows_fix", v)):
            for fast in ("true", "false"):
                name = next(k for k in fns if f"{kern}<{d}, {fast}>" in k)
                ops = loop_counts(fns[name], whole=True)
                print(f"| {part} | {'fast' if fast == 'true' else 'general'} | {counts_row(ops, per)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", help="git revision of fq_cuda.cu to measure (default: the working tree)")
    ap.add_argument("--dtype", type=int, default=2, help="0 fp32, 1 fp16, 2 bf16 (default)")
    ap.add_argument("--paths", default="fast,general", help="fast, general or both (default)")
    ap.add_argument("--e", default="4", help="elements per lane and group, g / 32, comma-separated (default 4: "
                    "g=128)")
    ap.add_argument("--backward", action="store_true", help="the backward kernels' group bodies instead (working "
                    "tree only)")
    ap.add_argument("--dump", help="with --backward: write each kernel's SASS to this folder")
    ap.add_argument("--rows", action="store_true", help="the fp8 activation rows' kernels instead (working tree "
                    "only)")
    args = ap.parse_args()
    nvcc = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
    env = dict(os.environ, PATH=find_tool("cuobjdump") + os.pathsep + os.environ.get("PATH", ""))
    if args.rows:
        if args.rev:
            raise SystemExit("--rows measures the working tree only")
        rows(open(os.path.join(ROOT, "csrc", "kernels", "fq_cuda.cu")).read(), args, nvcc, env)
        return
    if args.backward:
        if args.rev:
            raise SystemExit("--backward measures the working tree only")
        backward(open(os.path.join(ROOT, "csrc", "kernels", "fq_cuda.cu")).read(), args, nvcc, env)
        return
    src = (subprocess.run(["git", "show", f"{args.rev}:csrc/kernels/fq_cuda.cu"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout if args.rev
           else open(os.path.join(ROOT, "csrc", "kernels", "fq_cuda.cu")).read())
    es = [int(e) for e in args.e.split(",")]
    # elements per thread in one iteration of the main loop: AOQ_U groups of E
    # (the chunk layout, before FwdLayout), or AOQ_UF steps of 32 bytes
    layout = "struct FwdLayout" in src
    knob = "AOQ_UF" if layout else "AOQ_U"
    m = re.search(r"#define %s (\d+)" % knob, src)
    unroll = int(m.group(1)) if m else 1  # (before the unroll knobs: one group at a time)
    print(f"# fq_cuda.cu {args.rev or 'working tree'}: forward, sm_90, dtype {args.dtype}; "
          + ("instructions per element of one forward step (32 bytes per lane, in a kernel of its own)"
             if layout else f"instructions per element, one iteration of the main loop ({knob}={unroll}) / "
             "its elements per thread"))
    print("| variant | E | path | total | alu | fma | xu | other |")
    print("|---|---|---|---|---|---|---|---|")
    jobs = [(path, v) for path in args.paths.split(",") if variant_source(src, path) is not None for v in VARIANTS]
    with tempfile.TemporaryDirectory() as tmp:
        inc = os.path.join(ROOT, "csrc")
        if args.rev:  # that revision's headers too
            archive = subprocess.run(["git", "archive", args.rev, "csrc"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            inc = os.path.join(tmp, "csrc")

        def compile_one(job):
            path, (scheme, mode, s, a) = job
            cu = os.path.join(tmp, f"v_{path}_{s}{a}.cu")
            with open(cu, "w") as f:
                f.write(variant_source(src, path).replace("AOQ_M_INSTANTIATE", "\n".join(
                    f"template __global__ void aoq_measure_step<{args.dtype}, {e}, {s}, {a}>"
                    "(const void *, void *, float, float, int);" for e in es)))
            cubin = cu + ".cubin"
            r = subprocess.run([nvcc, "-cubin", "-o", cubin, cu, "-O3", "--fmad=false", "-std=c++17",
                                "-DAOQ_WITH_CUDA=1", f"-DAOQ_M_SCHEME={s}", f"-DAOQ_M_AWQ={a}",
                                "-I" + inc, "-I" + os.path.join(inc, "kernels"),
                                "-arch=sm_90", "-diag-suppress", "128"], env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"nvcc failed on the {path} variant {scheme} {mode}:\n{r.stderr[-3000:]}")
            return subprocess.run(["cuobjdump", "-sass", cubin], check=True, capture_output=True, text=True,
                                  env=env).stdout

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for (path, (scheme, mode, s, a)), sass in zip(jobs, pool.map(compile_one, jobs)):
                fns = functions(sass)
                for e in es:
                    if layout:  # one step of 32 bytes per lane
                        ops = loop_counts(fns[next(k for k in fns if f"aoq_measure_step<{args.dtype}, {e}," in k)],
                                          whole=True)
                        per = 32 // (4 if args.dtype == 0 else 2)
                    else:
                        # the vectorized, unstaged kernel (older ones had no STAGE parameter)
                        cands = [k for k in fns if f"fq_fwd_kernel<{args.dtype}, {e}, true" in k]
                        name = next((k for k in cands if f"<{args.dtype}, {e}, true, false>" in k), cands[0])
                        ops = loop_counts(fns[name])
                        per = unroll * e
                    n = sum(ops.values())
                    alu = sum(c for o, c in ops.items() if o in ALU)
                    fma = sum(c for o, c in ops.items() if o in FMA)
                    xu = sum(c for o, c in ops.items() if o in XU)
                    print(f"| {scheme} {mode} | {e} | {path} | {n / per:.1f} | {alu / per:.1f} | {fma / per:.1f} | "
                          f"{xu / per:.1f} | {(n - alu - fma - xu) / per:.1f} |", flush=True)


if __name__ == "__main__":
    main()
