/*
 * safetensors.c - mmap'd safetensors files, single or sharded.
 *
 * File layout: 8-byte little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...,
 *  "__metadata__": {...}}, then the data section; offsets are relative to
 * the start of the data section. We trust nothing in a header: each offset
 * and size is checked against the real file size before a pointer is formed,
 * so a lying header is an error at open, never a read past the mapping.
 *
 * Names are kept in one open-addressing hash table over all shards (a
 * DeepSeek-V3 checkpoint has ~90k tensors; lookups happen once at load).
 */
#include "io/safetensors.h"
#include "core/err.h"
#include "io/names.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    char *path;
    void *map;
    size_t size;
    int64_t mtime_ns;
} st_file;

struct st_set {
    st_file *files;
    int n_files;
    st_tensor *t;
    int n, cap;
    io_names ix;     /* tensor name -> index into t */
};

const char *st_shape_str(const int64_t *shape, int ndim, char *buf, size_t n)
{
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n > k ? n - k : 0, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (k < n)
        snprintf(buf + k, n - k, "]");
    return buf;
}

static int parse_dtype(const char *s, td_dtype *out)
{
    static const struct {
        const char *name;
        td_dtype t;
    } map[] = { { "F32", DT_F32 }, { "F16", DT_F16 }, { "BF16", DT_BF16 },
                { "F8_E4M3", DT_F8_E4M3 }, { "F8_E5M2", DT_F8_E5M2 }, { "F64", DT_F64 },
                { "I64", DT_I64 }, { "I32", DT_I32 }, { "I16", DT_I16 }, { "I8", DT_I8 },
                { "U8", DT_U8 }, { "BOOL", DT_BOOL } };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(s, map[i].name)) {
            *out = map[i].t;
            return 0;
        }
    return -1;
}

static const char *tensor_name(const void *arr, int k) { return ((const st_tensor *)arr)[k].name; }

static const st_tensor *lookup(const st_set *s, const char *name, size_t *slot_out)
{
    int k = io_names_find(&s->ix, name, tensor_name, s->t, slot_out);
    return k >= 0 ? &s->t[k] : NULL;
}

static int add_tensor(st_set *s, st_tensor *t, char *err, size_t errlen, const char *path)
{
    if ((size_t)(s->n + 1) * 2 > s->ix.n_slots && io_names_rebuild(&s->ix, (size_t)s->n + 1024, s->n, tensor_name, s->t))
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory indexing tensors", path);
    size_t slot;
    if (lookup(s, t->name, &slot))
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' appears twice", path, t->name);
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 256;
        st_tensor *nt = realloc(s->t, (size_t)cap * sizeof *nt);
        if (!nt)
            return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory indexing tensors", path);
        s->t = nt;
        s->cap = cap;
    }
    s->t[s->n] = *t;
    s->ix.slots[slot] = s->n;
    s->n++;
    return 0;
}

/* Map one file and add its tensors. */
static int open_file(st_set *s, const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat stt;
    if (fstat(fd, &stt) != 0 || !S_ISREG(stt.st_mode)) {
        close(fd);
        return td_err(err, errlen, TANDEM_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)stt.st_size;
    if (size < 8) {
        close(fd);
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: truncated (%zu bytes, no header)", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return td_err(err, errlen, TANDEM_EIO, "%s: mmap failed: %s", path, strerror(errno));

    st_file *nf = realloc(s->files, (size_t)(s->n_files + 1) * sizeof *nf);
    if (!nf) {
        munmap(map, size);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    s->files = nf;
    st_file *f = &s->files[s->n_files];
    f->path = strdup(path);
    f->map = map;
    f->size = size;
    f->mtime_ns = (int64_t)stt.st_mtim.tv_sec * 1000000000 + stt.st_mtim.tv_nsec;
    int file_idx = s->n_files++;
    if (!f->path)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");

    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)((const unsigned char *)map)[i] << (8 * i);
    if (hlen > size - 8)
        return td_err(err, errlen, TANDEM_EFORMAT,
                      "%s: header length %llu exceeds the file size %zu (truncated or not safetensors)",
                      path, (unsigned long long)hlen, size);
    const char *hdr = (const char *)map + 8;
    const unsigned char *data = (const unsigned char *)map + 8 + hlen;
    size_t data_size = size - 8 - hlen;

    json_error_t jerr;
    json_t *root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: header is not valid JSON (%s, at byte %d)",
                      path, jerr.text, jerr.position);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: header is not a JSON object", path);
        goto done;
    }
    const char *name;
    json_t *v;
    json_object_foreach(root, name, v) {
        if (!strcmp(name, "__metadata__"))
            continue;
        st_tensor t = { 0 };
        json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape");
        json_t *jo = json_object_get(v, "data_offsets");
        if (!json_is_object(v) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            rc = td_err(err, errlen, TANDEM_EFORMAT,
                        "%s: tensor '%s': entry needs dtype, shape and data_offsets [begin, end]", path, name);
            goto done;
        }
        if (parse_dtype(json_string_value(jd), &t.dtype) != 0) {
            rc = td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: tensor '%s': dtype '%s' is not supported",
                        path, name, json_string_value(jd));
            goto done;
        }
        if (json_array_size(js) > ST_MAX_DIMS) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s': %zu dimensions (at most %d)",
                        path, name, json_array_size(js), ST_MAX_DIMS);
            goto done;
        }
        t.ndim = (int)json_array_size(js);
        uint64_t count = 1;
        int overflow = 0;
        for (int i = 0; i < t.ndim; i++) {
            json_t *e = json_array_get(js, (size_t)i);
            if (!json_is_integer(e) || json_integer_value(e) < 0) {
                rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s': shape entry %d is not a size",
                            path, name, i);
                goto done;
            }
            t.shape[i] = json_integer_value(e);
            if (t.shape[i] && count > UINT64_MAX / (uint64_t)t.shape[i])
                overflow = 1;
            count *= (uint64_t)t.shape[i];
        }
        json_t *b = json_array_get(jo, 0), *e = json_array_get(jo, 1);
        if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
            json_integer_value(e) < json_integer_value(b)) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s': bad data_offsets", path, name);
            goto done;
        }
        uint64_t ob = (uint64_t)json_integer_value(b), oe = (uint64_t)json_integer_value(e);
        size_t esz = dtype_size(t.dtype);
        if (overflow || count > UINT64_MAX / esz) {
            char sh[96];
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s': shape %s of %s has more than 2^64 bytes",
                        path, name, st_shape_str(t.shape, t.ndim, sh, sizeof sh), dtype_name(t.dtype));
            goto done;
        }
        if (oe - ob != count * esz) {
            char sh[96];
            rc = td_err(err, errlen, TANDEM_EFORMAT,
                        "%s: tensor '%s': %llu bytes in data_offsets, but shape %s of %s needs %llu",
                        path, name, (unsigned long long)(oe - ob), st_shape_str(t.shape, t.ndim, sh, sizeof sh),
                        dtype_name(t.dtype), (unsigned long long)(count * esz));
            goto done;
        }
        if (oe > data_size) {
            rc = td_err(err, errlen, TANDEM_EFORMAT,
                        "%s: tensor '%s' ends at byte %llu of the data section, which has only %zu bytes "
                        "(file truncated?)",
                        path, name, (unsigned long long)oe, data_size);
            goto done;
        }
        t.data = data + ob;
        t.nbytes = (size_t)(oe - ob);
        if ((uintptr_t)t.data % esz != 0) {
            /* unpadded header: keep kernels' loads aligned by copying this tensor */
            t.copy = aligned_alloc(64, (t.nbytes + 63) / 64 * 64 + 64);
            if (!t.copy) {
                rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
                goto done;
            }
            memcpy(t.copy, t.data, t.nbytes);
            t.data = t.copy;
        }
        t.file = file_idx;
        t.name = strdup(name);
        if (!t.name) {
            free(t.copy);
            rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
            goto done;
        }
        if ((rc = add_tensor(s, &t, err, errlen, path)) != 0) {
            free((char *)t.name);
            free(t.copy);
            goto done;
        }
    }
done:
    json_decref(root);
    return rc;
}

static int is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* model.safetensors.index.json: open every shard named in weight_map and
 * check that each listed tensor is in the shard the index says. */
static int open_index(st_set *s, const char *dir, const char *index_path, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: not valid JSON (%s, line %d)", index_path, jerr.text,
                      jerr.line);
    int rc = 0;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: missing or empty object 'weight_map'", index_path);
        goto done;
    }
    const char *name;
    json_t *v;
    /* open each distinct shard once, in order of first mention */
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v)) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: weight_map['%s'] is not a file name", index_path, name);
            goto done;
        }
        const char *fn = json_string_value(v);
        if (strchr(fn, '/') || !strcmp(fn, "..")) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: weight_map['%s'] = '%s' is not a plain file name",
                        index_path, name, fn);
            goto done;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, fn);
        int seen = 0;
        for (int i = 0; i < s->n_files; i++)
            if (!strcmp(s->files[i].path, path))
                seen = 1;
        if (!seen && (rc = open_file(s, path, err, errlen)) != 0)
            goto done;
    }
    json_object_foreach(wm, name, v) {
        const st_tensor *t = st_find(s, name);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, json_string_value(v));
        if (!t || strcmp(s->files[t->file].path, path) != 0) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' is listed in shard '%s' but not found there",
                        index_path, name, json_string_value(v));
            goto done;
        }
    }
done:
    json_decref(root);
    return rc;
}

int st_open(st_set **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    st_set *s = calloc(1, sizeof *s);
    if (!s)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc;
    if (is_dir(path)) {
        char p[4096];
        snprintf(p, sizeof p, "%s/model.safetensors.index.json", path);
        if (file_exists(p)) {
            rc = open_index(s, path, p, err, errlen);
        } else {
            snprintf(p, sizeof p, "%s/model.safetensors", path);
            if (!file_exists(p))
                rc = td_err(err, errlen, TANDEM_EIO,
                            "%s: no model.safetensors or model.safetensors.index.json in this directory", path);
            else
                rc = open_file(s, p, err, errlen);
        }
    } else if (file_exists(path)) {
        rc = open_file(s, path, err, errlen);
    } else {
        rc = td_err(err, errlen, TANDEM_EIO, "%s: no such file or directory", path);
    }
    if (rc) {
        st_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

void st_close(st_set *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++) {
        free((char *)s->t[i].name);
        free(s->t[i].copy);
    }
    for (int i = 0; i < s->n_files; i++) {
        if (s->files[i].map)
            munmap(s->files[i].map, s->files[i].size);
        free(s->files[i].path);
    }
    free(s->files);
    free(s->t);
    io_names_free(&s->ix);
    free(s);
}

const st_tensor *st_find(const st_set *s, const char *name) { return lookup(s, name, NULL); }
int st_count(const st_set *s) { return s->n; }
const st_tensor *st_at(const st_set *s, int i) { return i >= 0 && i < s->n ? &s->t[i] : NULL; }
const char *st_file_path(const st_set *s, int file)
{
    return file >= 0 && file < s->n_files ? s->files[file].path : "?";
}

int st_n_files(const st_set *s) { return s->n_files; }

void st_file_stat(const st_set *s, int file, size_t *size, int64_t *mtime_ns, uint64_t *header_hash)
{
    const st_file *f = &s->files[file];
    const unsigned char *b = f->map;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++)
        hlen |= (uint64_t)b[i] << (8 * i);
    uint64_t h = 1469598103934665603ull; /* FNV-1a of the length and the JSON header (checked at open) */
    for (uint64_t i = 0; i < 8 + hlen; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    *size = f->size;
    *mtime_ns = f->mtime_ns;
    *header_hash = h;
}

void st_release(const st_set *s, const void *p, size_t n)
{
    const uintptr_t page = 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + n) & ~(page - 1);
    for (int i = 0; i < s->n_files; i++) {
        uintptr_t lo = (uintptr_t)s->files[i].map, hi = lo + s->files[i].size;
        if ((uintptr_t)p >= lo && (uintptr_t)p + n <= hi) {
            if (b > a)
                madvise((void *)a, b - a, MADV_DONTNEED);
            return;
        }
    }
}
