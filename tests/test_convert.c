/*
 * test_convert.c - `tandem convert` and the packs it writes: mapped packs
 * give bit-identical logits to experts packed at load, for each format; a
 * pack that does not belong to the checkpoint (another model's, a changed
 * checkpoint, a truncated or partly written one, shapes that disagree with
 * config.json) is refused with a message naming the file, never used; a cut
 * short conversion resumes; --repack and ignore_packs recover.
 */
#include "test.h"
#include "tandem.h"
#include "cuda/gpu.h"
#include "io/safetensors.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void params(tandem_engine_params *ep, int fmt)
{
    tandem_engine_params_default(ep);
    ep->n_threads = 2;
    ep->gpu = 0;
    ep->cpu_experts = fmt;
}

/* logits of a fixed prompt; rc of the first failing call, its message in err */
static int logits_of(const char *dir, const tandem_engine_params *ep, float *out, int *V, char *err, size_t errlen)
{
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    int rc = tandem_engine_open(dir, ep, &e, err, errlen);
    if (!rc)
        rc = tandem_session_create(e, NULL, &s, err, errlen);
    int32_t tok[6] = { 1, 5, 9, 2, 7, 3 }, pos[6] = { 0, 1, 2, 3, 4, 5 };
    tandem_batch b = { 6, tok, pos, NULL, NULL };
    if (!rc)
        rc = tandem_forward(s, &b, err, errlen);
    if (!rc) {
        *V = tandem_n_vocab(e);
        memcpy(out, tandem_logits(s, 0), (size_t)*V * sizeof *out);
    }
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc;
}

static int sh(const char *fmt, const char *a, const char *b)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    return system(cmd);
}

static int convert(const char *dir, int fmt, int repack, char *err, size_t errlen)
{
    tandem_engine_params ep;
    params(&ep, fmt);
    return tandem_convert_experts(dir, &ep, repack, err, errlen);
}

/* Flip one byte in the middle of an expert tensor of dir/model.safetensors,
 * keeping the file's size, header and modification time: only the sampled
 * bytes of the fingerprint can tell. */
static int change_expert_bytes(const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    st_set *st = NULL;
    char err[256];
    if (st_open(&st, path, err, sizeof err))
        return -1;
    const st_tensor *t = NULL;
    for (int i = 0; i < st_count(st) && !t; i++)
        if (strstr(st_at(st, i)->name, ".experts.3.up_proj.weight"))
            t = st_at(st, i);
    int rc = -1;
    struct stat sb;
    if (t && stat(path, &sb) == 0) {
        FILE *f = fopen(path, "r+b");
        char *buf = malloc((size_t)sb.st_size);
        if (f && buf && fread(buf, 1, (size_t)sb.st_size, f) == (size_t)sb.st_size) {
            size_t at = t->nbytes / 2 / 32 * 32;
            char *hit = memmem(buf, (size_t)sb.st_size, (const char *)t->data + at, 32);
            if (hit) {
                long off = (long)(hit - buf);
                unsigned char c = (unsigned char)buf[off] ^ 0x01u;
                rc = fseek(f, off, SEEK_SET) || fwrite(&c, 1, 1, f) != 1 ? -1 : 0;
            }
        }
        free(buf);
        if (f)
            fclose(f);
        struct timespec ts[2] = { sb.st_atim, sb.st_mtim };
        if (!rc)
            rc = utimensat(AT_FDCWD, path, ts, 0);
    }
    st_close(st);
    return rc;
}

static int contains(const char *s, const char *what) { return strstr(s, what) != NULL; }

TEST_GROUP(convert_experts)
{
    char dir[] = "/tmp/tandem-convert-XXXXXX", other[] = "/tmp/tandem-convert-other-XXXXXX";
    if (!mkdtemp(dir) || !mkdtemp(other)) {
        CHECKF(0, "mkdtemp failed");
        return;
    }
    CHECK(sh("cp tests/fixtures/qwen3_moe/config.json tests/fixtures/qwen3_moe/model.safetensors %s/%s", dir, "") == 0);
    CHECK(sh("cp tests/fixtures/mixtral/config.json tests/fixtures/mixtral/model.safetensors %s/%s", other, "") == 0);
    static float a[4096], b[4096];
    char err[1024];
    tandem_engine_params ep;
    const int fmts[] = { TANDEM_FMT_BF16, TANDEM_FMT_INT8, TANDEM_FMT_INT4 };
    for (int i = 0; i < 3; i++) {
        int V = 0;
        params(&ep, fmts[i]);
        CHECKF(logits_of(dir, &ep, a, &V, err, sizeof err) == 0, "%s", err);
        CHECKF(convert(dir, fmts[i], 0, err, sizeof err) == 0, "%s", err);
        CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
        CHECKF(V > 0 && memcmp(a, b, (size_t)V * sizeof *a) == 0, "format %d: logits differ after convert", fmts[i]);
    }
    CHECK(convert(dir, 7, 0, err, sizeof err) == TANDEM_EINVAL);
    int V = 0;
    params(&ep, TANDEM_FMT_INT4);
    CHECKF(logits_of(dir, &ep, a, &V, err, sizeof err) == 0, "%s", err); /* the good pack's logits */

    /* a pack of another model in the model directory */
    CHECK(sh("cp -r %s/packed-int4-p1 %s/", dir, other) == 0);
    int rc = logits_of(other, &ep, b, &V, err, sizeof err);
    CHECKF(rc == TANDEM_EFORMAT && contains(err, "manifest.txt") && contains(err, "another checkpoint"),
           "another model's pack: rc %d, '%s'", rc, err);

    /* shapes that disagree with config.json: `other` becomes a copy of this
     * model with its (valid) pack, then one layer file of mixtral's pack is put in */
    CHECK(sh("cp -p %s/config.json %s/", dir, other) == 0);
    CHECK(sh("cp -p %s/model.safetensors %s/", dir, other) == 0);
    {
        char mix[] = "/tmp/tandem-convert-mix-XXXXXX";
        CHECK(mkdtemp(mix) != NULL);
        CHECK(sh("cp tests/fixtures/mixtral/config.json tests/fixtures/mixtral/model.safetensors %s/%s", mix, "") == 0);
        CHECKF(convert(mix, TANDEM_FMT_INT4, 0, err, sizeof err) == 0, "%s", err);
        CHECK(sh("cp %s/packed-int4-p1/layer-2.bin %s/packed-int4-p1/layer-2.bin", mix, other) == 0);
        rc = logits_of(other, &ep, b, &V, err, sizeof err);
        CHECKF(rc == TANDEM_EFORMAT && contains(err, "layer-2.bin") && contains(err, "needs"),
               "a layer of other shapes: rc %d, '%s'", rc, err);
        sh("rm -rf %s%s", mix, "");
    }

    /* a truncated layer file */
    CHECK(sh("cp -r %s/packed-int4-p1 %s/saved-pack", dir, dir) == 0);
    CHECK(sh("truncate -s 5000 %s/packed-int4-p1/layer-2.bin%s", dir, "") == 0);
    rc = logits_of(dir, &ep, b, &V, err, sizeof err);
    CHECKF(rc == TANDEM_EFORMAT && contains(err, "layer-2.bin") && contains(err, "truncated"),
           "truncated pack: rc %d, '%s'", rc, err);

    /* a partly written pack (a layer missing) is refused, then convert resumes it */
    CHECK(sh("rm %s/packed-int4-p1/layer-2.bin%s", dir, "") == 0);
    rc = logits_of(dir, &ep, b, &V, err, sizeof err);
    CHECKF(rc == TANDEM_EFORMAT && contains(err, "incomplete"), "partial pack: rc %d, '%s'", rc, err);
    CHECKF(convert(dir, TANDEM_FMT_INT4, 0, err, sizeof err) == 0, "%s", err);
    CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
    CHECK(memcmp(a, b, (size_t)V * sizeof *a) == 0);
    /* a truncated layer left by a crash is re-packed by convert too */
    CHECK(sh("truncate -s 5000 %s/packed-int4-p1/layer-2.bin%s", dir, "") == 0);
    CHECKF(convert(dir, TANDEM_FMT_INT4, 0, err, sizeof err) == 0, "%s", err);
    CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
    CHECK(memcmp(a, b, (size_t)V * sizeof *a) == 0);

    /* the checkpoint changed under the pack (same size, header and mtime) */
    CHECK(change_expert_bytes(dir) == 0);
    rc = logits_of(dir, &ep, b, &V, err, sizeof err);
    CHECKF(rc == TANDEM_EFORMAT && contains(err, "layer ") && contains(err, "another checkpoint"),
           "changed checkpoint: rc %d, '%s'", rc, err);
    /* ignore_packs runs the new weights; --repack rebuilds and then agrees with it */
    ep.ignore_packs = 1;
    CHECKF(logits_of(dir, &ep, a, &V, err, sizeof err) == 0, "%s", err);
    ep.ignore_packs = 0;
    CHECK(convert(dir, TANDEM_FMT_INT4, 0, err, sizeof err) == TANDEM_EFORMAT);
    CHECKF(convert(dir, TANDEM_FMT_INT4, 1, err, sizeof err) == 0, "%s", err);
    CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
    CHECK(memcmp(a, b, (size_t)V * sizeof *a) == 0);

    sh("rm -rf %s %s", dir, other);
}

/* FP8 checkpoints pack straight from their E4M3 bytes: converted and mapped
 * back, the logits are those of packing at load. */
TEST_GROUP(convert_fp8)
{
    char dir[] = "/tmp/tandem-convert-fp8-XXXXXX";
    if (!mkdtemp(dir)) {
        CHECKF(0, "mkdtemp failed");
        return;
    }
    CHECK(sh("cp tests/fixtures/deepseek_v3_fp8/config.json tests/fixtures/deepseek_v3_fp8/model.safetensors %s/%s",
             dir, "") == 0);
    static float a[4096], b[4096];
    char err[1024];
    tandem_engine_params ep;
    int V = 0;
    params(&ep, TANDEM_FMT_INT4);
    CHECKF(logits_of(dir, &ep, a, &V, err, sizeof err) == 0, "%s", err);
    CHECKF(convert(dir, TANDEM_FMT_INT4, 0, err, sizeof err) == 0, "%s", err);
    CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
    CHECK(V > 0 && memcmp(a, b, (size_t)V * sizeof *a) == 0);
    sh("rm -rf %s%s", dir, "");
}

/* with a GPU: packs are the load path of hybrid engines too (GPU-held experts
 * masked out of a full pack), and the GPU takes F16/FP8/dummy matrices from
 * their views (hybrid.c up_mats) with no host copy */

static double max_rel_diff(const float *a, const float *b, int n)
{
    double m = 0, r = 0;
    for (int i = 0; i < n; i++) {
        double d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i], x = b[i] < 0 ? -b[i] : b[i];
        m = d > m ? d : m;
        r = x > r ? x : r;
    }
    return r > 0 ? m / r : m;
}

TEST_GROUP(convert_hybrid)
{
    char why[256];
    if (gpu_device_count(why, sizeof why) == 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "no GPU (%s)", why);
        SKIP("hybrid engines on packs and views", msg);
        return;
    }
    static const char *fixtures[] = { "qwen3_moe", "deepseek_v3_fp8" };
    static float a[4096], b[4096];
    char err[1024];
    for (int f = 0; f < 2; f++) {
        char dir[] = "/tmp/tandem-convert-gpu-XXXXXX";
        CHECK(mkdtemp(dir) != NULL);
        char src[256];
        snprintf(src, sizeof src, "tests/fixtures/%s", fixtures[f]);
        CHECK(sh("cp %s/config.json %s/", src, dir) == 0);
        CHECK(sh("cp %s/model.safetensors %s/", src, dir) == 0);
        tandem_engine_params ep;
        params(&ep, TANDEM_FMT_INT4);
        ep.gpu = 1;
        ep.gpu_experts = 2;
        int V = 0;
        CHECKF(logits_of(dir, &ep, a, &V, err, sizeof err) == 0, "%s: %s", fixtures[f], err);
        CHECKF(convert(dir, TANDEM_FMT_INT4, 0, err, sizeof err) == 0, "%s", err);
        CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s: %s", fixtures[f], err);
        CHECKF(V > 0 && memcmp(a, b, (size_t)V * sizeof *a) == 0, "%s: hybrid logits differ on the pack",
               fixtures[f]);
        /* the same model on the CPU alone: the GPU's matrices came from the views */
        params(&ep, TANDEM_FMT_INT4);
        CHECKF(logits_of(dir, &ep, b, &V, err, sizeof err) == 0, "%s", err);
        double d = max_rel_diff(a, b, V); /* the bound of test_gpu's bf16 end-to-end modes */
        CHECKF(d < 3e-2, "%s: hybrid vs CPU max rel diff %.3g", fixtures[f], d);
        sh("rm -rf %s%s", dir, "");
    }
    /* dummy weights: generated for the upload, packed for the CPU, no BF16 copy; GPU vs CPU agree */
    tandem_engine_params ep;
    params(&ep, TANDEM_FMT_BF16);
    ep.dummy_weights = 1;
    int V = 0;
    CHECKF(logits_of("tests/fixtures/qwen3_moe", &ep, b, &V, err, sizeof err) == 0, "%s", err);
    ep.gpu = 1;
    ep.gpu_experts = 3;
    CHECKF(logits_of("tests/fixtures/qwen3_moe", &ep, a, &V, err, sizeof err) == 0, "%s", err);
    double d = max_rel_diff(a, b, V);
    CHECKF(d < 3e-2, "dummy weights: hybrid vs CPU max rel diff %.3g", d);
}
