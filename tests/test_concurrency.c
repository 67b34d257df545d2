/*
 * test_concurrency.c - one engine, many threads. tandem.h lets sessions share
 * an engine, and the engine's one thread pool serialises their jobs
 * (src/core/pool.c): here THREADS threads run SESSIONS sessions each on one
 * engine (the demo model, CPU only), every session a prefill and a few decode
 * steps of a fixed script, and every logit must equal, bit for bit, the one
 * the same session shape gave running alone. Threads sharing a bare pool are
 * checked first, item by item. `make test-tsan` runs this group under
 * ThreadSanitizer, so its size is kept to what TSan gets through in seconds.
 */
#include "test.h"
#include "core/pool.h"
#include "tandem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEMO "models/demo"

enum {
    THREADS = 3,   /* callers, on top of the pool's own workers */
    SESSIONS = 2,  /* per thread */
    ROUNDS = 10,   /* scripts per session (its KV cleared between) */
    PROMPT = 12,   /* prompt tokens */
    STEPS = 3,     /* decode steps after the prompt */
    N_SHAPE = 2,
    N_LOGITS = 1 + STEPS /* after the prompt, then after each step */
};

/* ---- threads sharing a bare pool ------------------------------------------------ */

typedef struct {
    pool *p;
    int bad, id;
} pool_thread;

typedef struct {
    atomic_int *hits;
    int owner;
} hit_ctx;

static void hit_items(void *arg, int64_t b, int64_t e)
{
    hit_ctx *c = arg;
    for (int64_t i = b; i < e; i++)
        atomic_fetch_add(&c->hits[i], 1 + c->owner);
}

/* Each thread runs its own jobs on the shared pool: every item of every job
 * must be run exactly once, for that job (the count adds the owner's id). */
static void *pool_main(void *arg)
{
    pool_thread *t = arg;
    enum { N = 3001 };
    atomic_int *hits = calloc(N, sizeof *hits);
    hit_ctx c = { hits, t->id };
    for (int rep = 0; rep < 200 && hits; rep++) {
        for (int i = 0; i < N; i++)
            atomic_store_explicit(&hits[i], 0, memory_order_relaxed);
        pool_run(t->p, N, 1 + rep % 5, hit_items, &c);
        for (int i = 0; i < N; i++)
            t->bad += atomic_load_explicit(&hits[i], memory_order_relaxed) != 1 + t->id;
    }
    free(hits);
    return NULL;
}

static void test_shared_pool(void)
{
    pool *p = NULL;
    char err[256];
    CHECKF(pool_create(&p, 2, 1, err, sizeof err) == 0, "%s", err);
    if (!p)
        return;
    pthread_t th[THREADS];
    pool_thread t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        t[i] = (pool_thread){ p, 0, i };
        CHECK(pthread_create(&th[i], NULL, pool_main, &t[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        CHECKF(t[i].bad == 0, "shared pool, thread %d: %d items not run exactly once by their own job", i,
               t[i].bad);
    }
    pool_free(p);
}

/* ---- sessions of one engine --------------------------------------------------- */

/* Two session shapes: different batch and context sizes take the prompt in
 * different pieces, so the threads run different jobs side by side. */
static const struct {
    int n_batch, n_ctx;
} shape[N_SHAPE] = { { 16, 64 }, { 5, 32 } };

static int32_t script_token(int i) { return (int32_t)((i * 733 + 101) % 4000); } /* < the demo's 4096 */

/* Run the script on a fresh KV: the prompt in pieces of n_batch, then STEPS
 * single-token steps; the logits after each part go to out[N_LOGITS][V]
 * (when out is not NULL) or are compared with ref (mismatches counted). */
static int run_script(tandem_session *s, int n_batch, int V, float *out, const float *ref, int *mismatch,
                      char *err, size_t errlen)
{
    int rc = tandem_kv_clear(s, 0);
    int32_t tok[PROMPT], pos[PROMPT];
    for (int i = 0; i < PROMPT + STEPS && !rc; i++) {
        int n = 1, last = i;
        if (i < PROMPT) { /* a piece of the prompt */
            n = PROMPT - i < n_batch ? PROMPT - i : n_batch;
            last = i + n - 1;
        }
        for (int j = 0; j < n; j++) {
            tok[j] = script_token(i + j);
            pos[j] = i + j;
        }
        tandem_batch b = { .n_tokens = n, .token = tok, .pos = pos };
        if ((rc = tandem_forward(s, &b, err, errlen)))
            break;
        i = last;
        if (i < PROMPT - 1)
            continue; /* logits are compared after the whole prompt and after each step */
        const float *l = tandem_logits(s, 0);
        int k = i - (PROMPT - 1);
        if (!l) {
            snprintf(err, errlen, "no logits after token %d", i);
            return TANDEM_EINVAL;
        }
        if (out)
            memcpy(out + (size_t)k * V, l, (size_t)V * sizeof *l);
        else
            *mismatch += memcmp(ref + (size_t)k * V, l, (size_t)V * sizeof *l) != 0;
    }
    return rc;
}

typedef struct {
    tandem_engine *e;
    const float *ref; /* [N_SHAPE][N_LOGITS][V] */
    int V, id;
    int mismatch, forwards_failed;
    char err[256];
} sess_thread;

static void *sess_main(void *arg)
{
    sess_thread *t = arg;
    tandem_session *s[SESSIONS] = { 0 };
    int sh[SESSIONS];
    for (int k = 0; k < SESSIONS; k++) {
        sh[k] = (t->id + k) % N_SHAPE;
        tandem_session_params sp;
        tandem_session_params_default(&sp);
        sp.n_batch = shape[sh[k]].n_batch;
        sp.n_ctx = shape[sh[k]].n_ctx;
        if (tandem_session_create(t->e, &sp, &s[k], t->err, sizeof t->err)) {
            t->forwards_failed++;
            goto out;
        }
    }
    /* the sessions of a thread take turns a script at a time, the threads all at once */
    for (int r = 0; r < ROUNDS; r++)
        for (int k = 0; k < SESSIONS; k++)
            if (run_script(s[k], shape[sh[k]].n_batch, t->V, NULL, t->ref + (size_t)sh[k] * N_LOGITS * t->V,
                           &t->mismatch, t->err, sizeof t->err))
                t->forwards_failed++;
out:
    for (int k = 0; k < SESSIONS; k++)
        tandem_session_free(s[k]);
    return NULL;
}

TEST_GROUP(concurrency)
{
    test_shared_pool();

    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.gpu = 0;
    ep.n_threads = 2;
    tandem_engine *e = NULL;
    char err[512];
    int rc = tandem_engine_open(DEMO, &ep, &e, err, sizeof err);
    CHECKF(rc == 0, "%s", err);
    if (rc)
        return;
    const int V = tandem_n_vocab(e);
    float *ref = malloc((size_t)N_SHAPE * N_LOGITS * V * sizeof *ref);
    float *again = malloc((size_t)N_LOGITS * V * sizeof *again);
    /* the references: each shape alone, twice (a forward must repeat itself
     * bit for bit for the comparison below to mean anything) */
    for (int k = 0; k < N_SHAPE && !rc; k++) {
        tandem_session_params sp;
        tandem_session_params_default(&sp);
        sp.n_batch = shape[k].n_batch;
        sp.n_ctx = shape[k].n_ctx;
        tandem_session *s = NULL;
        rc = tandem_session_create(e, &sp, &s, err, sizeof err);
        if (!rc)
            rc = run_script(s, shape[k].n_batch, V, ref + (size_t)k * N_LOGITS * V, NULL, NULL, err, sizeof err);
        if (!rc)
            rc = run_script(s, shape[k].n_batch, V, again, NULL, NULL, err, sizeof err);
        CHECKF(rc == 0, "solo run, shape %d: %s", k, err);
        CHECKF(rc || !memcmp(again, ref + (size_t)k * N_LOGITS * V, (size_t)N_LOGITS * V * sizeof *again),
               "shape %d: a solo run does not repeat itself", k);
        tandem_session_free(s);
    }
    if (!rc) {
        pthread_t th[THREADS];
        sess_thread t[THREADS];
        for (int i = 0; i < THREADS; i++) {
            t[i] = (sess_thread){ .e = e, .ref = ref, .V = V, .id = i };
            CHECK(pthread_create(&th[i], NULL, sess_main, &t[i]) == 0);
        }
        int mismatch = 0;
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], NULL);
            CHECKF(t[i].forwards_failed == 0, "thread %d: %d scripts failed: %s", i, t[i].forwards_failed,
                   t[i].err);
            mismatch += t[i].mismatch;
        }
        CHECKF(mismatch == 0, "%d of %d logit vectors differ from the solo runs (%d threads x %d sessions)",
               mismatch, THREADS * SESSIONS * ROUNDS * N_LOGITS, THREADS, SESSIONS);
    }
    free(ref);
    free(again);
    tandem_engine_close(e);
}
