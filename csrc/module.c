/* ao_awq_export._C: a CPython extension module (C API, no pybind11) that, on
 * import, registers the ao_awq:: operators with PyTorch's dispatcher through
 * libtorch's C shim (aoti_torch_library_*), with boxed C kernels for CPU and,
 * when built with CUDA, for CUDA.
 *
 * Boxed calling convention (shim.h): stack[i] holds argument i; a Tensor is
 * an owning AtenTensorHandle (deleted here), int is int64, bool the low
 * byte.  Outputs go to stack[0..num_outputs) as new owning handles.
 *
 * Input rules are checked first in Python (clear ValueError/TypeError); the
 * checks here are a second line that raises RuntimeError, never crashes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <string.h>

#include "aoq_shim.h"
#include "kernels/aoq_kernels.h"
#include "kernels/aoq_math.h"

#define NS "ao_awq"

/* ---------------------------------------------------------------- */
static int64_t arg_int(StableIValue v) {
  int64_t x;
  memcpy(&x, &v, sizeof x);
  return x;
}
static int arg_bool(StableIValue v) { return (int)(v & 0xff) != 0; }
static AtenTensorHandle arg_tensor(StableIValue v) { return (AtenTensorHandle)(uintptr_t)v; }
static StableIValue ret_tensor(AtenTensorHandle t) { return (StableIValue)(uintptr_t)t; }

typedef struct {
  AtenTensorHandle h;
  void *data;
  int64_t dim, numel;
  int64_t *sizes;
  int32_t dtype, dev_type, dev_index;
  int dt; /* AOQ_* code or -1 */
  bool contig;
} tinfo;

static int describe(AtenTensorHandle h, tinfo *t) {
  memset(t, 0, sizeof *t);
  t->h = h;
  if (aoti_torch_get_data_ptr(h, &t->data) || aoti_torch_get_dim(h, &t->dim) ||
      aoti_torch_get_numel(h, &t->numel) || aoti_torch_get_sizes(h, &t->sizes) ||
      aoti_torch_get_dtype(h, &t->dtype) || aoti_torch_get_device_type(h, &t->dev_type) ||
      aoti_torch_get_device_index(h, &t->dev_index) || aoti_torch_is_contiguous(h, &t->contig))
    return -1;
  if (t->dtype == aoti_torch_dtype_float32())
    t->dt = AOQ_F32;
  else if (t->dtype == aoti_torch_dtype_float16())
    t->dt = AOQ_F16;
  else if (t->dtype == aoti_torch_dtype_bfloat16())
    t->dt = AOQ_BF16;
  else
    t->dt = -1;
  return 0;
}

/* Raise (a C++ exception thrown by libtorch through these -fexceptions C
 * frames) after releasing the handles we own. */
static void fail(const char *op, const char *msg, AtenTensorHandle *own, int n) {
  for (int i = 0; i < n; i++)
    if (own[i]) aoti_torch_delete_tensor_object(own[i]);
  char buf[512];
  snprintf(buf, sizeof buf, "ao_awq::%s: %s", op, msg);
  aoti_torch_check(false, op, __FILE__, __LINE__, buf);
}

/* Raise for a kernel's non-zero return code, saying why. */
static void fail_rc(const char *op, int rc, AtenTensorHandle *own, int n) {
  char msg[400];
  if (rc == AOQ_ERR_CUDA) {
#ifdef AOQ_WITH_CUDA
    snprintf(msg, sizeof msg, "CUDA kernel failed: %s", aoq_cuda_last_error());
#else
    snprintf(msg, sizeof msg, "a CUDA tensor was given but this build of ao_awq_export has no "
                              "CUDA kernels (rebuild with nvcc and a CUDA torch, AOQ_CUDA=1)");
#endif
  } else if (rc == AOQ_ERR_STREAM) {
    snprintf(msg, sizeof msg,
             "could not get PyTorch's current CUDA stream for the tensor's device");
  } else if (rc == AOQ_ERR_NOMEM) {
    snprintf(msg, sizeof msg, "kernel failed: out of memory for its scratch buffer");
  } else {
    snprintf(msg, sizeof msg, "kernel failed: invalid sizes or arguments (code %d)", rc);
  }
  fail(op, msg, own, n);
}

static AtenTensorHandle new_tensor(int64_t ndim, const int64_t *sizes, int32_t dtype,
                                   const tinfo *like) {
  int64_t strides[8];
  int64_t s = 1;
  for (int64_t i = ndim - 1; i >= 0; i--) {
    strides[i] = s;
    s *= sizes[i] > 0 ? sizes[i] : 1;
  }
  AtenTensorHandle out = NULL;
  if (aoti_torch_empty_strided(ndim, sizes, strides, dtype, like->dev_type, like->dev_index, &out))
    return NULL;
  return out;
}

static void *data_of(AtenTensorHandle h) {
  void *p = NULL;
  aoti_torch_get_data_ptr(h, &p);
  return p;
}

static int is_cuda(const tinfo *t) { return t->dev_type == aoti_torch_device_type_cuda(); }

#ifdef AOQ_WITH_CUDA
/* PyTorch's current stream on t's device.  Failing to get it is an error:
 * launching on the legacy stream instead would race with torch's own work. */
static int stream_of(const tinfo *t, void **s) {
  *s = NULL;
  return aoti_torch_get_current_cuda_stream(t->dev_index, s) ? AOQ_ERR_STREAM : AOQ_OK;
}
#endif

/* torchao mode follows torch's scalar-division semantics of the device the
 * tensor is on; div_mode >= 0 overrides (tests emulate CUDA on the CPU). */
static int div_semantics(const tinfo *t, int awq, int64_t div_mode) {
  if (awq) return 0;
  if (div_mode >= 0) return (int)(div_mode != 0);
  return is_cuda(t);
}

static const char *check_weight(const tinfo *w, int64_t g) {
  if (w->dt < 0) return "w must be bfloat16, float16 or float32";
  if (w->dim != 2) return "w must be 2-D [N, K]";
  if (!w->contig) return "w must be contiguous";
  if (w->numel == 0) return "w must not be empty";
  if (g != 32 && g != 64 && g != 128 && g != 256) return "group_size must be 32, 64, 128 or 256";
  if (w->sizes[1] % g) return "K (w.shape[1]) must be a multiple of group_size";
  return NULL;
}

/* ---------------------------------------------------------------- */
/* fq_weight(Tensor w, int group_size, int scheme, bool awq, bool pure_ste, int div_mode)
 * pure_ste only matters to the autograd formula (registered in Python). */
static void k_fq_weight(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[2] = {arg_tensor(stack[0]), NULL};
  int64_t g = arg_int(stack[1]), scheme = arg_int(stack[2]);
  int awq = arg_bool(stack[3]);
  int64_t div_mode = arg_int(stack[5]);
  tinfo w;
  if (describe(own[0], &w)) fail("fq_weight", "cannot read tensor w", own, 1);
  const char *why = check_weight(&w, g);
  if (why) fail("fq_weight", why, own, 1);
  if (scheme != AOQ_SCHEME_FP8_INT4 && scheme != AOQ_SCHEME_INT4_ASYM)
    fail("fq_weight", "unknown scheme", own, 1);
  own[1] = new_tensor(2, w.sizes, w.dtype, &w);
  if (!own[1]) fail("fq_weight", "allocation failed", own, 1);
  int cs = div_semantics(&w, awq, div_mode), rc;
  if (is_cuda(&w)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&w, &stream);
    if (!rc)
      rc = aoq_cuda_fq_fwd(w.data, data_of(own[1]), NULL, NULL, NULL, w.sizes[0], w.sizes[1], g,
                           w.dt, (int)scheme, awq, cs, w.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_fq_fwd(w.data, data_of(own[1]), NULL, NULL, NULL, w.sizes[0], w.sizes[1], g, w.dt,
                        (int)scheme, awq, cs);
  }
  if (rc) fail_rc("fq_weight", rc, own, 2);
  aoti_torch_delete_tensor_object(own[0]);
  stack[0] = ret_tensor(own[1]);
}

/* fq_weight_backward(Tensor grad, Tensor w, int group_size, int scheme, bool awq,
 *                    bool clamp_strict, int div_mode) */
static void k_fq_weight_backward(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[3] = {arg_tensor(stack[0]), arg_tensor(stack[1]), NULL};
  int64_t g = arg_int(stack[2]), scheme = arg_int(stack[3]);
  int awq = arg_bool(stack[4]), st = arg_bool(stack[5]);
  int64_t div_mode = arg_int(stack[6]);
  tinfo gr, w;
  if (describe(own[0], &gr) || describe(own[1], &w))
    fail("fq_weight_backward", "cannot read tensors", own, 2);
  const char *why = check_weight(&w, g);
  if (why) fail("fq_weight_backward", why, own, 2);
  if (scheme != AOQ_SCHEME_FP8_INT4 && scheme != AOQ_SCHEME_INT4_ASYM)
    fail("fq_weight_backward", "unknown scheme", own, 2);
  if (gr.dtype != w.dtype || gr.dim != 2 || gr.sizes[0] != w.sizes[0] ||
      gr.sizes[1] != w.sizes[1] || !gr.contig || gr.dev_type != w.dev_type ||
      gr.dev_index != w.dev_index)
    fail("fq_weight_backward", "grad must be a contiguous tensor like w", own, 2);
  own[2] = new_tensor(2, w.sizes, w.dtype, &w);
  if (!own[2]) fail("fq_weight_backward", "allocation failed", own, 2);
  int cs = div_semantics(&w, awq, div_mode), rc;
  if (is_cuda(&w)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&w, &stream);
    if (!rc)
      rc = aoq_cuda_fq_bwd(gr.data, w.data, data_of(own[2]), w.sizes[0], w.sizes[1], g, w.dt,
                           (int)scheme, awq, cs, st, w.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_fq_bwd(gr.data, w.data, data_of(own[2]), w.sizes[0], w.sizes[1], g, w.dt,
                        (int)scheme, awq, cs, st);
  }
  if (rc) fail_rc("fq_weight_backward", rc, own, 3);
  aoti_torch_delete_tensor_object(own[0]);
  aoti_torch_delete_tensor_object(own[1]);
  stack[0] = ret_tensor(own[2]);
}

/* quantize(Tensor w, int group_size, int scheme, bool awq, int div_mode)
 *   -> (Tensor codes_u8 [N,K], Tensor scales_f32 [N,K/g], Tensor zeros_f32 [N,K/g]) */
static void k_quantize(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[4] = {arg_tensor(stack[0]), NULL, NULL, NULL};
  int64_t g = arg_int(stack[1]), scheme = arg_int(stack[2]);
  int awq = arg_bool(stack[3]);
  int64_t div_mode = arg_int(stack[4]);
  tinfo w;
  if (describe(own[0], &w)) fail("quantize", "cannot read tensor w", own, 1);
  const char *why = check_weight(&w, g);
  if (why) fail("quantize", why, own, 1);
  if (scheme != AOQ_SCHEME_FP8_INT4 && scheme != AOQ_SCHEME_INT4_ASYM)
    fail("quantize", "unknown scheme", own, 1);
  int64_t qs[2] = {w.sizes[0], w.sizes[1] / g};
  own[1] = new_tensor(2, w.sizes, aoti_torch_dtype_uint8(), &w);
  own[2] = new_tensor(2, qs, aoti_torch_dtype_float32(), &w);
  own[3] = new_tensor(2, qs, aoti_torch_dtype_float32(), &w);
  if (!own[1] || !own[2] || !own[3]) fail("quantize", "allocation failed", own, 4);
  int cs = div_semantics(&w, awq, div_mode), rc;
  if (is_cuda(&w)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&w, &stream);
    if (!rc)
      rc = aoq_cuda_fq_fwd(w.data, NULL, (uint8_t *)data_of(own[1]), (float *)data_of(own[2]),
                           (float *)data_of(own[3]), w.sizes[0], w.sizes[1], g, w.dt, (int)scheme,
                           awq, cs, w.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_fq_fwd(w.data, NULL, (uint8_t *)data_of(own[1]), (float *)data_of(own[2]),
                        (float *)data_of(own[3]), w.sizes[0], w.sizes[1], g, w.dt, (int)scheme,
                        awq, cs);
  }
  if (rc) fail_rc("quantize", rc, own, 4);
  aoti_torch_delete_tensor_object(own[0]);
  stack[0] = ret_tensor(own[1]);
  stack[1] = ret_tensor(own[2]);
  stack[2] = ret_tensor(own[3]);
}

static const char *check_rows(const tinfo *x) {
  if (x->dt < 0) return "x must be bfloat16, float16 or float32";
  if (x->dim < 1 || x->dim > 8) return "x must have 1 to 8 dimensions";
  if (!x->contig) return "x must be contiguous";
  if (x->numel == 0) return "x must not be empty";
  return NULL;
}

/* fp8_rows(Tensor x, bool pure_ste, int div_mode) -> Tensor */
static void k_fp8_rows(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[2] = {arg_tensor(stack[0]), NULL};
  int64_t div_mode = arg_int(stack[2]);
  tinfo x;
  if (describe(own[0], &x)) fail("fp8_rows", "cannot read tensor x", own, 1);
  const char *why = check_rows(&x);
  if (why) fail("fp8_rows", why, own, 1);
  int64_t K = x.sizes[x.dim - 1], R = x.numel / K;
  own[1] = new_tensor(x.dim, x.sizes, x.dtype, &x);
  if (!own[1]) fail("fp8_rows", "allocation failed", own, 1);
  int cs = div_semantics(&x, 0, div_mode), rc;
  if (is_cuda(&x)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&x, &stream);
    if (!rc)
      rc = aoq_cuda_fp8_rows_fwd(x.data, data_of(own[1]), R, K, x.dt, cs, x.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_fp8_rows_fwd(x.data, data_of(own[1]), R, K, x.dt, cs);
  }
  if (rc) fail_rc("fp8_rows", rc, own, 2);
  aoti_torch_delete_tensor_object(own[0]);
  stack[0] = ret_tensor(own[1]);
}

/* fp8_rows_backward(Tensor grad, Tensor x, bool clamp_strict, int div_mode) -> Tensor */
static void k_fp8_rows_backward(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[3] = {arg_tensor(stack[0]), arg_tensor(stack[1]), NULL};
  int st = arg_bool(stack[2]);
  int64_t div_mode = arg_int(stack[3]);
  tinfo gr, x;
  if (describe(own[0], &gr) || describe(own[1], &x))
    fail("fp8_rows_backward", "cannot read tensors", own, 2);
  const char *why = check_rows(&x);
  if (why) fail("fp8_rows_backward", why, own, 2);
  int same = gr.dtype == x.dtype && gr.dim == x.dim && gr.contig && gr.dev_type == x.dev_type &&
             gr.dev_index == x.dev_index;
  for (int64_t i = 0; same && i < x.dim; i++) same = gr.sizes[i] == x.sizes[i];
  if (!same) fail("fp8_rows_backward", "grad must be a contiguous tensor like x", own, 2);
  int64_t K = x.sizes[x.dim - 1], R = x.numel / K;
  own[2] = new_tensor(x.dim, x.sizes, x.dtype, &x);
  if (!own[2]) fail("fp8_rows_backward", "allocation failed", own, 2);
  int cs = div_semantics(&x, 0, div_mode), rc;
  if (is_cuda(&x)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&x, &stream);
    if (!rc)
      rc = aoq_cuda_fp8_rows_bwd(gr.data, x.data, data_of(own[2]), R, K, x.dt, cs, st,
                                 x.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_fp8_rows_bwd(gr.data, x.data, data_of(own[2]), R, K, x.dt, cs, st);
  }
  if (rc) fail_rc("fp8_rows_backward", rc, own, 3);
  aoti_torch_delete_tensor_object(own[0]);
  aoti_torch_delete_tensor_object(own[1]);
  stack[0] = ret_tensor(own[2]);
}

/* pack_awq(Tensor codes_u8 [R, C]) -> Tensor int32 [C, R/8] */
static void k_pack_awq(StableIValue *stack, uint64_t na, uint64_t no) {
  (void)na;
  (void)no;
  AtenTensorHandle own[2] = {arg_tensor(stack[0]), NULL};
  tinfo c;
  if (describe(own[0], &c)) fail("pack_awq", "cannot read tensor codes", own, 1);
  if (c.dtype != aoti_torch_dtype_uint8()) fail("pack_awq", "codes must be uint8", own, 1);
  if (c.dim != 2 || !c.contig) fail("pack_awq", "codes must be a contiguous 2-D tensor", own, 1);
  if (c.sizes[0] % 8) fail("pack_awq", "codes.shape[0] (N) must be a multiple of 8", own, 1);
  int64_t os[2] = {c.sizes[1], c.sizes[0] / 8};
  own[1] = new_tensor(2, os, aoti_torch_dtype_int32(), &c);
  if (!own[1]) fail("pack_awq", "allocation failed", own, 1);
  int rc;
  if (is_cuda(&c)) {
#ifdef AOQ_WITH_CUDA
    void *stream = NULL;
    rc = stream_of(&c, &stream);
    if (!rc)
      rc = aoq_cuda_pack_awq((const uint8_t *)c.data, (int32_t *)data_of(own[1]), c.sizes[0],
                             c.sizes[1], c.dev_index, stream);
#else
    rc = AOQ_ERR_CUDA;
#endif
  } else {
    rc = aoq_cpu_pack_awq((const uint8_t *)c.data, (int32_t *)data_of(own[1]), c.sizes[0],
                          c.sizes[1]);
  }
  if (rc) fail_rc("pack_awq", rc, own, 2);
  aoti_torch_delete_tensor_object(own[0]);
  stack[0] = ret_tensor(own[1]);
}

/* ---------------------------------------------------------------- */
static const char *SCHEMAS[] = {
    "fq_weight(Tensor w, int group_size, int scheme, bool awq, bool pure_ste=False, "
    "int div_mode=-1) -> Tensor",
    "fq_weight_backward(Tensor grad, Tensor w, int group_size, int scheme, bool awq, "
    "bool clamp_strict=False, int div_mode=-1) -> Tensor",
    "quantize(Tensor w, int group_size, int scheme, bool awq, int div_mode=-1) "
    "-> (Tensor, Tensor, Tensor)",
    "fp8_rows(Tensor x, bool pure_ste=False, int div_mode=-1) -> Tensor",
    "fp8_rows_backward(Tensor grad, Tensor x, bool clamp_strict=False, int div_mode=-1) -> Tensor",
    "pack_awq(Tensor codes) -> Tensor",
};
static const struct {
  const char *name;
  void (*fn)(StableIValue *, uint64_t, uint64_t);
} IMPLS[] = {
    {"fq_weight", k_fq_weight},
    {"fq_weight_backward", k_fq_weight_backward},
    {"quantize", k_quantize},
    {"fp8_rows", k_fp8_rows},
    {"fp8_rows_backward", k_fp8_rows_backward},
    {"pack_awq", k_pack_awq},
};

/* Library handles live for the whole process: deleting one unregisters. */
static TorchLibraryHandle lib_def, lib_cpu, lib_cuda;

static int register_ops_once(void);

static int register_ops(void) {
  static int done = 0;
  if (done) return 0;
  if (register_ops_once()) {
    /* leave no half-registered state that a retried import would take as done
     * (the handles are leaked on purpose: deleting may unregister) */
    lib_def = lib_cpu = lib_cuda = NULL;
    return -1;
  }
  done = 1;
  return 0;
}

static int register_ops_once(void) {
  if (aoti_torch_library_init_fragment(NS, __FILE__, __LINE__, &lib_def)) return -1;
  for (size_t i = 0; i < sizeof SCHEMAS / sizeof *SCHEMAS; i++)
    if (aoti_torch_library_def(lib_def, SCHEMAS[i])) return -1;
  if (aoti_torch_library_init_impl(NS, "CPU", __FILE__, __LINE__, &lib_cpu)) return -1;
  for (size_t i = 0; i < sizeof IMPLS / sizeof *IMPLS; i++)
    if (aoti_torch_library_impl(lib_cpu, IMPLS[i].name, IMPLS[i].fn)) return -1;
#ifdef AOQ_WITH_CUDA
  if (aoti_torch_library_init_impl(NS, "CUDA", __FILE__, __LINE__, &lib_cuda)) return -1;
  for (size_t i = 0; i < sizeof IMPLS / sizeof *IMPLS; i++)
    if (aoti_torch_library_impl(lib_cuda, IMPLS[i].name, IMPLS[i].fn)) return -1;
#else
  (void)lib_cuda;
#endif
  return 0;
}

/* ---------------------------------------------------------------- */
extern PyMethodDef aoq_st_methods[]; /* safetensors writer, st_module.c */

static PyObject *py_built_with_cuda(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
#ifdef AOQ_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

/* cuda_last_stage_bytes() -> int: the shared memory (bytes) the last CUDA
 * fake-quant kernel launched staged its row in (0: unstaged; -1: none yet);
 * None without the CUDA kernels.  For the GPU tests. */
static PyObject *py_cuda_last_stage_bytes(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
#ifdef AOQ_WITH_CUDA
  return PyLong_FromLongLong((long long)aoq_cuda_last_stage_bytes());
#else
  Py_RETURN_NONE;
#endif
}

/* set_torch_sum(vw, half_ok): the running torch's CPU sum order (ops.py probes it) */
static PyObject *py_set_torch_sum(PyObject *self, PyObject *args) {
  (void)self;
  int vw, half_ok;
  if (!PyArg_ParseTuple(args, "ip:set_torch_sum", &vw, &half_ok)) return NULL;
  if (aoq_cpu_set_torch_sum(vw, half_ok) != AOQ_OK) {
    PyErr_Format(PyExc_ValueError, "set_torch_sum: vw must be 0 or a power of two in 4..32, got %d", vw);
    return NULL;
  }
  Py_RETURN_NONE;
}

/* torch_sum(buffer of float32, vw, half) -> float: one sum in torch's CPU order */
static PyObject *py_torch_sum(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer buf;
  int vw, half;
  if (!PyArg_ParseTuple(args, "y*ip:torch_sum", &buf, &vw, &half)) return NULL;
  PyObject *res = NULL;
  if (vw < 4 || vw > 32 || (vw & (vw - 1)))
    PyErr_SetString(PyExc_ValueError, "torch_sum: vw must be a power of two in 4..32");
  else if (buf.len % (Py_ssize_t)sizeof(float))
    PyErr_SetString(PyExc_ValueError, "torch_sum: the buffer must hold float32 values");
  else if ((uintptr_t)buf.buf % _Alignof(float))
    PyErr_SetString(PyExc_ValueError, "torch_sum: the buffer must be 4-byte aligned");
  else
    res = PyFloat_FromDouble((double)aoq_cpu_torch_sum((const float *)buf.buf,
                                                        (int64_t)(buf.len / sizeof(float)), vw, half));
  PyBuffer_Release(&buf);
  return res;
}

static PyMethodDef base_methods[] = {
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "True if the CUDA kernels were built."},
    {"cuda_last_stage_bytes", py_cuda_last_stage_bytes, METH_NOARGS,
     "Shared memory the last CUDA fake-quant kernel staged its row in (tests)."},
    {"set_torch_sum", py_set_torch_sum, METH_VARARGS, "Set the CPU sum order of torchao mode."},
    {"torch_sum", py_torch_sum, METH_VARARGS, "One sum in torch's CPU order (probe)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_C", "ao_awq_export C extension: ops registered on import.", -1,
    base_methods,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject *m = PyModule_Create(&moddef);
  if (!m) return NULL;
  if (PyModule_AddFunctions(m, aoq_st_methods) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  if (register_ops()) {
    Py_DECREF(m);
    PyErr_SetString(PyExc_ImportError, "ao_awq_export: registering ops with torch failed");
    return NULL;
  }
  return m;
}
