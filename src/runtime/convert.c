/*
 * convert.c - `tandem convert`: the packed CPU experts of a model written to
 * disk once (moe_save per MoE layer), so that loading a large model maps them
 * (engine_pack_experts looks for the files) instead of re-quantising every
 * expert at each start. Also the placement printout of `tandem info`.
 */
#include "core/err.h"
#include "core/log.h"
#include "cpu/moe/moe.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void tandem_print_placement(const tandem_engine *e, void *out)
{
    hybrid_plan_print(e, (FILE *)out);
}

int tandem_convert_experts(const char *path, int fmt, int n_threads, char *err, size_t errlen)
{
    if (fmt < TANDEM_FMT_BF16 || fmt > TANDEM_FMT_INT4)
        return td_err(err, errlen, TANDEM_EINVAL, "convert: the format must be bf16, int8 or int4");
    tandem_engine_params p;
    tandem_engine_params_default(&p);
    p.gpu = 0;
    p.cpu_experts = fmt;
    p.n_threads = n_threads;
    tandem_engine *e = NULL;
    int rc = tandem_engine_open(path, &p, &e, err, errlen);
    if (rc)
        return rc;
    int written = 0;
    for (int l = 0; !rc && l < e->d.n_layer; l++) {
        if (!e->moe || !e->moe[l])
            continue;
        char file[1200], dir[1200];
        engine_packed_path(e, fmt, l, file, sizeof file);
        snprintf(dir, sizeof dir, "%s", file);
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = 0;
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot create: %s", dir, strerror(errno));
            break;
        }
        if (access(file, R_OK) == 0)
            continue; /* loaded from this very file: already converted */
        char tmp[1300];
        snprintf(tmp, sizeof tmp, "%s.tmp", file);
        rc = moe_save(e->moe[l], tmp, err, errlen);
        if (!rc && rename(tmp, file) != 0)
            rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot rename: %s", file, strerror(errno));
        written += !rc;
    }
    td_log(TD_LOG_INFO, "convert: %d layer file(s) written", written);
    tandem_engine_close(e);
    return rc;
}
