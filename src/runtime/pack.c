/*
 * pack.c - the fingerprint that ties a pack directory (`tandem convert`) to
 * the checkpoint it was made from, so that a pack of another model, or one
 * left over after the checkpoint changed, is refused instead of silently
 * giving the old model's output.
 *
 * manifest.txt is plain text, one "key value..." line each:
 *   tandem-pack 1
 *   format int4
 *   partitions 1
 *   arch DeepseekV3ForCausalLM
 *   shape <n_layer> <n_expert> <d_model> <d_ff_expert>
 *   config <FNV-1a of config.json>
 *   file <name> <size> <mtime ns> <header hash>      (one per shard)
 *   layer <l> <hash of sampled expert bytes>          (one per MoE layer)
 * The sampled bytes are 32 at a quarter, half and three quarters of every
 * expert tensor (gate, up, down) and of its FP8 or INT4 scales: a rewritten shard
 * with the same header and size but new weights is still caught, at the
 * cost of a few pages read per tensor (released again with the layer).
 * A line that differs is named in the error with both values.
 * A pack made from a GGUF file lies beside it (FILE.gguf.packed-...) and
 * takes the same fingerprint: "config" is the hash of the first split's
 * header (metadata and tensor infos), "file" lines are the splits.
 */
#include "core/err.h"
#include "cpu/moe/moe.h"
#include "runtime/engine.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PACK_VERSION 1
#define MANIFEST "manifest.txt"

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}
#define FNV0 1469598103934665603ull

static uint64_t sample(uint64_t h, const void *p, size_t n)
{
    if (!p || !n)
        return h;
    for (int q = 1; q <= 3; q++) {
        size_t at = n * (size_t)q / 4 / 32 * 32, len = n - at < 32 ? n - at : 32;
        h = fnv(h, (const char *)p + at, len);
    }
    return h;
}

static uint64_t layer_hash(const tandem_engine *e, int l)
{
    const layer_weights *L = &e->layers[l];
    uint64_t h = FNV0;
    for (int x = 0; x < e->d.n_expert; x++) {
        const mat *m[3] = { &L->exp_gate[x], &L->exp_up[x], &L->exp_down[x] };
        for (int w = 0; w < 3; w++) {
            /* mat_data_bytes: a packed INT4 view is half a byte per weight, its scales bf16 */
            h = sample(h, m[w]->data, mat_data_bytes(m[w]));
            if (m[w]->scale)
                h = sample(h, m[w]->scale, mat_scale_bytes(m[w]));
            else if (m[w]->scale_bf16)
                h = sample(h, m[w]->scale_bf16, mat_scale_bytes(m[w]));
        }
    }
    return h;
}

/* config.json's hash; for a GGUF file, the hash of its first split's header
 * (metadata and tensor infos: what config.json is to a directory) */
static int config_hash(const tandem_engine *e, uint64_t *out, char *err, size_t errlen)
{
    if (e->gg) {
        size_t size;
        int64_t mtime;
        gguf_file_stat(e->gg, 0, &size, &mtime, out);
        return 0;
    }
    char path[1100];
    snprintf(path, sizeof path, "%s/config.json", e->path);
    FILE *f = fopen(path, "rb");
    if (!f)
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
    uint64_t h = FNV0;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        h = fnv(h, buf, n);
    fclose(f);
    *out = h;
    return 0;
}

/* the manifest e's checkpoint would have, as text (malloc'd) */
static char *manifest_text(const tandem_engine *e, int fmt, char *err, size_t errlen)
{
    uint64_t ch;
    if (config_hash(e, &ch, err, errlen))
        return NULL;
    int n_files = e->gg ? gguf_n_files(e->gg) : st_n_files(e->st);
    size_t cap = 4096 + (size_t)n_files * 1200 + (size_t)e->d.n_layer * 48, n = 0;
    char *t = malloc(cap);
    if (!t) {
        td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
        return NULL;
    }
    const model_desc *d = &e->d;
    n += (size_t)snprintf(t + n, cap - n, "tandem-pack %d\nformat %s\npartitions %d\narch %s\nshape %d %d %d %d\n",
                          PACK_VERSION, engine_fmt_name(fmt), pool_nparts(e->pool), d->arch_name, d->n_layer,
                          d->n_expert, d->d_model, d->d_ff_expert);
    n += (size_t)snprintf(t + n, cap - n, "config %016" PRIx64 "\n", ch);
    for (int i = 0; i < n_files; i++) {
        size_t size;
        int64_t mtime;
        uint64_t hh;
        const char *path = e->gg ? gguf_file_path(e->gg, i) : st_file_path(e->st, i);
        if (e->gg)
            gguf_file_stat(e->gg, i, &size, &mtime, &hh);
        else
            st_file_stat(e->st, i, &size, &mtime, &hh);
        const char *name = strrchr(path, '/');
        name = name ? name + 1 : path;
        n += (size_t)snprintf(t + n, cap - n, "file %s %zu %" PRId64 " %016" PRIx64 "\n", name, size, mtime, hh);
    }
    for (int l = 0; l < d->n_layer; l++)
        if (d->layer_moe[l])
            n += (size_t)snprintf(t + n, cap - n, "layer %d %016" PRIx64 "\n", l, layer_hash(e, l));
    return t;
}

int pack_write_manifest(const tandem_engine *e, int fmt, const char *dir, char *err, size_t errlen)
{
    char *t = manifest_text(e, fmt, err, errlen);
    if (!t)
        return TANDEM_ENOMEM;
    char path[1300], tmp[1310];
    snprintf(path, sizeof path, "%s/%s", dir, MANIFEST);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    int bad = !f || fputs(t, f) < 0;
    if (f && fclose(f) != 0)
        bad = 1;
    free(t);
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot write: %s", path, strerror(errno));
    }
    return 0;
}

/* the first line where the two manifests differ, into err */
static int first_difference(const char *have, const char *want, const char *path, char *err, size_t errlen)
{
    while (*have || *want) {
        const char *he = strchr(have, '\n'), *we = strchr(want, '\n');
        size_t hl = he ? (size_t)(he - have) : strlen(have), wl = we ? (size_t)(we - want) : strlen(want);
        if (hl != wl || memcmp(have, want, hl)) {
            return td_err(err, errlen, TANDEM_EFORMAT,
                          "%s: this pack was made from another checkpoint or config: it records '%.*s' where this "
                          "model has '%.*s'; rebuild it with `tandem convert --repack` (or run without it)",
                          path, (int)(hl > 200 ? 200 : hl), have, (int)(wl > 200 ? 200 : wl), want);
        }
        have += hl + (he != NULL);
        want += wl + (we != NULL);
    }
    return 0;
}

int pack_manifest_matches(const tandem_engine *e, int fmt, const char *dir, char *err, size_t errlen)
{
    char path[1300];
    snprintf(path, sizeof path, "%s/%s", dir, MANIFEST);
    FILE *f = fopen(path, "rb");
    if (!f) {
        td_err(err, errlen, TANDEM_EFORMAT,
               "%s: no manifest: a pack written by an older tandem or cut short; rebuild it with "
               "`tandem convert --repack`",
               path);
        return 0;
    }
    char *have = NULL;
    size_t cap = 0, n = 0, r;
    char buf[65536];
    while ((r = fread(buf, 1, sizeof buf, f)) > 0) {
        if (n + r + 1 > cap) {
            cap = (n + r + 1) * 2;
            char *nh = realloc(have, cap);
            if (!nh)
                break;
            have = nh;
        }
        memcpy(have + n, buf, r);
        n += r;
    }
    fclose(f);
    if (!have) {
        td_err(err, errlen, TANDEM_EFORMAT, "%s: empty manifest", path);
        return 0;
    }
    have[n] = 0;
    char *want = manifest_text(e, fmt, err, errlen);
    int ok = want && first_difference(have, want, path, err, errlen) == 0;
    free(have);
    free(want);
    return ok;
}

int pack_check(tandem_engine *e, int fmt, char *err, size_t errlen)
{
    e->pack_state = PACK_NONE;
    if ((!e->st && !e->gg) || e->params.ignore_packs)
        return 0; /* dummy weights have no checkpoint a pack could belong to */
    char dir[1200];
    engine_pack_dir(e, fmt, dir, sizeof dir);
    struct stat st;
    if (stat(dir, &st) != 0)
        return 0;
    if (!pack_manifest_matches(e, fmt, dir, err, errlen))
        return TANDEM_EFORMAT;
    for (int l = 0; l < e->d.n_layer; l++) {
        if (!e->d.layer_moe[l])
            continue;
        char path[1300];
        engine_packed_path(e, fmt, l, path, sizeof path);
        if (access(path, R_OK) != 0)
            return td_err(err, errlen, TANDEM_EFORMAT,
                          "%s: missing: the pack in %s is incomplete (a `tandem convert` cut short?); finish it by "
                          "running `tandem convert` again, or run with --ignore-packs",
                          path, dir);
    }
    e->pack_state = PACK_OK;
    return 0;
}
