/*
 * moe_file.c - packed experts on disk (`tandem convert`): a file holds one
 * op's partition buffers byte for byte, so opening it costs an mmap instead
 * of a re-pack.
 *
 * Layout (little-endian; the packed data is the in-memory layout of
 * moe_impl.h and is only valid for that layout version):
 *   [0, 4096)        header: magic "TDMOEPK1", version, shape, format, group,
 *                    partitions, their slices and byte counts, buffer offsets,
 *                    a checksum of the header
 *   [4096, ...)      int32 slot[n_expert] (index among held experts, or -1)
 *   page-aligned     partition 0 buffer, partition 1 buffer, ...
 * Invariants checked on open: magic, version, checksum, every field against
 * the layout recomputed from the shape (so a file from another layout
 * version or a corrupted one is refused with a message, never read out of
 * bounds), file size, slot table range. The partition count is part of the
 * layout: the pool given to open must have as many partitions.
 * With one NUMA node the buffers are mapped read-only; with several, each
 * partition is read into memory on its node.
 */
#include "cpu/moe/moe_impl.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MOE_FILE_MAGIC "TDMOEPK1"
#define MOE_FILE_VERSION 1
#define HDR_BYTES 4096
#define PAGE 4096

typedef struct {
    char magic[8];
    uint32_t version, header_bytes;
    int32_t fmt, group, n_expert, d_model, d_ff, nparts, n_held, kalign, kp, np, ffpad, pad0;
    int32_t slice[MOE_MAX_PARTS][4];        /* lo, hi, pad, off */
    uint64_t exp_bytes[MOE_MAX_PARTS];
    uint64_t buf_off[MOE_MAX_PARTS], buf_bytes[MOE_MAX_PARTS];
    uint64_t file_bytes;
    uint64_t checksum;                       /* FNV-1a of the bytes above */
} file_hdr;

_Static_assert(sizeof(file_hdr) <= HDR_BYTES, "header fits its page");

static uint64_t fnv1a(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t align_page(uint64_t x) { return (x + PAGE - 1) / PAGE * PAGE; }

static void fill_hdr(const struct moe_op *op, file_hdr *h)
{
    memset(h, 0, sizeof *h);
    memcpy(h->magic, MOE_FILE_MAGIC, 8);
    h->version = MOE_FILE_VERSION;
    h->header_bytes = HDR_BYTES;
    h->fmt = op->fmt;
    h->group = op->group;
    h->n_expert = op->n_expert;
    h->d_model = op->d_model;
    h->d_ff = op->d_ff;
    h->nparts = op->nparts;
    h->n_held = op->n_held;
    h->kalign = op->kalign;
    h->kp = op->kp;
    h->np = op->np;
    h->ffpad = op->ffpad;
    uint64_t at = align_page(HDR_BYTES + (uint64_t)op->n_expert * 4);
    for (int p = 0; p < op->nparts; p++) {
        h->slice[p][0] = op->sl[p].lo;
        h->slice[p][1] = op->sl[p].hi;
        h->slice[p][2] = op->sl[p].pad;
        h->slice[p][3] = op->sl[p].off;
        h->exp_bytes[p] = op->exp_bytes[p];
        h->buf_off[p] = at;
        h->buf_bytes[p] = (uint64_t)op->n_held * op->exp_bytes[p];
        at = align_page(at + h->buf_bytes[p]);
    }
    h->file_bytes = at;
    h->checksum = fnv1a(h, offsetof(file_hdr, checksum));
}

static int write_all(int fd, const void *p, size_t n, uint64_t off)
{
    const uint8_t *b = p;
    while (n) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = pwrite(fd, b, chunk, (off_t)off);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return -1;
        }
        b += w, off += (uint64_t)w, n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n, uint64_t off)
{
    uint8_t *b = p;
    while (n) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t r = pread(fd, b, chunk, (off_t)off);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return -1;
        }
        b += r, off += (uint64_t)r, n -= (size_t)r;
    }
    return 0;
}

int moe_save(const moe_op *op, const char *path, char *err, size_t errlen)
{
    if (!op || !path)
        return td_err(err, errlen, TANDEM_EINVAL, "moe_save: missing op or path");
    file_hdr *h = calloc(1, HDR_BYTES);
    if (!h)
        return td_err(err, errlen, TANDEM_ENOMEM, "moe_save: out of memory");
    fill_hdr(op, h);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        free(h);
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    int bad = write_all(fd, h, HDR_BYTES, 0) || write_all(fd, op->slot, (size_t)op->n_expert * 4, HDR_BYTES);
    for (int p = 0; p < op->nparts && !bad; p++)
        if (h->buf_bytes[p])
            bad = write_all(fd, op->buf[p], h->buf_bytes[p], h->buf_off[p]);
    if (!bad && ftruncate(fd, (off_t)h->file_bytes) != 0)
        bad = 1;
    int e = errno;
    if (close(fd) != 0 && !bad)
        bad = 1, e = errno;
    free(h);
    if (bad) {
        unlink(path);
        return td_err(err, errlen, TANDEM_EIO, "%s: write failed: %s", path, strerror(e));
    }
    return 0;
}

/* the header against the layout recomputed from its own shape fields */
static int check_hdr(const file_hdr *h, const struct moe_op *op, uint64_t size, const char *path, char *err,
                     size_t errlen)
{
    if (h->file_bytes > size)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: truncated: %llu bytes, the header says %llu", path,
                      (unsigned long long)size, (unsigned long long)h->file_bytes);
    int ok = h->kalign == op->kalign && h->kp == op->kp && h->np == op->np && h->ffpad == op->ffpad &&
             h->n_held >= 0 && h->n_held <= op->n_expert;
    uint64_t at = align_page(HDR_BYTES + (uint64_t)op->n_expert * 4);
    for (int p = 0; p < op->nparts && ok; p++) {
        const moe_slice *s = &op->sl[p];
        ok = h->slice[p][0] == s->lo && h->slice[p][1] == s->hi && h->slice[p][2] == s->pad &&
             h->slice[p][3] == s->off && h->exp_bytes[p] == op->exp_bytes[p] && h->buf_off[p] == at &&
             h->buf_bytes[p] == (uint64_t)h->n_held * op->exp_bytes[p];
        at = align_page(at + h->buf_bytes[p]);
    }
    if (!ok || at != h->file_bytes)
        return td_err(err, errlen, TANDEM_EFORMAT,
                      "%s: the packed layout in the file does not match this build's layout for its shape "
                      "(written by another version?); re-pack with tandem convert", path);
    return 0;
}

int moe_open_packed(moe_op **out, const char *path, pool *p, int isa, char *err, size_t errlen)
{
    *out = NULL;
    if (!path || !p)
        return td_err(err, errlen, TANDEM_EINVAL, "moe_open_packed: missing path or pool");
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    file_hdr h;
    struct moe_op *op = calloc(1, sizeof *op);
    int rc = 0;
    if (!op) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "moe: out of memory");
        goto fail;
    }
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < HDR_BYTES || read_all(fd, &h, sizeof h, 0)) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: too short for a packed-experts header", path);
        goto fail;
    }
    if (memcmp(h.magic, MOE_FILE_MAGIC, 8) || h.version != MOE_FILE_VERSION || h.header_bytes != HDR_BYTES) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: not a tandem packed-experts file (version %u)", path,
                    MOE_FILE_VERSION);
        goto fail;
    }
    if (h.checksum != fnv1a(&h, offsetof(file_hdr, checksum))) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: header checksum mismatch (corrupted file)", path);
        goto fail;
    }
    if (h.nparts != pool_nparts(p)) {
        rc = td_err(err, errlen, TANDEM_EUNSUPPORTED,
                    "%s: packed for %d pool partitions, this pool has %d; re-pack with a matching pool", path,
                    h.nparts, pool_nparts(p));
        goto fail;
    }
    moe_desc d = { .n_expert = h.n_expert, .d_model = h.d_model, .d_ff = h.d_ff, .fmt = h.fmt, .group = h.group };
    rc = moe_check_desc(&d, p, isa < 0 ? isa_current() : isa, op, err, errlen);
    if (rc) {
        td_err_prefix(err, errlen, rc, path);
        goto fail;
    }
    moe_layout(op);
    if ((rc = check_hdr(&h, op, (uint64_t)st.st_size, path, err, errlen)))
        goto fail;
    op->n_held = h.n_held;
    op->slot = malloc((size_t)op->n_expert * 4);
    if (!op->slot || read_all(fd, op->slot, (size_t)op->n_expert * 4, HDR_BYTES)) {
        rc = td_err(err, errlen, op->slot ? TANDEM_EIO : TANDEM_ENOMEM, "%s: cannot read the expert table", path);
        goto fail;
    }
    for (int e = 0; e < op->n_expert; e++)
        if (op->slot[e] < -1 || op->slot[e] >= op->n_held) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: expert %d has slot %d (of %d held)", path, e, op->slot[e],
                        op->n_held);
            goto fail;
        }
    int nodes = numa_available() >= 0 ? numa_num_configured_nodes() : 1;
    if (nodes > 1 && op->nparts == nodes) {
        for (int q = 0; q < op->nparts; q++) {
            op->buf_bytes[q] = h.buf_bytes[q];
            if (!op->buf_bytes[q])
                continue;
            op->buf[q] = numa_alloc_onnode(op->buf_bytes[q], q);
            op->buf_kind[q] = MOE_BUF_NUMA;
            if (!op->buf[q] || read_all(fd, op->buf[q], op->buf_bytes[q], h.buf_off[q])) {
                rc = td_err(err, errlen, op->buf[q] ? TANDEM_EIO : TANDEM_ENOMEM, "%s: cannot load partition %d",
                            path, q);
                goto fail;
            }
        }
    } else {
        op->map = mmap(NULL, h.file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
        if (op->map == MAP_FAILED) {
            op->map = NULL;
            rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot map: %s", path, strerror(errno));
            goto fail;
        }
        op->map_len = h.file_bytes;
        for (int q = 0; q < op->nparts; q++) {
            op->buf_bytes[q] = h.buf_bytes[q];
            op->buf[q] = h.buf_bytes[q] ? (uint8_t *)op->map + h.buf_off[q] : NULL;
            op->buf_kind[q] = MOE_BUF_MAP;
        }
    }
    close(fd);
    moe_pick_kernels(op);
    *out = op;
    return 0;
fail:
    close(fd);
    moe_free(op);
    return rc;
}
