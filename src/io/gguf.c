/*
 * gguf.c - mmap'd GGUF files, single or split (see gguf.h for the layout).
 *
 * The parser walks the header with a bounded cursor: every read names what
 * it reads (a key, a tensor) so that a short file says where it ended, and
 * every count is checked against the bytes left before anything is
 * allocated for it, so a file claiming 2^60 keys fails at once instead of
 * asking for memory. Strings are copied (NUL-terminated) because GGUF
 * strings are length-prefixed and unaligned; numeric arrays and tensor data
 * stay in the mapping.
 *
 * Only little-endian files are read (what every published GGUF is); a
 * big-endian file shows as a byte-swapped version number and is refused.
 */
#include "io/gguf.h"
#include "core/err.h"
#include "io/names.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGN 32
#define GGUF_MAX_SPLITS 9999

typedef struct {
    char *path;
    void *map;
    size_t size;
    int64_t mtime_ns;
    size_t data_off; /* start of the data section */
} gguf_split;

struct gguf_file {
    gguf_split *files;
    int n_files;
    uint32_t version;
    gguf_kv *kv;      /* the first split's metadata */
    int n_kv;
    io_names kv_ix;   /* metadata key -> index into kv */
    gguf_tensor *t;   /* every split's tensors */
    int n_t, cap_t;
    io_names ix;      /* tensor name -> index into t */
    void **own;       /* blocks to free at close */
    int n_own, cap_own;
};

/* ---- element types ---------------------------------------------------- */

static const struct {
    const char *name;
    unsigned short block;
    unsigned short bytes;
} type_info[GGUF_T_COUNT] = {
    [0] = { "F32", 1, 4 },        [1] = { "F16", 1, 2 },        [2] = { "Q4_0", 32, 18 },
    [3] = { "Q4_1", 32, 20 },     [6] = { "Q5_0", 32, 22 },     [7] = { "Q5_1", 32, 24 },
    [8] = { "Q8_0", 32, 34 },     [9] = { "Q8_1", 32, 40 },     [10] = { "Q2_K", 256, 84 },
    [11] = { "Q3_K", 256, 110 },  [12] = { "Q4_K", 256, 144 },  [13] = { "Q5_K", 256, 176 },
    [14] = { "Q6_K", 256, 210 },  [15] = { "Q8_K", 256, 292 },  [16] = { "IQ2_XXS", 256, 66 },
    [17] = { "IQ2_XS", 256, 74 }, [18] = { "IQ3_XXS", 256, 98 }, [19] = { "IQ1_S", 256, 50 },
    [20] = { "IQ4_NL", 32, 18 },  [21] = { "IQ3_S", 256, 110 }, [22] = { "IQ2_S", 256, 82 },
    [23] = { "IQ4_XS", 256, 136 }, [24] = { "I8", 1, 1 },       [25] = { "I16", 1, 2 },
    [26] = { "I32", 1, 4 },       [27] = { "I64", 1, 8 },       [28] = { "F64", 1, 8 },
    [29] = { "IQ1_M", 256, 56 },  [30] = { "BF16", 1, 2 },      [34] = { "TQ1_0", 256, 54 },
    [35] = { "TQ2_0", 256, 66 },  [39] = { "MXFP4", 32, 17 },   [40] = { "NVFP4", 64, 36 },
    [41] = { "Q1_0", 128, 18 },
};

const char *gguf_type_name(int type)
{
    static _Thread_local char buf[24];
    if (type >= 0 && type < GGUF_T_COUNT && type_info[type].name)
        return type_info[type].name;
    snprintf(buf, sizeof buf, "type %d", type);
    return buf;
}

int gguf_type_block(int type)
{
    return type >= 0 && type < GGUF_T_COUNT ? type_info[type].block : 0;
}

size_t gguf_type_block_bytes(int type)
{
    return type >= 0 && type < GGUF_T_COUNT ? type_info[type].bytes : 0;
}

size_t gguf_row_bytes(int type, int64_t n)
{
    int b = gguf_type_block(type);
    if (!b || n < 0 || n % b)
        return 0;
    uint64_t blocks = (uint64_t)n / (uint64_t)b, bb = gguf_type_block_bytes(type);
    if (blocks > SIZE_MAX / bb)
        return 0;
    return (size_t)(blocks * bb);
}

static const unsigned char vsize[GGUF_V_COUNT] = {
    [GGUF_V_U8] = 1,  [GGUF_V_I8] = 1,  [GGUF_V_U16] = 2,  [GGUF_V_I16] = 2, [GGUF_V_U32] = 4,
    [GGUF_V_I32] = 4, [GGUF_V_F32] = 4, [GGUF_V_BOOL] = 1, [GGUF_V_U64] = 8, [GGUF_V_I64] = 8,
    [GGUF_V_F64] = 8,
};

static const char *vname(int t)
{
    static const char *n[GGUF_V_COUNT] = { "u8",   "i8",  "u16",   "i16", "u32", "i32", "f32",
                                           "bool", "str", "array", "u64", "i64", "f64" };
    return t >= 0 && t < GGUF_V_COUNT ? n[t] : "?";
}

/* ---- bounded reading of one split's header ------------------------------ */

typedef struct {
    const unsigned char *p;
    size_t size, pos;
    const char *path;
    char *err;
    size_t errlen;
} cursor;

static int need(cursor *c, size_t n, const char *what)
{
    if (n > c->size - c->pos)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: truncated: %s needs %zu bytes at offset %zu, the file has %zu", c->path, what, n,
                      c->pos, c->size);
    return 0;
}

static int rd(cursor *c, void *out, size_t n, const char *what)
{
    int rc = need(c, n, what);
    if (rc)
        return rc;
    memcpy(out, c->p + c->pos, n);
    c->pos += n;
    return 0;
}

static int own(gguf_file *g, void *p)
{
    if (!p)
        return -1;
    if (g->n_own == g->cap_own) {
        int cap = g->cap_own ? g->cap_own * 2 : 64;
        void **n = realloc(g->own, (size_t)cap * sizeof *n);
        if (!n) {
            free(p);
            return -1;
        }
        g->own = n;
        g->cap_own = cap;
    }
    g->own[g->n_own++] = p;
    return 0;
}

/* A length-prefixed string: copied NUL-terminated into *out (owned by g)
 * when out is non-NULL, else skipped. */
static int rd_str(gguf_file *g, cursor *c, char **out, uint64_t *len_out, const char *what)
{
    uint64_t len;
    int rc = rd(c, &len, 8, what);
    if (rc)
        return rc;
    if (len > c->size - c->pos)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: %s: string of %llu bytes at offset %zu runs past the end of the file (%zu bytes)",
                      c->path, what, (unsigned long long)len, c->pos, c->size);
    if (out) {
        char *s = malloc((size_t)len + 1);
        if (own(g, s))
            return td_err(c->err, c->errlen, TANDEM_ENOMEM, "%s: out of memory reading %s", c->path, what);
        memcpy(s, c->p + c->pos, (size_t)len);
        s[len] = 0;
        *out = s;
    }
    if (len_out)
        *len_out = len;
    c->pos += (size_t)len;
    return 0;
}

/* Fill u/i/f of kv from a scalar of type t at p. */
static void set_scalar(gguf_kv *kv, int t, const unsigned char *p)
{
    union {
        uint8_t u8;
        int8_t i8;
        uint16_t u16;
        int16_t i16;
        uint32_t u32;
        int32_t i32;
        float f32;
        uint64_t u64;
        int64_t i64;
        double f64;
    } v;
    memcpy(&v, p, vsize[t]);
    switch (t) {
    case GGUF_V_U8: kv->u = v.u8; break;
    case GGUF_V_BOOL: kv->u = v.u8 != 0; break;
    case GGUF_V_U16: kv->u = v.u16; break;
    case GGUF_V_U32: kv->u = v.u32; break;
    case GGUF_V_U64: kv->u = v.u64; break;
    case GGUF_V_I8: kv->i = v.i8; break;
    case GGUF_V_I16: kv->i = v.i16; break;
    case GGUF_V_I32: kv->i = v.i32; break;
    case GGUF_V_I64: kv->i = v.i64; break;
    case GGUF_V_F32: kv->f = v.f32; break;
    case GGUF_V_F64: kv->f = v.f64; break;
    }
    switch (t) {
    case GGUF_V_U8: case GGUF_V_BOOL: case GGUF_V_U16: case GGUF_V_U32: case GGUF_V_U64:
        kv->i = kv->u <= INT64_MAX ? (int64_t)kv->u : 0;
        kv->f = (double)kv->u;
        break;
    case GGUF_V_I8: case GGUF_V_I16: case GGUF_V_I32: case GGUF_V_I64:
        kv->u = kv->i >= 0 ? (uint64_t)kv->i : 0;
        kv->f = (double)kv->i;
        break;
    default:
        break;
    }
}

/* One metadata value of type t (not an array) or an array, into kv. */
static int rd_value(gguf_file *g, cursor *c, gguf_kv *kv, int keep, const char *what)
{
    int rc;
    if (kv->type == GGUF_V_STR) {
        char *s = NULL;
        uint64_t len;
        if ((rc = rd_str(g, c, keep ? &s : NULL, &len, what)))
            return rc;
        kv->str = s;
        kv->len = (size_t)len;
        return 0;
    }
    if (kv->type != GGUF_V_ARR) {
        if ((rc = need(c, vsize[kv->type], what)))
            return rc;
        set_scalar(kv, kv->type, c->p + c->pos);
        c->pos += vsize[kv->type];
        return 0;
    }
    uint32_t et;
    uint64_t n;
    if ((rc = rd(c, &et, 4, what)) || (rc = rd(c, &n, 8, what)))
        return rc;
    if (et >= GGUF_V_COUNT || et == GGUF_V_ARR)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: %s: array element type %u is %s", c->path, what,
                      et, et == GGUF_V_ARR ? "an array (nested arrays are not GGUF)" : "not a GGUF type");
    kv->arr_type = (gguf_vtype)et;
    kv->arr_n = n;
    if (et != GGUF_V_STR) {
        size_t es = vsize[et];
        if (n > (c->size - c->pos) / es)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                          "%s: %s: array of %llu %s runs past the end of the file (%zu bytes)", c->path, what,
                          (unsigned long long)n, vname((int)et), c->size);
        kv->arr_data = c->p + c->pos;
        c->pos += (size_t)n * es;
        return 0;
    }
    /* strings: each takes at least its 8-byte length, which bounds n */
    if (n > (c->size - c->pos) / 8)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: %s: array of %llu strings runs past the end of the file (%zu bytes)", c->path, what,
                      (unsigned long long)n, c->size);
    size_t start = c->pos, total = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len;
        if ((rc = rd_str(g, c, NULL, &len, what)))
            return rc;
        if (len > UINT32_MAX)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: %s: string %llu is longer than 4 GiB", c->path,
                          what, (unsigned long long)i);
        total += (size_t)len + 1; /* bounded by the file size */
    }
    if (!keep)
        return 0;
    /* second pass: one block for the pointers, lengths and bytes */
    const char **strs = malloc((size_t)(n ? n : 1) * sizeof *strs);
    uint32_t *lens = malloc((size_t)(n ? n : 1) * sizeof *lens);
    char *bytes = malloc(total ? total : 1);
    if (own(g, strs) | own(g, lens) | own(g, bytes))
        return td_err(c->err, c->errlen, TANDEM_ENOMEM, "%s: out of memory reading %s", c->path, what);
    size_t pos = start, at = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len;
        memcpy(&len, c->p + pos, 8);
        pos += 8;
        memcpy(bytes + at, c->p + pos, (size_t)len);
        bytes[at + len] = 0;
        strs[i] = bytes + at;
        lens[i] = (uint32_t)len;
        at += (size_t)len + 1;
        pos += (size_t)len;
    }
    kv->arr_strs = strs;
    kv->arr_lens = lens;
    return 0;
}

/* ---- tensor index ------------------------------------------------------- */

static const char *tensor_name(const void *arr, int k) { return ((const gguf_tensor *)arr)[k].name; }

static const gguf_tensor *lookup(const gguf_file *g, const char *name, size_t *slot_out)
{
    int k = io_names_find(&g->ix, name, tensor_name, g->t, slot_out);
    return k >= 0 ? &g->t[k] : NULL;
}

static int add_tensor(gguf_file *g, const gguf_tensor *t, const char *path, char *err, size_t errlen)
{
    if ((size_t)(g->n_t + 1) * 2 > g->ix.n_slots && io_names_rebuild(&g->ix, (size_t)g->n_t + 1024, g->n_t, tensor_name, g->t))
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory indexing tensors", path);
    size_t slot;
    if (lookup(g, t->name, &slot))
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' appears twice", path, t->name);
    if (g->n_t == g->cap_t) {
        if (g->cap_t > INT32_MAX / 2)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: too many tensors", path);
        int cap = g->cap_t ? g->cap_t * 2 : 256;
        gguf_tensor *nt = realloc(g->t, (size_t)cap * sizeof *nt);
        if (!nt)
            return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory indexing tensors", path);
        g->t = nt;
        g->cap_t = cap;
    }
    g->t[g->n_t] = *t;
    g->ix.slots[slot] = g->n_t;
    g->n_t++;
    return 0;
}

/* The metadata index: sized at twice the pair count before parsing, so an
 * insert always finds an empty slot. */
static const char *kv_key(const void *arr, int k) { return ((const gguf_kv *)arr)[k].key; }

static const gguf_kv *kv_find(const gguf_file *g, const char *key)
{
    int k = io_names_find(&g->kv_ix, key, kv_key, g->kv, NULL);
    return k >= 0 ? &g->kv[k] : NULL;
}

static void kv_insert(gguf_file *g, int k)
{
    size_t slot;
    io_names_find(&g->kv_ix, g->kv[k].key, kv_key, g->kv, &slot);
    g->kv_ix.slots[slot] = k;
}

/* ---- one split ---------------------------------------------------------- */

static int map_file(gguf_file *g, const char *path, char *err, size_t errlen)
{
    gguf_split *nf = realloc(g->files, (size_t)(g->n_files + 1) * sizeof *nf);
    if (!nf)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    g->files = nf;
    gguf_split *f = &g->files[g->n_files];
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return td_err(err, errlen, TANDEM_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 24) {
        close(fd);
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: truncated (%zu bytes, a GGUF header has 24)", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return td_err(err, errlen, TANDEM_EIO, "%s: mmap failed: %s", path, strerror(errno));
    f->path = strdup(path);
    f->map = map;
    f->size = size;
    f->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
    g->n_files++;
    if (!f->path)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    return 0;
}

/* Parse split `fi` (mapped). Metadata is kept only for the first split;
 * later splits' pairs are validated and skipped. */
static int parse_split(gguf_file *g, int fi, char *err, size_t errlen)
{
    gguf_split *f = &g->files[fi];
    cursor c = { f->map, f->size, 0, f->path, err, errlen };
    int rc;
    uint32_t magic, version;
    uint64_t n_t, n_kv;
    if ((rc = rd(&c, &magic, 4, "magic")) || (rc = rd(&c, &version, 4, "version")))
        return rc;
    if (magic != GGUF_MAGIC)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: not a GGUF file (no 'GGUF' magic)", f->path);
    if (version == 0x02000000u || version == 0x03000000u)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: big-endian GGUF is not supported", f->path);
    if (version != 2 && version != 3)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: GGUF version %u is not supported (2 and 3 are)",
                      f->path, version);
    if (fi == 0)
        g->version = version;
    if ((rc = rd(&c, &n_t, 8, "tensor count")) || (rc = rd(&c, &n_kv, 8, "metadata count")))
        return rc;
    /* a pair takes at least 8 + 4 + 1 bytes, a tensor info 8 + 4 + 8 + 4 + 8 */
    if (n_kv > (c.size - c.pos) / 13 || n_t > (c.size - c.pos) / 32 || n_t > INT32_MAX)
        return td_err(err, errlen, TANDEM_EFORMAT,
                      "%s: header claims %llu metadata pairs and %llu tensors, more than %zu bytes can hold",
                      f->path, (unsigned long long)n_kv, (unsigned long long)n_t, c.size);

    gguf_kv *kvs = NULL;
    if (fi == 0) {
        kvs = calloc(n_kv ? n_kv : 1, sizeof *kvs);
        if (own(g, kvs) || io_names_rebuild(&g->kv_ix, (size_t)n_kv, 0, kv_key, kvs))
            return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", f->path);
        g->kv = kvs;
    }
    uint32_t align = GGUF_DEFAULT_ALIGN;
    for (uint64_t k = 0; k < n_kv; k++) {
        gguf_kv tmp = { 0 }, *kv = kvs ? &kvs[k] : &tmp;
        char *key = NULL;
        char what[300];
        snprintf(what, sizeof what, "metadata pair %llu", (unsigned long long)k);
        if ((rc = rd_str(g, &c, &key, NULL, what)))
            return rc;
        snprintf(what, sizeof what, "metadata key '%.200s'", key);
        uint32_t t;
        if ((rc = rd(&c, &t, 4, what)))
            return rc;
        if (t >= GGUF_V_COUNT)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: %s has value type %u, not a GGUF type", f->path, what,
                          t);
        kv->key = key;
        kv->type = (gguf_vtype)t;
        if ((rc = rd_value(g, &c, kv, kvs != NULL, what)))
            return rc;
        if (kvs) {
            if (kv_find(g, key))
                return td_err(err, errlen, TANDEM_EFORMAT, "%s: metadata key '%s' appears twice", f->path, key);
            kv_insert(g, (int)k);
            g->n_kv = (int)k + 1;
        }
        if (!strcmp(key, "general.alignment")) {
            if (t != GGUF_V_U32 || kv->u == 0 || (kv->u & (kv->u - 1)) || kv->u > 65536)
                return td_err(err, errlen, TANDEM_EFORMAT,
                              "%s: general.alignment must be a u32 power of two up to 65536 (is %s %llu)", f->path,
                              vname((int)t), (unsigned long long)kv->u);
            align = (uint32_t)kv->u;
        }
    }

    /* tensor infos; offsets are checked once the data section's start is known */
    int first = g->n_t;
    uint64_t *offs = malloc((size_t)(n_t ? n_t : 1) * sizeof *offs);
    if (!offs)
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", f->path);
    for (uint64_t k = 0; k < n_t; k++) {
        gguf_tensor t = { 0 };
        char *name = NULL;
        char what[300];
        snprintf(what, sizeof what, "tensor info %llu", (unsigned long long)k);
        if ((rc = rd_str(g, &c, &name, NULL, what)))
            goto fail;
        snprintf(what, sizeof what, "tensor '%.200s'", name);
        t.name = name;
        uint32_t nd, type;
        if ((rc = rd(&c, &nd, 4, what)))
            goto fail;
        if (nd < 1 || nd > GGUF_MAX_DIMS) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: %s has %u dimensions (1 to %d)", f->path, what, nd,
                        GGUF_MAX_DIMS);
            goto fail;
        }
        t.ndim = (int)nd;
        uint64_t count = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) {
            uint64_t ne = 1;
            if (d < (int)nd && (rc = rd(&c, &ne, 8, what)))
                goto fail;
            if (ne > INT64_MAX || (ne && count > (uint64_t)INT64_MAX / ne)) {
                rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: %s: dimension %d (%llu) makes more than 2^63 elements",
                            f->path, what, d, (unsigned long long)ne);
                goto fail;
            }
            t.ne[d] = (int64_t)ne;
            count *= ne;
        }
        t.n_elem = (int64_t)count;
        if ((rc = rd(&c, &type, 4, what)))
            goto fail;
        t.type = (gguf_ttype)type;
        if (!gguf_type_block((int)type)) {
            rc = td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: %s has ggml type %u, unknown to this reader",
                        f->path, what, type);
            goto fail;
        }
        size_t row = gguf_row_bytes((int)type, t.ne[0]);
        if (!row && t.ne[0]) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: %s: a row of %lld elements is not whole %s blocks of %d",
                        f->path, what, (long long)t.ne[0], gguf_type_name((int)type), gguf_type_block((int)type));
            goto fail;
        }
        uint64_t rows = t.ne[0] ? count / (uint64_t)t.ne[0] : 0;
        if (row && rows > SIZE_MAX / row) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: %s is larger than the address space", f->path, what);
            goto fail;
        }
        t.nbytes = (size_t)(rows * row);
        if ((rc = rd(&c, &offs[k], 8, what)))
            goto fail;
        if (offs[k] % align) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: %s: data offset %llu is not a multiple of the alignment %u",
                        f->path, what, (unsigned long long)offs[k], align);
            goto fail;
        }
        t.file = fi;
        if ((rc = add_tensor(g, &t, f->path, err, errlen)))
            goto fail;
    }
    /* the data section starts at the next multiple of the alignment */
    size_t data = c.pos + (align - c.pos % align) % align;
    if (data > f->size) {
        if (n_t) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: truncated: the data section would start at %zu, past the "
                        "end of the file (%zu bytes)", f->path, data, f->size);
            goto fail;
        }
        data = f->size;
    }
    f->data_off = data;
    for (uint64_t k = 0; k < n_t; k++) {
        gguf_tensor *t = &g->t[first + (int)k];
        size_t avail = f->size - data;
        if (offs[k] > avail || t->nbytes > avail - offs[k]) {
            rc = td_err(err, errlen, TANDEM_EFORMAT,
                        "%s: tensor '%s' (%s, %zu bytes at data offset %llu) ends past the end of the file "
                        "(data section of %zu bytes; truncated?)",
                        f->path, t->name, gguf_type_name(t->type), t->nbytes, (unsigned long long)offs[k], avail);
            goto fail;
        }
        t->data = (const unsigned char *)f->map + data + offs[k];
    }
    free(offs);
    return 0;
fail:
    free(offs);
    return rc;
}

/* ---- open / close, splits ------------------------------------------------ */

int gguf_is_path(const char *path)
{
    size_t n = strlen(path);
    return n >= 5 && !strcasecmp(path + n - 5, ".gguf");
}

/* "PREFIX-00001-of-00003.gguf": the prefix length, k and n; 0 if not a split name. */
static int split_name(const char *path, size_t *prefix, int *k, int *n)
{
    size_t len = strlen(path);
    static const size_t tail = sizeof "-00001-of-00003.gguf" - 1;
    if (len < tail)
        return 0;
    const char *s = path + len - tail;
    for (int i = 0; i < (int)tail; i++) {
        char ch = s[i];
        int digit = (i >= 1 && i <= 5) || (i >= 10 && i <= 14);
        if (digit ? !isdigit((unsigned char)ch) : ch != "-00001-of-00003.gguf"[i])
            return 0;
    }
    *k = atoi(s + 1);
    *n = atoi(s + 10);
    *prefix = len - tail;
    return *k >= 1 && *n >= 1 && *k <= *n;
}

int gguf_open(gguf_file **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    gguf_file *g = calloc(1, sizeof *g);
    if (!g)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int rc;
    size_t prefix = 0;
    int k = 0, n = 1;
    char first[4096];
    if (strlen(path) >= sizeof first) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "GGUF path longer than %zu bytes", sizeof first - 1);
        goto fail;
    }
    int is_split = split_name(path, &prefix, &k, &n);
    if (is_split)
        snprintf(first, sizeof first, "%.*s-%05d-of-%05d.gguf", (int)prefix, path, 1, n);
    else
        snprintf(first, sizeof first, "%s", path);
    if ((rc = map_file(g, first, err, errlen)) || (rc = parse_split(g, 0, err, errlen)))
        goto fail;

    const gguf_kv *sc = gguf_find_kv(g, "split.count");
    uint64_t count = sc && sc->type != GGUF_V_ARR && sc->type != GGUF_V_STR ? sc->u : 1;
    if (sc && (count < 1 || count > GGUF_MAX_SPLITS)) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: split.count %llu is out of range", first,
                    (unsigned long long)count);
        goto fail;
    }
    if (!is_split && count > 1) {
        rc = td_err(err, errlen, TANDEM_EFORMAT,
                    "%s: this file is split %llu of %llu, but its name is not NAME-00001-of-%05llu.gguf; "
                    "rename the splits so they can be found",
                    first, (unsigned long long)1, (unsigned long long)count, (unsigned long long)count);
        goto fail;
    }
    if (is_split && (int)count != n) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: split.count is %llu but the name says %d files", first,
                    (unsigned long long)count, n);
        goto fail;
    }
    for (int i = 2; i <= (int)count; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%.*s-%05d-of-%05d.gguf", (int)prefix, path, i, n);
        if ((rc = map_file(g, p, err, errlen)) || (rc = parse_split(g, i - 1, err, errlen)))
            goto fail;
    }
    const gguf_kv *tc = gguf_find_kv(g, "split.tensors.count");
    if (tc && tc->type != GGUF_V_ARR && tc->type != GGUF_V_STR && tc->u != (uint64_t)g->n_t) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: split.tensors.count says %llu tensors, the %d split(s) hold %d",
                    first, (unsigned long long)tc->u, g->n_files, g->n_t);
        goto fail;
    }
    *out = g;
    return 0;
fail:
    gguf_close(g);
    return rc;
}

void gguf_close(gguf_file *g)
{
    if (!g)
        return;
    for (int i = 0; i < g->n_files; i++) {
        if (g->files[i].map)
            munmap(g->files[i].map, g->files[i].size);
        free(g->files[i].path);
    }
    for (int i = 0; i < g->n_own; i++)
        free(g->own[i]);
    free(g->own);
    free(g->files);
    free(g->t);
    io_names_free(&g->ix);
    io_names_free(&g->kv_ix);
    free(g);
}

uint32_t gguf_version(const gguf_file *g) { return g->version; }
const char *gguf_path(const gguf_file *g) { return g->n_files ? g->files[0].path : "?"; }

/* ---- metadata ------------------------------------------------------------ */

int gguf_n_kv(const gguf_file *g) { return g->n_kv; }
const gguf_kv *gguf_kv_at(const gguf_file *g, int i) { return i >= 0 && i < g->n_kv ? &g->kv[i] : NULL; }

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key) { return kv_find(g, key); }

const char *gguf_arch(const gguf_file *g)
{
    const gguf_kv *kv = gguf_find_kv(g, "general.architecture");
    return kv && kv->type == GGUF_V_STR ? kv->str : NULL;
}

static int is_int(int t)
{
    return t == GGUF_V_U8 || t == GGUF_V_I8 || t == GGUF_V_U16 || t == GGUF_V_I16 || t == GGUF_V_U32 ||
           t == GGUF_V_I32 || t == GGUF_V_U64 || t == GGUF_V_I64;
}
static int is_signed(int t) { return t == GGUF_V_I8 || t == GGUF_V_I16 || t == GGUF_V_I32 || t == GGUF_V_I64; }

/* The pair for key: 0 found, 1 absent (message written when !opt). */
static int find(const gguf_file *g, const char *key, int opt, const gguf_kv **kv, char *err, size_t errlen)
{
    *kv = gguf_find_kv(g, key);
    if (*kv)
        return 0;
    if (opt)
        return 1;
    return td_err(err, errlen, TANDEM_EFORMAT, "%s: metadata key '%s' is missing", gguf_path(g), key);
}

static int wrong(const gguf_file *g, const gguf_kv *kv, const char *want, char *err, size_t errlen)
{
    return td_err(err, errlen, TANDEM_EFORMAT, "%s: metadata key '%s' is %s%s, expected %s", gguf_path(g),
                  kv->key, kv->type == GGUF_V_ARR ? "an array of " : "a ",
                  vname(kv->type == GGUF_V_ARR ? (int)kv->arr_type : (int)kv->type), want);
}

/* Integer in [lo, hi] (hi as u64 for unsigned ranges). */
static int get_int(const gguf_file *g, const char *key, int opt, int64_t lo, uint64_t hi, int is_u, uint64_t *u,
                   int64_t *s, const char *want, char *err, size_t errlen)
{
    const gguf_kv *kv;
    int rc = find(g, key, opt, &kv, err, errlen);
    if (rc)
        return rc;
    if (!is_int(kv->type) && kv->type != GGUF_V_BOOL)
        return wrong(g, kv, want, err, errlen);
    if (is_signed(kv->type) ? (kv->i < lo || (kv->i > 0 && (uint64_t)kv->i > hi)) : kv->u > hi)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: metadata key '%s' = %lld is out of range for %s",
                      gguf_path(g), key, is_signed(kv->type) ? (long long)kv->i : (long long)kv->u, want);
    (void)is_u;
    *u = kv->u;
    *s = is_signed(kv->type) ? kv->i : (int64_t)kv->u;
    return 0;
}

static int u32_(const gguf_file *g, const char *key, int opt, uint32_t *out, char *err, size_t errlen)
{
    uint64_t u;
    int64_t s;
    int rc = get_int(g, key, opt, 0, UINT32_MAX, 1, &u, &s, "a u32", err, errlen);
    if (rc == 0)
        *out = (uint32_t)s;
    return rc;
}

static int i32_(const gguf_file *g, const char *key, int opt, int32_t *out, char *err, size_t errlen)
{
    uint64_t u;
    int64_t s;
    int rc = get_int(g, key, opt, INT32_MIN, INT32_MAX, 0, &u, &s, "an i32", err, errlen);
    if (rc == 0)
        *out = (int32_t)s;
    return rc;
}

static int f32_(const gguf_file *g, const char *key, int opt, float *out, char *err, size_t errlen)
{
    const gguf_kv *kv;
    int rc = find(g, key, opt, &kv, err, errlen);
    if (rc)
        return rc;
    if (kv->type != GGUF_V_F32 && kv->type != GGUF_V_F64 && !is_int(kv->type))
        return wrong(g, kv, "a number", err, errlen);
    *out = (float)kv->f;
    return 0;
}

static int str_(const gguf_file *g, const char *key, int opt, const char **out, char *err, size_t errlen)
{
    const gguf_kv *kv;
    int rc = find(g, key, opt, &kv, err, errlen);
    if (rc)
        return rc;
    if (kv->type != GGUF_V_STR)
        return wrong(g, kv, "a string", err, errlen);
    *out = kv->str;
    return 0;
}

static int bool_(const gguf_file *g, const char *key, int opt, int *out, char *err, size_t errlen)
{
    const gguf_kv *kv;
    int rc = find(g, key, opt, &kv, err, errlen);
    if (rc)
        return rc;
    if (kv->type != GGUF_V_BOOL && !is_int(kv->type))
        return wrong(g, kv, "a bool", err, errlen);
    *out = kv->u != 0 || kv->i != 0;
    return 0;
}

static int arr_(const gguf_file *g, const char *key, int opt, int elem, const gguf_kv **out, char *err,
                size_t errlen)
{
    const gguf_kv *kv;
    int rc = find(g, key, opt, &kv, err, errlen);
    if (rc)
        return rc;
    if (kv->type != GGUF_V_ARR || (elem >= 0 && (int)kv->arr_type != elem)) {
        char want[48];
        snprintf(want, sizeof want, "an array of %s", elem >= 0 ? vname(elem) : "anything");
        return wrong(g, kv, want, err, errlen);
    }
    *out = kv;
    return 0;
}

int gguf_get_str(const gguf_file *g, const char *k, const char **o, char *e, size_t n) { return str_(g, k, 0, o, e, n); }
int gguf_get_u32(const gguf_file *g, const char *k, uint32_t *o, char *e, size_t n) { return u32_(g, k, 0, o, e, n); }
int gguf_get_i32(const gguf_file *g, const char *k, int32_t *o, char *e, size_t n) { return i32_(g, k, 0, o, e, n); }
int gguf_get_f32(const gguf_file *g, const char *k, float *o, char *e, size_t n) { return f32_(g, k, 0, o, e, n); }
int gguf_get_bool(const gguf_file *g, const char *k, int *o, char *e, size_t n) { return bool_(g, k, 0, o, e, n); }
int gguf_get_arr(const gguf_file *g, const char *k, int el, const gguf_kv **o, char *e, size_t n)
{
    return arr_(g, k, 0, el, o, e, n);
}
int gguf_get_str_opt(const gguf_file *g, const char *k, const char **o, char *e, size_t n) { return str_(g, k, 1, o, e, n); }
int gguf_get_u32_opt(const gguf_file *g, const char *k, uint32_t *o, char *e, size_t n) { return u32_(g, k, 1, o, e, n); }
int gguf_get_i32_opt(const gguf_file *g, const char *k, int32_t *o, char *e, size_t n) { return i32_(g, k, 1, o, e, n); }
int gguf_get_f32_opt(const gguf_file *g, const char *k, float *o, char *e, size_t n) { return f32_(g, k, 1, o, e, n); }
int gguf_get_bool_opt(const gguf_file *g, const char *k, int *o, char *e, size_t n) { return bool_(g, k, 1, o, e, n); }
int gguf_get_arr_opt(const gguf_file *g, const char *k, int el, const gguf_kv **o, char *e, size_t n)
{
    return arr_(g, k, 1, el, o, e, n);
}

int gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out, char *err, size_t errlen)
{
    uint64_t u;
    int64_t s;
    int rc = get_int(g, key, 0, 0, UINT64_MAX, 1, &u, &s, "a u64", err, errlen);
    if (rc == 0)
        *out = u;
    return rc;
}

/* ---- array elements -------------------------------------------------------- */

/* float array elements read as integers saturate (NaN reads 0): a cast of a
 * value outside the integer's range would be undefined behaviour */
static int64_t f_to_i64(double f)
{
    if (f != f)
        return 0;
    if (f >= 9223372036854775808.0)
        return INT64_MAX;
    if (f <= -9223372036854775808.0)
        return INT64_MIN;
    return (int64_t)f;
}

static uint64_t f_to_u64(double f)
{
    if (!(f > 0))
        return 0;
    return f >= 18446744073709551616.0 ? UINT64_MAX : (uint64_t)f;
}

static int arr_elem(const gguf_kv *kv, uint64_t i, gguf_kv *e)
{
    if (kv->type != GGUF_V_ARR || i >= kv->arr_n || kv->arr_type == GGUF_V_STR || !kv->arr_data)
        return -1;
    memset(e, 0, sizeof *e);
    set_scalar(e, kv->arr_type, (const unsigned char *)kv->arr_data + i * vsize[kv->arr_type]);
    return 0;
}

int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i)
{
    gguf_kv e;
    if (arr_elem(kv, i, &e))
        return 0;
    return kv->arr_type == GGUF_V_F32 || kv->arr_type == GGUF_V_F64 ? f_to_i64(e.f) : e.i;
}

uint64_t gguf_arr_u64(const gguf_kv *kv, uint64_t i)
{
    gguf_kv e;
    if (arr_elem(kv, i, &e))
        return 0;
    return kv->arr_type == GGUF_V_F32 || kv->arr_type == GGUF_V_F64 ? f_to_u64(e.f) : e.u;
}

double gguf_arr_f64(const gguf_kv *kv, uint64_t i)
{
    gguf_kv e;
    return arr_elem(kv, i, &e) ? 0 : e.f;
}

const char *gguf_arr_str(const gguf_kv *kv, uint64_t i, size_t *len)
{
    if (kv->type != GGUF_V_ARR || kv->arr_type != GGUF_V_STR || i >= kv->arr_n || !kv->arr_strs)
        return NULL;
    if (len)
        *len = kv->arr_lens[i];
    return kv->arr_strs[i];
}

/* ---- tensors and files ----------------------------------------------------- */

int gguf_n_tensors(const gguf_file *g) { return g->n_t; }
const gguf_tensor *gguf_tensor_at(const gguf_file *g, int i) { return i >= 0 && i < g->n_t ? &g->t[i] : NULL; }
const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name) { return lookup(g, name, NULL); }

int gguf_n_files(const gguf_file *g) { return g->n_files; }
const char *gguf_file_path(const gguf_file *g, int file)
{
    return file >= 0 && file < g->n_files ? g->files[file].path : "?";
}

void gguf_file_stat(const gguf_file *g, int file, size_t *size, int64_t *mtime_ns, uint64_t *header_hash)
{
    const gguf_split *f = &g->files[file];
    const unsigned char *b = f->map;
    uint64_t h = 1469598103934665603ull; /* FNV-1a of everything before the data section */
    for (size_t i = 0; i < f->data_off; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    *size = f->size;
    *mtime_ns = f->mtime_ns;
    *header_hash = h;
}

void gguf_release(const gguf_file *g, const void *p, size_t n)
{
    const uintptr_t page = 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + n) & ~(page - 1);
    for (int i = 0; i < g->n_files; i++) {
        uintptr_t lo = (uintptr_t)g->files[i].map, hi = lo + g->files[i].size;
        if ((uintptr_t)p >= lo && (uintptr_t)p + n <= hi) {
            if (b > a)
                madvise((void *)a, b - a, MADV_DONTNEED);
            return;
        }
    }
}
