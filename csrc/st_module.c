/* CPython bindings of the streaming safetensors writer (kernels/st_write.c).
 *
 *   h = st_open(path, [(name, dtype, shape), ...], metadata=None, overwrite=False)
 *   st_write(h, index, data, nbytes=-1)   # data: int address (nbytes needed)
 *                                         #       or a C-contiguous buffer
 *   st_close(h) -> file size              # fsync + rename temp -> path
 *   st_abort(h)                           # unlink temp (idempotent)
 *   st_info(h) -> dict                    # layout: header size, slots ...
 *   st_inject_fault(h, after, errno)      # tests: fail after `after` bytes
 *
 * The handle is a capsule; if it is garbage-collected while open, the
 * temporary file is removed.  System-call failures raise OSError (errno,
 * message naming what failed, file name), bad arguments ValueError or
 * TypeError.  The GIL is released while data are written, fsynced and
 * renamed; a handle in use by another thread raises RuntimeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/st_write.h"

#define CAPSULE_NAME "ao_awq_export._C.st_writer"
#define ERRLEN 1024

typedef struct {
  aoq_st_writer *w;
  int busy;
} st_handle;

static void capsule_free(PyObject *cap) {
  st_handle *h = (st_handle *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
  if (!h) {
    PyErr_Clear();
    return;
  }
  if (h->w) aoq_st_abort(h->w);
  free(h);
}

static st_handle *get_handle(PyObject *cap, int need_open) {
  st_handle *h = (st_handle *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
  if (!h) {
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError, "expected a safetensors writer handle from st_open()");
    return NULL;
  }
  if (h->busy) {
    PyErr_SetString(PyExc_RuntimeError, "safetensors writer is in use by another thread");
    return NULL;
  }
  if (need_open && !h->w) {
    PyErr_SetString(PyExc_ValueError, "safetensors writer is already closed or aborted");
    return NULL;
  }
  return h;
}

/* Raises the Python exception for a writer error code. */
static void raise_st(int rc, const char *err, const char *path) {
  PyObject *m = PyUnicode_DecodeUTF8(err, (Py_ssize_t)strlen(err), "replace");
  if (!m) return;
  if (rc > 0) {
    PyObject *full = PyUnicode_FromFormat("%U: %s", m, strerror(rc));
    PyObject *fn = path ? PyUnicode_DecodeFSDefault(path) : (Py_INCREF(Py_None), Py_None);
    if (full && fn) {
      PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iOO", rc, full, fn);
      if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
      }
    }
    Py_XDECREF(full);
    Py_XDECREF(fn);
  } else if (rc == AOQ_ST_ENOMEM) {
    PyErr_SetObject(PyExc_MemoryError, m);
  } else {
    PyErr_SetObject(PyExc_ValueError, m);
  }
  Py_DECREF(m);
}

/* ---------------------------------------------------------------- open */
static PyObject *py_st_open(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *kwlist[] = {"path", "entries", "metadata", "overwrite", NULL};
  PyObject *pathb = NULL, *entries = NULL, *metadata = Py_None;
  int overwrite = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O|Op:st_open", kwlist, PyUnicode_FSConverter,
                                   &pathb, &entries, &metadata, &overwrite))
    return NULL;

  PyObject *result = NULL, *seq = NULL, *mitems = NULL;
  PyObject **keep = NULL;  /* items kept alive while their UTF-8 is used */
  PyObject **shp_t = NULL; /* each entry's shape as a tuple (borrowed from keep) */
  aoq_st_entry *ents = NULL;
  int64_t *shapes = NULL;
  const char **meta = NULL;
  Py_ssize_t n = 0, nmeta = 0, nkeep = 0, total_dims = 0;
  const char *path = PyBytes_AsString(pathb);
  if (!path) goto done;

  seq = PySequence_List(entries);
  if (!seq) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) /* anything else (KeyboardInterrupt...) stays */
      PyErr_SetString(PyExc_TypeError, "entries must be a sequence of (name, dtype, shape)");
    goto done;
  }
  n = PyList_Size(seq);
  ents = calloc(n ? (size_t)n : 1, sizeof *ents);
  keep = calloc(n ? 2 * (size_t)n : 1, sizeof *keep);
  shp_t = calloc(n ? (size_t)n : 1, sizeof *shp_t);
  if (!ents || !keep || !shp_t) {
    PyErr_NoMemory();
    goto done;
  }
  /* first pass: count dims */
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *it = PyList_GetItem(seq, i); /* borrowed */
    if (!PyTuple_Check(it) && !PyList_Check(it)) {
      PyErr_Format(PyExc_TypeError, "entries[%zd] must be a (name, dtype, shape) tuple", i);
      goto done;
    }
    PyObject *t = PySequence_Tuple(it);
    if (!t) goto done;
    keep[nkeep++] = t;
    if (PyTuple_Size(t) != 3) {
      PyErr_Format(PyExc_TypeError, "entries[%zd] must be a (name, dtype, shape) tuple", i);
      goto done;
    }
    /* the shape is copied into a tuple once: both passes read that tuple,
     * so a sequence that changes its length between them cannot matter */
    PyObject *st = PySequence_Tuple(PyTuple_GetItem(t, 2));
    if (!st) {
      if (PyErr_ExceptionMatches(PyExc_TypeError))
        PyErr_Format(PyExc_TypeError, "entries[%zd]: shape must be a sequence of ints", i);
      goto done;
    }
    keep[nkeep++] = st;
    shp_t[i] = st;
    Py_ssize_t nd = PyTuple_Size(st);
    if (nd > AOQ_ST_MAX_DIMS) {
      PyErr_Format(PyExc_ValueError, "entries[%zd]: too many dimensions (%zd)", i, nd);
      goto done;
    }
    total_dims += nd;
  }
  shapes = calloc(total_dims ? (size_t)total_dims : 1, sizeof *shapes);
  if (!shapes) {
    PyErr_NoMemory();
    goto done;
  }
  {
    Py_ssize_t d0 = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
      PyObject *t = keep[2 * i]; /* keep: entry tuple, shape tuple, ... */
      PyObject *name = PyTuple_GetItem(t, 0), *dt = PyTuple_GetItem(t, 1), *shp = shp_t[i];
      if (!PyUnicode_Check(name) || !PyUnicode_Check(dt)) {
        PyErr_Format(PyExc_TypeError, "entries[%zd]: name and dtype must be str", i);
        goto done;
      }
      Py_ssize_t len;
      const char *s = PyUnicode_AsUTF8AndSize(name, &len);
      if (!s) goto done; /* e.g. lone surrogates: UnicodeEncodeError */
      ents[i].name = s;
      ents[i].name_len = (size_t)len;
      ents[i].dtype = PyUnicode_AsUTF8AndSize(dt, &len);
      if (!ents[i].dtype) goto done;
      if ((size_t)len != strlen(ents[i].dtype)) {
        PyErr_Format(PyExc_ValueError, "entries[%zd]: dtype contains a NUL character", i);
        goto done;
      }
      Py_ssize_t nd = PyTuple_Size(shp);
      ents[i].ndim = (int)nd;
      ents[i].shape = shapes + d0;
      for (Py_ssize_t d = 0; d < nd; d++) {
        long long x = PyLong_AsLongLong(PyTuple_GetItem(shp, d)); /* borrowed */
        if (x == -1 && PyErr_Occurred()) {
          if (PyErr_ExceptionMatches(PyExc_OverflowError))
            PyErr_Format(PyExc_ValueError, "entries[%zd]: shape value out of range", i);
          else if (PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_Format(PyExc_TypeError, "entries[%zd]: shape must be a sequence of ints", i);
          goto done;
        }
        shapes[d0 + d] = (int64_t)x;
      }
      d0 += nd;
    }
  }
  if (metadata != Py_None) {
    if (!PyDict_Check(metadata)) {
      PyErr_SetString(PyExc_TypeError, "metadata must be a dict of str -> str or None");
      goto done;
    }
    mitems = PyDict_Items(metadata);
    if (!mitems) goto done;
    nmeta = PyList_Size(mitems);
    meta = calloc(nmeta ? 2 * (size_t)nmeta : 1, sizeof *meta);
    if (!meta) {
      PyErr_NoMemory();
      goto done;
    }
    for (Py_ssize_t i = 0; i < nmeta; i++) {
      PyObject *kv = PyList_GetItem(mitems, i);
      PyObject *k = PyTuple_GetItem(kv, 0), *v = PyTuple_GetItem(kv, 1);
      if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "metadata must be a flat dict of str -> str");
        goto done;
      }
      Py_ssize_t kl, vl;
      meta[2 * i] = PyUnicode_AsUTF8AndSize(k, &kl);
      meta[2 * i + 1] = PyUnicode_AsUTF8AndSize(v, &vl);
      if (!meta[2 * i] || !meta[2 * i + 1]) goto done;
      if ((Py_ssize_t)strlen(meta[2 * i]) != kl || (Py_ssize_t)strlen(meta[2 * i + 1]) != vl) {
        PyErr_SetString(PyExc_ValueError, "metadata strings may not contain NUL characters");
        goto done;
      }
    }
  }

  {
    st_handle *h = calloc(1, sizeof *h);
    if (!h) {
      PyErr_NoMemory();
      goto done;
    }
    char err[ERRLEN] = {0};
    aoq_st_writer *w = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = aoq_st_open(path, ents, (size_t)n, meta, (size_t)nmeta, overwrite, &w, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc) {
      free(h);
      raise_st(rc, err, path);
      goto done;
    }
    h->w = w;
    result = PyCapsule_New(h, CAPSULE_NAME, capsule_free);
    if (!result) {
      aoq_st_abort(w);
      free(h);
    }
  }

done:
  for (Py_ssize_t i = 0; i < nkeep; i++) Py_DECREF(keep[i]);
  free(keep);
  free(shp_t);
  free(ents);
  free(shapes);
  free(meta);
  Py_XDECREF(mitems);
  Py_XDECREF(seq);
  Py_XDECREF(pathb);
  return result;
}

/* ---------------------------------------------------------------- write */
static PyObject *py_st_write(PyObject *self, PyObject *args, PyObject *kw) {
  (void)self;
  static char *kwlist[] = {"handle", "index", "data", "nbytes", NULL};
  PyObject *cap, *data;
  Py_ssize_t index;
  long long nbytes = -1;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|L:st_write", kwlist, &cap, &index, &data,
                                   &nbytes))
    return NULL;
  st_handle *h = get_handle(cap, 1);
  if (!h) return NULL;
  if (index < 0) {
    PyErr_SetString(PyExc_ValueError, "index must be >= 0");
    return NULL;
  }
  const void *ptr = NULL;
  int have_view = 0;
#if !defined(Py_LIMITED_API) || Py_LIMITED_API + 0 >= 0x030B0000
  Py_buffer view;
#endif
  if (PyLong_Check(data)) {
    ptr = PyLong_AsVoidPtr(data);
    if (!ptr && PyErr_Occurred()) return NULL;
    if (nbytes < 0) {
      PyErr_SetString(PyExc_ValueError, "nbytes is required when data is an address");
      return NULL;
    }
  } else {
#if !defined(Py_LIMITED_API) || Py_LIMITED_API + 0 >= 0x030B0000
    if (PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    have_view = 1;
    ptr = view.buf;
    if (nbytes < 0) nbytes = (long long)view.len;
    if (nbytes > (long long)view.len) {
      PyBuffer_Release(&view);
      PyErr_Format(PyExc_ValueError, "nbytes (%lld) exceeds the buffer's %zd bytes", nbytes,
                   view.len);
      return NULL;
    }
#else
    PyErr_SetString(PyExc_TypeError, "data must be an int address");
    return NULL;
#endif
  }
  /* obtaining the buffer may have run Python code (__buffer__, 3.12+) that
   * closed, aborted or is using this writer: look again */
  if (!h->w || h->busy) {
#if !defined(Py_LIMITED_API) || Py_LIMITED_API + 0 >= 0x030B0000
    if (have_view) PyBuffer_Release(&view);
#endif
    PyErr_SetString(PyExc_RuntimeError, h->busy ? "safetensors writer is in use by another "
                                                  "thread"
                                                : "safetensors writer was closed or aborted "
                                                  "while its data buffer was being obtained");
    return NULL;
  }
  char err[ERRLEN] = {0};
  int rc;
  aoq_st_writer *w = h->w;
  h->busy = 1;
  Py_BEGIN_ALLOW_THREADS
  rc = aoq_st_write(w, (size_t)index, ptr, (uint64_t)nbytes, err, sizeof err);
  Py_END_ALLOW_THREADS
  h->busy = 0;
#if !defined(Py_LIMITED_API) || Py_LIMITED_API + 0 >= 0x030B0000
  if (have_view) PyBuffer_Release(&view);
#else
  (void)have_view;
#endif
  if (rc) {
    raise_st(rc, err, aoq_st_final_path(w));
    return NULL;
  }
  Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- close */
static PyObject *py_st_close(PyObject *self, PyObject *cap) {
  (void)self;
  st_handle *h = get_handle(cap, 1);
  if (!h) return NULL;
  aoq_st_writer *w = h->w;
  unsigned long long size = (unsigned long long)aoq_st_file_size(w);
  char *path = strdup(aoq_st_final_path(w));
  if (!path) return PyErr_NoMemory();
  char err[ERRLEN] = {0};
  int rc;
  h->busy = 1;
  Py_BEGIN_ALLOW_THREADS
  rc = aoq_st_close(w, err, sizeof err); /* frees w, also on error */
  Py_END_ALLOW_THREADS
  h->busy = 0;
  h->w = NULL;
  if (rc) {
    raise_st(rc, err, path);
    free(path);
    return NULL;
  }
  free(path);
  return PyLong_FromUnsignedLongLong(size);
}

static PyObject *py_st_abort(PyObject *self, PyObject *cap) {
  (void)self;
  st_handle *h = get_handle(cap, 0);
  if (!h) return NULL;
  if (h->w) {
    aoq_st_writer *w = h->w;
    h->w = NULL;
    Py_BEGIN_ALLOW_THREADS
    aoq_st_abort(w);
    Py_END_ALLOW_THREADS
  }
  Py_RETURN_NONE;
}

static PyObject *py_st_info(PyObject *self, PyObject *cap) {
  (void)self;
  st_handle *h = get_handle(cap, 1);
  if (!h) return NULL;
  aoq_st_writer *w = h->w;
  size_t n = aoq_st_count(w);
  PyObject *slots = PyList_New((Py_ssize_t)n);
  if (!slots) return NULL;
  for (size_t i = 0; i < n; i++) {
    size_t idx;
    uint64_t b, e;
    aoq_st_slot(w, i, &idx, &b, &e);
    PyObject *t = Py_BuildValue("(nKKK)", (Py_ssize_t)idx, (unsigned long long)b,
                                (unsigned long long)e,
                                (unsigned long long)aoq_st_remaining(w, idx));
    if (!t) {
      Py_DECREF(slots);
      return NULL;
    }
    PyList_SetItem(slots, (Py_ssize_t)i, t);
  }
  PyObject *fp = PyUnicode_DecodeFSDefault(aoq_st_final_path(w));
  PyObject *tp = PyUnicode_DecodeFSDefault(aoq_st_temp_path(w));
  PyObject *d = NULL;
  if (fp && tp)
    d = Py_BuildValue("{sOsOsKsKsO}", "path", fp, "temp_path", tp, "header_size",
                      (unsigned long long)aoq_st_header_size(w), "file_size",
                      (unsigned long long)aoq_st_file_size(w), "slots", slots);
  Py_XDECREF(fp);
  Py_XDECREF(tp);
  Py_DECREF(slots);
  return d;
}

static PyObject *py_st_inject_fault(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *cap;
  unsigned long long after;
  int e;
  if (!PyArg_ParseTuple(args, "OKi:st_inject_fault", &cap, &after, &e)) return NULL;
  st_handle *h = get_handle(cap, 1);
  if (!h) return NULL;
  aoq_st_inject_fault(h->w, after, e);
  Py_RETURN_NONE;
}

static PyObject *py_st_dtype_size(PyObject *self, PyObject *arg) {
  (void)self;
  Py_ssize_t n;
  const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
  if (!s) return NULL;
  /* an embedded NUL ("F16\0x") is no dtype name: 0, as for any unknown one */
  return PyLong_FromSize_t(strlen(s) == (size_t)n ? aoq_st_dtype_size(s) : 0);
}

PyMethodDef aoq_st_methods[] = {
    {"st_open", (PyCFunction)(void (*)(void))py_st_open, METH_VARARGS | METH_KEYWORDS,
     "st_open(path, entries, metadata=None, overwrite=False) -> handle\n"
     "Plan a safetensors file for entries [(name, dtype, shape)] and write its header to a "
     "temporary file beside path."},
    {"st_write", (PyCFunction)(void (*)(void))py_st_write, METH_VARARGS | METH_KEYWORDS,
     "st_write(handle, index, data, nbytes=-1)\nAppend bytes of tensor `index` (data: an int "
     "address with nbytes, or a C-contiguous buffer). The GIL is released."},
    {"st_close", py_st_close, METH_O,
     "st_close(handle) -> size\nCheck completeness, fsync, rename to the final path."},
    {"st_abort", py_st_abort, METH_O, "st_abort(handle)\nRemove the temporary file."},
    {"st_info", py_st_info, METH_O, "st_info(handle) -> dict with the file layout."},
    {"st_inject_fault", py_st_inject_fault, METH_VARARGS,
     "st_inject_fault(handle, after, errno)\nTesting: writes fail with errno after `after` "
     "more data bytes."},
    {"st_dtype_size", py_st_dtype_size, METH_O, "st_dtype_size(dtype) -> bytes (0: unknown)."},
    {NULL, NULL, 0, NULL},
};
