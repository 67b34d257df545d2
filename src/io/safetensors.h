/*
 * safetensors.h - read-only access to safetensors checkpoints through mmap.
 *
 * A set is one file, or the shards listed by model.safetensors.index.json
 * ("weight_map": tensor name -> shard file). Tensor data is never copied: a
 * tensor's `data` points into the file mapping and stays valid until
 * st_close(). A writer that does not pad its header can leave a tensor off
 * its element alignment; such a tensor is copied once into aligned memory
 * (kernels read it as uint16/float arrays). Every header is validated at open: JSON well-formed, known
 * dtypes, offsets inside the file, sizes consistent with shapes, no overlap
 * with the header, and every index entry present in its shard.
 */
#ifndef TD_SAFETENSORS_H
#define TD_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"

#define ST_MAX_DIMS 8

typedef struct {
    const char *name;
    td_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;   /* into the mapping, or into `copy` */
    size_t nbytes;
    int file;           /* index of the shard holding it */
    void *copy;         /* aligned copy when the file put the data off its element alignment */
} st_tensor;

typedef struct st_set st_set;

/* path: a .safetensors file, or a directory holding model.safetensors or
 * model.safetensors.index.json. */
int st_open(st_set **out, const char *path, char *err, size_t errlen);
void st_close(st_set *s);

const st_tensor *st_find(const st_set *s, const char *name);
int st_count(const st_set *s);
const st_tensor *st_at(const st_set *s, int i);
const char *st_file_path(const st_set *s, int file); /* for messages */

int st_n_files(const st_set *s);
/* what identifies a shard: its size, modification time and a hash of its
 * header (every tensor's name, dtype, shape and offsets) */
void st_file_stat(const st_set *s, int file, size_t *size, int64_t *mtime_ns, uint64_t *header_hash);
/* Drop the pages of [p, p + n) from this process (MADV_DONTNEED on the whole
 * pages inside the range) when they lie in a shard's mapping: a tensor whose
 * data has been packed elsewhere stops counting as resident. Reading it again
 * later is still correct (the pages come back from the file). */
void st_release(const st_set *s, const void *p, size_t n);

/* "[8,64]" style shape string into buf (for messages). */
const char *st_shape_str(const int64_t *shape, int ndim, char *buf, size_t n);

#endif
