/*
 * test_core.c - the thread pool (work split, partitions, a job that runs
 * another, the thread count capped at the cores allowed), number conversions
 * and error helpers.
 */
#include "test.h"
#include "core/bf16.h"
#include "core/err.h"
#include "core/isa.h"
#include "core/log.h"
#include "core/pool.h"

#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    atomic_int *hits;
    atomic_int part_hits[4];
} count_ctx;

static void count_items(void *arg, int64_t b, int64_t e)
{
    count_ctx *c = arg;
    for (int64_t i = b; i < e; i++)
        atomic_fetch_add(&c->hits[i], 1);
}

static void count_parts(void *arg, int64_t b, int64_t e)
{
    count_ctx *c = arg;
    atomic_fetch_add(&c->part_hits[pool_part()], (int)(e - b));
}

/* A job whose items each run a job on the same pool: pool_run from inside a
 * job must run there and then, not wait for the pool its caller belongs to. */
typedef struct {
    pool *p;
    atomic_int *hits; /* [8][100] */
    int parts;        /* inner job: 0 = pool_run, 1 = pool_run_parts */
} nest_ctx;

static void nest_outer(void *arg, int64_t b, int64_t e)
{
    nest_ctx *n = arg;
    for (int64_t i = b; i < e; i++) {
        count_ctx c = { .hits = n->hits + i * 100 };
        if (n->parts) {
            pool_run_parts(n->p, 100, 7, count_parts, &c);
            atomic_fetch_add(&n->hits[i * 100], atomic_load(&c.part_hits[0]) == 100 &&
                                                    atomic_load(&c.part_hits[1]) == 100);
        } else {
            pool_run(n->p, 100, 7, count_items, &c);
        }
    }
}

static void test_nested(void)
{
    pool *p = NULL;
    char err[256];
    CHECKF(pool_create(&p, 2, 2, err, sizeof err) == 0, "%s", err);
    if (!p)
        return;
    atomic_int *hits = calloc(8 * 100, sizeof *hits);
    nest_ctx n = { p, hits, 0 };
    pool_run(p, 8, 1, nest_outer, &n);
    int bad = 0;
    for (int i = 0; i < 8 * 100; i++)
        bad += atomic_load(&hits[i]) != 1;
    CHECKF(bad == 0, "nested pool_run: %d items not run exactly once", bad);
    if (pool_nparts(p) == 2) {
        memset(hits, 0, 8 * 100 * sizeof *hits);
        n.parts = 1;
        pool_run(p, 8, 1, nest_outer, &n);
        bad = 0;
        for (int i = 0; i < 8; i++)
            bad += atomic_load(&hits[i * 100]) != 1;
        CHECKF(bad == 0, "nested pool_run_parts: %d of 8 did not run the range once per partition", bad);
    }
    free(hits);
    pool_free(p);
}

/* More threads than the cores sched_getaffinity allows: the pool has as many
 * as there are cores, and a warning names both numbers. */
static void test_thread_cap(void)
{
    cpu_set_t set;
    CHECK(sched_getaffinity(0, sizeof set, &set) == 0);
    const int ncpu = CPU_COUNT(&set);
    char path[] = "/tmp/tandem-test-log-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    fflush(stderr);
    int saved = dup(STDERR_FILENO), level = td_log_level();
    dup2(fd, STDERR_FILENO);
    td_log_set_level(TD_LOG_WARN);
    pool *p = NULL;
    char err[256] = "";
    int rc = pool_create(&p, ncpu + 3, 0, err, sizeof err);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    td_log_set_level(level);
    char log[1024] = "";
    ssize_t got = pread(fd, log, sizeof log - 1, 0);
    log[got > 0 ? got : 0] = 0;
    close(fd);
    unlink(path);
    CHECKF(rc == 0, "%s", err);
    CHECKF(p && pool_size(p) == ncpu, "pool of %d threads on %d cores", p ? pool_size(p) : -1, ncpu);
    char want_req[32], want_cores[64];
    snprintf(want_req, sizeof want_req, "%d requested", ncpu + 3);
    snprintf(want_cores, sizeof want_cores, "may run on %d core", ncpu);
    CHECKF(strstr(log, "warn") && strstr(log, want_req) && strstr(log, want_cores),
           "expected a warning naming %d and %d, got \"%s\"", ncpu + 3, ncpu, log);
    pool_free(p);
    /* at or below the cores: no warning needed, the count is kept */
    CHECK(pool_create(&p, ncpu, 0, err, sizeof err) == 0 && pool_size(p) == ncpu);
    pool_free(p);
}

TEST_GROUP(pool)
{
    enum { N = 10007 };
    atomic_int *hits = calloc(N, sizeof *hits);
    for (int threads = 1; threads <= 3; threads++) {
        pool *p = NULL;
        char err[256];
        CHECK(pool_create(&p, threads, 1, err, sizeof err) == 0);
        if (!p)
            continue;
        count_ctx c = { .hits = hits };
        for (int rep = 0; rep < 50; rep++) {
            memset(hits, 0, N * sizeof *hits);
            pool_run(p, N, rep % 7 + 1, count_items, &c);
            int bad = 0;
            for (int i = 0; i < N; i++)
                bad += atomic_load(&hits[i]) != 1;
            CHECKF(bad == 0, "threads=%d rep=%d: %d items not run exactly once", threads, rep, bad);
        }
        pool_free(p);
    }
    /* Two partitions on one node: each runs the whole range once. */
    pool *p = NULL;
    CHECK(pool_create(&p, 2, 2, NULL, 0) == 0);
    if (p) {
        CHECK(pool_nparts(p) == 2);
        count_ctx c = { .hits = hits };
        pool_run_parts(p, 1000, 3, count_parts, &c);
        CHECK(atomic_load(&c.part_hits[0]) == 1000);
        CHECK(atomic_load(&c.part_hits[1]) == 1000);
        pool_free(p);
    }
    char err[128];
    CHECK(pool_create(&p, 2, 5, err, sizeof err) == TANDEM_EINVAL);
    CHECK(strstr(err, "partitions") != NULL);
    free(hits);
    test_nested();
    test_thread_cap();
}

TEST_GROUP(convert)
{
    CHECK(bf16_to_f32(0x3f80) == 1.0f);
    CHECK(f32_to_bf16(1.0f) == 0x3f80);
    CHECK(f32_to_bf16(1.00390625f) == 0x3f80);   /* tie rounds to even */
    CHECK(f32_to_bf16(1.01171875f) == 0x3f82);   /* tie rounds to even (up) */
    CHECK(f16_to_f32(0x3c00) == 1.0f);
    CHECK(f16_to_f32(0xc000) == -2.0f);
    CHECK(f16_to_f32(0x0001) == 5.9604644775390625e-8f); /* smallest subnormal */
    CHECK(isinf(f16_to_f32(0x7c00)));
    CHECK(fp8e4m3_to_f32(0x38) == 1.0f);
    CHECK(fp8e4m3_to_f32(0x7e) == 448.0f);
    CHECK(fp8e4m3_to_f32(0x01) == 0.001953125f);
    CHECK(fp8e4m3_to_f32(0xb8) == -1.0f);
    CHECK(isnan(fp8e4m3_to_f32(0x7f)));
    /* every bf16 survives a round trip */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = bf16_to_f32((uint16_t)h);
        if (!isnan(f) && f32_to_bf16(f) != h)
            bad++;
    }
    CHECK(bad == 0);
}

TEST_GROUP(errors)
{
    char err[64];
    CHECK(td_err(err, sizeof err, TANDEM_EIO, "x %d", 3) == TANDEM_EIO);
    CHECK(!strcmp(err, "x 3"));
    td_err_prefix(err, sizeof err, TANDEM_EIO, "file.bin");
    CHECK(!strcmp(err, "file.bin: x 3"));
    char tiny[8];
    td_err(tiny, sizeof tiny, TANDEM_EIO, "a long message");
    td_err_prefix(tiny, sizeof tiny, TANDEM_EIO, "prefix-longer");
    CHECK(strlen(tiny) < sizeof tiny);
    CHECK(strcmp(isa_name(isa_detect()), "?") != 0);
    CHECK(isa_parse("avx512") == ISA_AVX512 && isa_parse("nope") == -1);
}
