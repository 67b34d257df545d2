/*
 * convert.c - `tandem convert`: the packed CPU experts of a model written to
 * disk once (moe_save per MoE layer, with pack.c's manifest), so that loading
 * a large model maps them instead of re-quantising every expert at each
 * start. It packs one layer at a time from the checkpoint's own dtype and
 * frees it once written, so converting needs about one layer's packed bytes
 * beside the non-expert weights, whatever the model's size. Also the
 * placement printout of `tandem info`.
 */
#include "core/err.h"
#include "core/log.h"
#include "cpu/moe/moe.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void tandem_print_placement(const tandem_engine *e, void *out)
{
    hybrid_plan_print(e, (FILE *)out);
}

/* remove the layer files and manifest of a pack directory (--repack) */
static void clear_pack(const tandem_engine *e, int fmt, const char *dir)
{
    for (int l = 0; l < e->d.n_layer; l++) {
        char file[1200];
        engine_packed_path(e, fmt, l, file, sizeof file);
        unlink(file);
    }
    char m[1300];
    snprintf(m, sizeof m, "%s/manifest.txt", dir);
    unlink(m);
}

/* a layer file already written by an earlier run, readable and of the right shape */
static int layer_done(tandem_engine *e, int fmt, int l)
{
    char file[1200], why[512];
    engine_packed_path(e, fmt, l, file, sizeof file);
    if (access(file, R_OK) != 0)
        return 0;
    e->pack_state = PACK_OK;
    moe_op *op = NULL;
    int rc = experts_cpu_op(e, l, NULL, fmt, 0, &op, why, sizeof why);
    e->pack_state = PACK_NONE;
    moe_free(op);
    if (rc)
        td_log(TD_LOG_WARN, "convert: %s", why);
    return rc == 0;
}

int tandem_convert_experts(const char *path, const tandem_engine_params *pp, int repack, char *err, size_t errlen)
{
    int fmt = pp->cpu_experts;
    if (fmt != TANDEM_FMT_BF16 && fmt != TANDEM_FMT_INT8 && fmt != TANDEM_FMT_INT4 && fmt != TANDEM_FMT_FP8)
        return td_err(err, errlen, TANDEM_EINVAL, "convert: the format must be bf16, int8, int4 or fp8");
    if (pp->dummy_weights)
        return td_err(err, errlen, TANDEM_EINVAL, "convert: dummy weights have no checkpoint to pack");
    tandem_engine_params p = *pp;
    p.gpu = 0;
    p.ignore_packs = 1;
    tandem_engine *e = NULL;
    int rc = engine_open(path, &p, 0, &e, err, errlen);
    if (rc)
        return rc;
    char dir[1200];
    engine_pack_dir(e, fmt, dir, sizeof dir);
    struct stat st;
    int exists = stat(dir, &st) == 0;
    if (!exists && mkdir(dir, 0755) != 0)
        rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot create: %s", dir, strerror(errno));
    char mpath[1300];
    snprintf(mpath, sizeof mpath, "%s/manifest.txt", dir);
    if (!rc && exists && access(mpath, R_OK) == 0 && !pack_manifest_matches(e, fmt, dir, err, errlen)) {
        if (!repack)
            rc = TANDEM_EFORMAT; /* the message names the line that differs */
        else
            td_log(TD_LOG_WARN, "convert: %s was made from another checkpoint: rebuilding it", dir);
    }
    if (!rc && (repack || access(mpath, R_OK) != 0))
        clear_pack(e, fmt, dir); /* layers without a manifest cannot be trusted either */
    if (!rc && access(mpath, R_OK) != 0)
        rc = pack_write_manifest(e, fmt, dir, err, errlen);
    int written = 0, kept = 0, n_moe = e->d.n_layer_moe, done = 0;
    double bytes = 0;
    for (int l = 0; !rc && l < e->d.n_layer; l++) {
        if (!e->d.layer_moe[l])
            continue;
        for (int x = 0; x < e->d.n_expert; x++)
            bytes += (double)experts_source_bytes(e, l, x);
        if (layer_done(e, fmt, l)) {
            kept++;
        } else {
            char file[1200], tmp[1300];
            engine_packed_path(e, fmt, l, file, sizeof file);
            snprintf(tmp, sizeof tmp, "%s.tmp", file);
            moe_op *op = NULL;
            rc = experts_cpu_op(e, l, NULL, fmt, 0, &op, err, errlen);
            if (!rc)
                rc = moe_save(op, tmp, err, errlen);
            if (!rc && rename(tmp, file) != 0)
                rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot rename: %s", file, strerror(errno));
            moe_free(op);
            written += !rc;
        }
        done++;
        if (p.progress)
            p.progress("packing", (float)done / (float)(n_moe ? n_moe : 1), bytes, p.progress_user);
    }
    if (!rc)
        td_log(TD_LOG_INFO, "convert: %s: %d layer file(s) written, %d kept from an earlier run", dir, written, kept);
    tandem_engine_close(e);
    return rc;
}
