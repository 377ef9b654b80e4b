/* Streaming safetensors writer (see st_write.h).  Pure C + POSIX. */
#define _GNU_SOURCE
#include "st_write.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif

struct aoq_st_writer {
  char *final_path, *temp_path;
  char **names; /* copies, NUL-terminated (for messages) */
  int fd;
  int overwrite;
  int failed;
  size_t n;
  uint64_t *begin, *end, *written; /* by open() index, data-relative */
  size_t *order;                   /* data order -> open() index */
  uint64_t header_len;             /* N (padded) */
  uint64_t data_start;             /* 8 + N */
  int fault_on, fault_err;
  uint64_t fault_left;
};

static const struct {
  const char *name;
  size_t size;
} DTYPES[] = {
    {"F64", 8}, {"I64", 8}, {"U64", 8},     {"F32", 4},     {"I32", 4},    {"U32", 4},
    {"F16", 2}, {"BF16", 2}, {"I16", 2},    {"U16", 2},     {"I8", 1},     {"U8", 1},
    {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1},
};

size_t aoq_st_dtype_size(const char *dtype) {
  if (!dtype) return 0;
  for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
    if (!strcmp(dtype, DTYPES[i].name)) return DTYPES[i].size;
  return 0;
}

static void msg(char *err, size_t errlen, const char *fmt, ...) {
  if (!err || !errlen) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* ------------------------------------------------------------ buffer */
typedef struct {
  char *p;
  size_t len, cap;
  int oom;
} sbuf;

static void sb_reserve(sbuf *b, size_t extra) {
  if (b->oom) return;
  if (b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) {
    b->oom = 1;
    return;
  }
  b->p = p;
  b->cap = cap;
}
static void sb_put(sbuf *b, const char *s, size_t n) {
  sb_reserve(b, n);
  if (b->oom) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_u64(sbuf *b, uint64_t v) {
  char t[24];
  int k = snprintf(t, sizeof t, "%llu", (unsigned long long)v);
  sb_put(b, t, (size_t)k);
}
/* JSON string with quotes; bytes >= 0x80 copied (validated UTF-8). */
static void sb_json(sbuf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  sb_put(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char e[7];
    if (c == '"' || c == '\\') {
      e[0] = '\\';
      e[1] = (char)c;
      sb_put(b, e, 2);
    } else if (c < 0x20) {
      const char *sh = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                     : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
      if (sh) {
        sb_put(b, sh, 2);
      } else {
        e[0] = '\\'; e[1] = 'u'; e[2] = '0'; e[3] = '0';
        e[4] = hex[c >> 4]; e[5] = hex[c & 15];
        sb_put(b, e, 6);
      }
    } else {
      sb_put(b, (const char *)&s[i], 1);
    }
  }
  sb_put(b, "\"", 1);
}

/* Strict UTF-8 check (no overlongs, surrogates or > U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t k;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0) { k = 1; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { k = 2; cp = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { k = 3; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (i + k >= n) return 0;
    for (size_t j = 1; j <= k; j++) {
      if ((s[i + j] & 0xC0) != 0x80) return 0;
      cp = (cp << 6) | (s[i + j] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    i += k + 1;
  }
  return 1;
}

/* ------------------------------------------------------------ I/O */
static int pwrite_all(int fd, const void *buf, uint64_t n, uint64_t off) {
  const char *p = (const char *)buf;
  while (n) {
    size_t chunk = n > (1u << 30) ? (1u << 30) : (size_t)n;
    ssize_t r = pwrite(fd, p, chunk, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno ? errno : EIO;
    }
    if (r == 0) return EIO; /* no progress: treat as a short write */
    p += r;
    off += (uint64_t)r;
    n -= (uint64_t)r;
  }
  return 0;
}

static char *dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (!slash) return strdup(".");
  if (slash == path) return strdup("/");
  size_t n = (size_t)(slash - path);
  char *d = malloc(n + 1);
  if (!d) return NULL;
  memcpy(d, path, n);
  d[n] = 0;
  return d;
}

static void fsync_dir(const char *path) {
  char *d = dir_of(path);
  if (!d) return;
  int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)fsync(fd); /* best effort: the rename already happened */
    close(fd);
  }
  free(d);
}

/* rename without replacing an existing file (unless overwrite). */
static int publish(const char *tmp, const char *final, int overwrite) {
  if (overwrite) return rename(tmp, final) ? errno : 0;
#ifdef SYS_renameat2
  if (syscall(SYS_renameat2, AT_FDCWD, tmp, AT_FDCWD, final, RENAME_NOREPLACE) == 0) return 0;
  if (errno != ENOSYS && errno != EINVAL) return errno;
#endif
  if (link(tmp, final) == 0) {
    unlink(tmp);
    return 0;
  }
  if (errno == EEXIST) return EEXIST;
  struct stat st;
  if (lstat(final, &st) == 0) return EEXIST;
  return rename(tmp, final) ? errno : 0;
}

static void free_writer(aoq_st_writer *w) {
  if (!w) return;
  if (w->names)
    for (size_t i = 0; i < w->n; i++) free(w->names[i]);
  free(w->names);
  free(w->final_path);
  free(w->temp_path);
  free(w->begin);
  free(w->end);
  free(w->written);
  free(w->order);
  free(w);
}

static const char *short_name(const aoq_st_writer *w, size_t i) {
  return w->names && w->names[i] ? w->names[i] : "?";
}

/* ------------------------------------------------------------ open */
typedef struct {
  const char *s;
  size_t n;
  size_t idx;
} name_ref;

static int cmp_name(const void *a, const void *b) {
  const name_ref *x = a, *y = b;
  size_t m = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->s, y->s, m);
  if (c) return c;
  return x->n < y->n ? -1 : x->n > y->n ? 1 : 0;
}

int aoq_st_open(const char *final_path, const aoq_st_entry *entries, size_t n,
                const char *const *meta_kv, size_t n_meta, int overwrite, aoq_st_writer **out,
                char *err, size_t errlen) {
  *out = NULL;
  if (!final_path || !*final_path) {
    msg(err, errlen, "empty file name");
    return AOQ_ST_EARG;
  }
  if (n && !entries) {
    msg(err, errlen, "%s: no tensor list", final_path);
    return AOQ_ST_EARG;
  }
  aoq_st_writer *w = calloc(1, sizeof *w);
  if (!w) return AOQ_ST_ENOMEM;
  w->fd = -1;
  w->n = n;
  w->overwrite = overwrite;
  w->final_path = strdup(final_path);
  w->names = calloc(n ? n : 1, sizeof *w->names);
  w->begin = calloc(n ? n : 1, sizeof *w->begin);
  w->end = calloc(n ? n : 1, sizeof *w->end);
  w->written = calloc(n ? n : 1, sizeof *w->written);
  w->order = calloc(n ? n : 1, sizeof *w->order);
  name_ref *refs = calloc(n ? n : 1, sizeof *refs);
  size_t *esz = calloc(n ? n : 1, sizeof *esz);
  sbuf hb = {0};
  int rc = AOQ_ST_OK;
  if (!w->final_path || !w->names || !w->begin || !w->end || !w->written || !w->order || !refs ||
      !esz) {
    rc = AOQ_ST_ENOMEM;
    msg(err, errlen, "%s: out of memory planning the file", final_path);
    goto fail;
  }

  /* validate entries */
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) {
    const aoq_st_entry *e = &entries[i];
    if (!e->name || !e->name_len) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: tensor #%zu has an empty name", final_path, i);
      goto fail;
    }
    w->names[i] = malloc(e->name_len + 1);
    if (!w->names[i]) {
      rc = AOQ_ST_ENOMEM;
      goto fail;
    }
    memcpy(w->names[i], e->name, e->name_len);
    w->names[i][e->name_len] = 0;
    if (!valid_utf8((const unsigned char *)e->name, e->name_len)) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: tensor #%zu: name is not valid UTF-8", final_path, i);
      goto fail;
    }
    if (e->name_len == 12 && !memcmp(e->name, "__metadata__", 12)) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: a tensor may not be named \"__metadata__\"", final_path);
      goto fail;
    }
    esz[i] = aoq_st_dtype_size(e->dtype);
    if (!esz[i]) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: tensor '%.200s': unknown dtype '%.20s'", final_path, w->names[i],
          e->dtype ? e->dtype : "(null)");
      goto fail;
    }
    if (e->ndim < 0 || e->ndim > AOQ_ST_MAX_DIMS || (e->ndim && !e->shape)) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: tensor '%.200s': bad number of dimensions %d", final_path,
          w->names[i], e->ndim);
      goto fail;
    }
    uint64_t nb = esz[i];
    for (int d = 0; d < e->ndim; d++) {
      int64_t s = e->shape[d];
      if (s < 0) {
        rc = AOQ_ST_EARG;
        msg(err, errlen, "%s: tensor '%.200s': negative dimension %lld", final_path, w->names[i],
            (long long)s);
        goto fail;
      }
      if (s && nb > (UINT64_C(1) << 62) / (uint64_t)s) {
        rc = AOQ_ST_EARG;
        msg(err, errlen, "%s: tensor '%.200s': size overflows", final_path, w->names[i]);
        goto fail;
      }
      nb *= (uint64_t)s;
    }
    if (nb > (UINT64_C(1) << 62) - total) { /* offsets must fit an off_t */
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: tensor '%.200s': the total data size overflows", final_path,
          w->names[i]);
      goto fail;
    }
    total += nb;
    w->end[i] = nb; /* size for now */
    refs[i].s = e->name;
    refs[i].n = e->name_len;
    refs[i].idx = i;
  }
  if (n > 1) {
    qsort(refs, n, sizeof *refs, cmp_name);
    for (size_t i = 1; i < n; i++)
      if (!cmp_name(&refs[i - 1], &refs[i])) {
        rc = AOQ_ST_EARG;
        msg(err, errlen, "%s: duplicate tensor name '%.200s'", final_path, w->names[refs[i].idx]);
        goto fail;
      }
  }
  for (size_t i = 0; i < n_meta * 2; i++) {
    if (!meta_kv[i] || !valid_utf8((const unsigned char *)meta_kv[i], strlen(meta_kv[i]))) {
      rc = AOQ_ST_EARG;
      msg(err, errlen, "%s: metadata strings must be valid UTF-8", final_path);
      goto fail;
    }
  }

  /* order by decreasing element size (stable), assign offsets */
  {
    size_t k = 0;
    uint64_t off = 0;
    static const size_t sizes[4] = {8, 4, 2, 1};
    for (int s = 0; s < 4; s++)
      for (size_t i = 0; i < n; i++)
        if (esz[i] == sizes[s]) {
          w->order[k++] = i;
          uint64_t nb = w->end[i];
          w->begin[i] = off;
          w->end[i] = off + nb;
          off += nb;
        }
  }

  /* header JSON */
  sb_str(&hb, "{\"__metadata__\":{");
  if (n_meta) {
    for (size_t i = 0; i < n_meta; i++) {
      if (i) sb_put(&hb, ",", 1);
      sb_json(&hb, meta_kv[2 * i], strlen(meta_kv[2 * i]));
      sb_put(&hb, ":", 1);
      sb_json(&hb, meta_kv[2 * i + 1], strlen(meta_kv[2 * i + 1]));
    }
  } else {
    sb_str(&hb, "\"format\":\"pt\"");
  }
  sb_put(&hb, "}", 1);
  for (size_t k = 0; k < n; k++) {
    size_t i = w->order[k];
    const aoq_st_entry *e = &entries[i];
    sb_put(&hb, ",", 1);
    sb_json(&hb, e->name, e->name_len);
    sb_str(&hb, ":{\"dtype\":\"");
    sb_str(&hb, e->dtype);
    sb_str(&hb, "\",\"shape\":[");
    for (int d = 0; d < e->ndim; d++) {
      if (d) sb_put(&hb, ",", 1);
      sb_u64(&hb, (uint64_t)e->shape[d]);
    }
    sb_str(&hb, "],\"data_offsets\":[");
    sb_u64(&hb, w->begin[i]);
    sb_put(&hb, ",", 1);
    sb_u64(&hb, w->end[i]);
    sb_str(&hb, "]}");
    if (hb.len > AOQ_ST_MAX_HEADER) break;
  }
  sb_put(&hb, "}", 1);
  while (!hb.oom && hb.len % 8) sb_put(&hb, " ", 1);
  if (hb.oom) {
    rc = AOQ_ST_ENOMEM;
    msg(err, errlen, "%s: out of memory building the header", final_path);
    goto fail;
  }
  if (hb.len > AOQ_ST_MAX_HEADER) {
    rc = AOQ_ST_EARG;
    msg(err, errlen, "%s: the header would exceed %llu bytes (readers reject it)", final_path,
        (unsigned long long)AOQ_ST_MAX_HEADER);
    goto fail;
  }
  w->header_len = hb.len;
  w->data_start = 8 + hb.len;

  /* temporary file beside the final one */
  if (!overwrite) {
    struct stat st;
    if (lstat(final_path, &st) == 0) {
      rc = EEXIST;
      msg(err, errlen, "refusing to replace the existing file");
      goto fail;
    }
  }
  {
    char *dir = dir_of(final_path);
    const char *base = strrchr(final_path, '/');
    base = base ? base + 1 : final_path;
    if (!dir) {
      rc = AOQ_ST_ENOMEM;
      goto fail;
    }
    size_t cap = strlen(dir) + 128 + 64;
    w->temp_path = malloc(cap);
    if (!w->temp_path) {
      free(dir);
      rc = AOQ_ST_ENOMEM;
      goto fail;
    }
    static unsigned counter;
    for (int tries = 0; tries < 100; tries++) {
      unsigned c = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      snprintf(w->temp_path, cap, "%s/.%.100s.tmp.%ld.%u.%lx", dir, base, (long)getpid(), c,
               (unsigned long)(ts.tv_nsec ^ (ts.tv_sec << 7)) & 0xfffffUL);
      w->fd = open(w->temp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (w->fd >= 0 || errno != EEXIST) break;
    }
    free(dir);
    if (w->fd < 0) {
      rc = errno ? errno : EIO;
      msg(err, errlen, "cannot create the temporary file '%s'", w->temp_path);
      free(w->temp_path);
      w->temp_path = NULL;
      goto fail;
    }
  }

  /* header: u64 LE length + JSON */
  {
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(w->header_len >> (8 * i));
    int e = pwrite_all(w->fd, len8, 8, 0);
    if (!e) e = pwrite_all(w->fd, hb.p, hb.len, 8);
    if (e) {
      rc = e;
      msg(err, errlen, "writing the header (%llu bytes) to the temporary file '%s' failed",
          (unsigned long long)w->data_start, w->temp_path);
      goto fail;
    }
  }
  free(hb.p);
  free(refs);
  free(esz);
  *out = w;
  return AOQ_ST_OK;

fail:
  free(hb.p);
  free(refs);
  free(esz);
  if (w->fd >= 0) {
    close(w->fd);
    w->fd = -1;
  }
  if (w->temp_path) unlink(w->temp_path);
  if (rc == AOQ_ST_ENOMEM && err && errlen && !err[0]) msg(err, errlen, "%s: out of memory", final_path);
  free_writer(w);
  return rc;
}

/* ------------------------------------------------------------ write */
int aoq_st_write(aoq_st_writer *w, size_t index, const void *data, uint64_t nbytes, char *err,
                 size_t errlen) {
  if (!w) {
    msg(err, errlen, "writer is closed");
    return AOQ_ST_ESTATE;
  }
  if (w->failed) {
    msg(err, errlen, "an earlier write to this file failed");
    return AOQ_ST_ESTATE;
  }
  if (index >= w->n) {
    msg(err, errlen, "tensor index %zu out of range (file has %zu tensors)", index, w->n);
    return AOQ_ST_EARG;
  }
  uint64_t size = w->end[index] - w->begin[index];
  uint64_t left = size - w->written[index];
  if (nbytes > left) {
    msg(err, errlen, "tensor '%.200s': %llu bytes given but only %llu of its %llu bytes remain",
        short_name(w, index), (unsigned long long)nbytes, (unsigned long long)left,
        (unsigned long long)size);
    return AOQ_ST_EARG;
  }
  if (!nbytes) return AOQ_ST_OK;
  if (!data) {
    msg(err, errlen, "tensor '%.200s': NULL data pointer", short_name(w, index));
    return AOQ_ST_EARG;
  }
  uint64_t off = w->data_start + w->begin[index] + w->written[index];
  uint64_t todo = nbytes;
  int fault = 0;
  if (w->fault_on && todo > w->fault_left) {
    todo = w->fault_left;
    fault = w->fault_err;
  }
  int e = pwrite_all(w->fd, data, todo, off);
  if (!e && fault) e = fault;
  if (w->fault_on) w->fault_left -= todo;
  if (e) {
    w->failed = 1;
    msg(err, errlen, "writing tensor '%.200s' (%llu bytes at file offset %llu) to the temporary file '%s' failed",
        short_name(w, index), (unsigned long long)nbytes, (unsigned long long)off, w->temp_path);
    return e;
  }
  w->written[index] += nbytes;
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
  /* start write-back now (asynchronously), so that the final fsync is short
   * and dirty pages do not pile up while later tensors are being computed */
  if (nbytes >= (UINT64_C(1) << 22)) (void)sync_file_range(w->fd, (off_t)off, (off_t)nbytes, SYNC_FILE_RANGE_WRITE);
#endif
  return AOQ_ST_OK;
}

/* ------------------------------------------------------------ close */
void aoq_st_abort(aoq_st_writer *w) {
  if (!w) return;
  if (w->fd >= 0) close(w->fd);
  w->fd = -1;
  if (w->temp_path) unlink(w->temp_path);
  free_writer(w);
}

int aoq_st_close(aoq_st_writer *w, char *err, size_t errlen) {
  if (!w) {
    msg(err, errlen, "writer is closed");
    return AOQ_ST_ESTATE;
  }
  int rc = AOQ_ST_OK;
  if (w->failed) {
    msg(err, errlen, "an earlier write to this file failed; nothing was written");
    rc = AOQ_ST_ESTATE;
    goto fail;
  }
  for (size_t k = 0; k < w->n; k++) {
    size_t i = w->order[k];
    uint64_t size = w->end[i] - w->begin[i];
    if (w->written[i] != size) {
      msg(err, errlen, "tensor '%.200s' is incomplete (%llu of %llu bytes written); nothing was written",
          short_name(w, i), (unsigned long long)w->written[i], (unsigned long long)size);
      rc = AOQ_ST_ESTATE;
      goto fail;
    }
  }
  if (fsync(w->fd)) {
    rc = errno;
    msg(err, errlen, "fsync of the temporary file '%s' failed", w->temp_path);
    goto fail;
  }
  {
    int fd = w->fd;
    w->fd = -1;
    if (close(fd)) {
      rc = errno;
      msg(err, errlen, "closing the temporary file '%s' failed", w->temp_path);
      goto fail;
    }
  }
  rc = publish(w->temp_path, w->final_path, w->overwrite);
  if (rc) {
    msg(err, errlen, rc == EEXIST ? "refusing to replace the existing file"
                                  : "renaming the temporary file '%s' to the final name failed",
        w->temp_path);
    goto fail;
  }
  fsync_dir(w->final_path);
  free_writer(w);
  return AOQ_ST_OK;
fail:
  aoq_st_abort(w);
  return rc;
}

/* ------------------------------------------------------------ queries */
size_t aoq_st_count(const aoq_st_writer *w) { return w->n; }
uint64_t aoq_st_header_size(const aoq_st_writer *w) { return w->header_len; }
uint64_t aoq_st_file_size(const aoq_st_writer *w) {
  return w->data_start + (w->n ? w->end[w->order[w->n - 1]] : 0);
}
void aoq_st_slot(const aoq_st_writer *w, size_t i, size_t *index, uint64_t *begin, uint64_t *end) {
  size_t j = w->order[i];
  *index = j;
  *begin = w->begin[j];
  *end = w->end[j];
}
uint64_t aoq_st_remaining(const aoq_st_writer *w, size_t index) {
  return index < w->n ? (w->end[index] - w->begin[index]) - w->written[index] : 0;
}
const char *aoq_st_final_path(const aoq_st_writer *w) { return w->final_path; }
const char *aoq_st_temp_path(const aoq_st_writer *w) { return w->temp_path; }

void aoq_st_inject_fault(aoq_st_writer *w, uint64_t after, int err) {
  w->fault_on = 1;
  w->fault_left = after;
  w->fault_err = err ? err : EIO;
}
