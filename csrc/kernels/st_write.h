/* Streaming safetensors writer: pure C (POSIX), no torch or Python types.
 *
 * The layout (header and every tensor's byte range) is fixed when the file
 * is opened, from the tensors' names, dtypes and shapes; the data are then
 * written tensor by tensor (any order, each tensor in one or more chunks)
 * into a temporary file next to the final one, and aoq_st_close() checks
 * that every byte was written, fsyncs, and renames the temporary file to the
 * final name (refusing to replace an existing file unless asked to).  A
 * failed call leaves the temporary file until aoq_st_close() (which then
 * fails) or aoq_st_abort() removes it; nothing is ever left under the final
 * name.
 *
 * Layout (SPEC section 6): u64 little-endian header length N, N bytes of
 * UTF-8 JSON padded with spaces to a multiple of 8, then the data.  Tensors
 * are stored in order of decreasing element size (stable in the order given)
 * so that each starts aligned to its element size; there are no gaps.
 * The header starts with "__metadata__" (a flat string map, {"format":"pt"}
 * by default) followed by the tensors in data order.  Names are JSON-escaped
 * (quote, backslash, control characters); other bytes, UTF-8 included, are
 * copied as they are.
 *
 * Errors: functions return AOQ_ST_OK (0), a positive errno value for a
 * system-call failure, or a negative AOQ_ST_E* code for a bad argument; a
 * message naming the file and what failed is written to err[errlen].
 */
#ifndef AOQ_ST_WRITE_H
#define AOQ_ST_WRITE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AOQ_ST_OK 0
#define AOQ_ST_EARG (-1)   /* invalid argument (ValueError) */
#define AOQ_ST_ESTATE (-2) /* wrong call sequence, incomplete file (ValueError) */
#define AOQ_ST_ENOMEM (-3) /* out of memory (MemoryError) */

#define AOQ_ST_MAX_HEADER 100000000ULL /* readers reject larger headers */
#define AOQ_ST_MAX_DIMS 64

typedef struct aoq_st_entry {
  const char *name; /* UTF-8 bytes, need not be NUL-terminated */
  size_t name_len;
  const char *dtype; /* "F16", "I32", ... (NUL-terminated) */
  int ndim;
  const int64_t *shape;
} aoq_st_entry;

typedef struct aoq_st_writer aoq_st_writer;

/* Element size in bytes of a safetensors dtype name, 0 if unknown. */
size_t aoq_st_dtype_size(const char *dtype);

/* Plans the layout, creates the temporary file and writes the header.
 * meta_kv holds n_meta (key, value) pairs of NUL-terminated UTF-8 strings
 * (NULL/0: {"format": "pt"}).  overwrite: replace an existing final file.
 * On success *out is the writer. */
int aoq_st_open(const char *final_path, const aoq_st_entry *entries, size_t n,
                const char *const *meta_kv, size_t n_meta, int overwrite, aoq_st_writer **out,
                char *err, size_t errlen);

/* Appends nbytes of tensor `index` (position in the open() list). */
int aoq_st_write(aoq_st_writer *w, size_t index, const void *data, uint64_t nbytes, char *err,
                 size_t errlen);

/* Checks completeness, fsyncs, renames to the final name, fsyncs the
 * directory, frees w (also on error, after removing the temporary file). */
int aoq_st_close(aoq_st_writer *w, char *err, size_t errlen);

/* Removes the temporary file and frees w. */
void aoq_st_abort(aoq_st_writer *w);

/* Layout queries (valid until close/abort). */
size_t aoq_st_count(const aoq_st_writer *w);
uint64_t aoq_st_header_size(const aoq_st_writer *w); /* N, padded */
uint64_t aoq_st_file_size(const aoq_st_writer *w);
/* i-th tensor in data order: its open() index and [begin, end) data offsets. */
void aoq_st_slot(const aoq_st_writer *w, size_t i, size_t *index, uint64_t *begin, uint64_t *end);
/* Bytes still missing from tensor `index`. */
uint64_t aoq_st_remaining(const aoq_st_writer *w, size_t index);
const char *aoq_st_final_path(const aoq_st_writer *w);
const char *aoq_st_temp_path(const aoq_st_writer *w);

/* Fault injection for tests: after `after` more data bytes, writes fail with
 * errno `err` (e.g. ENOSPC), as if the device had filled up. */
void aoq_st_inject_fault(aoq_st_writer *w, uint64_t after, int err);

#ifdef __cplusplus
}
#endif
#endif
