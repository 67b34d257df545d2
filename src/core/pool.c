/*
 * pool.c - persistent, pinned worker threads with atomic work claiming.
 *
 * A job is published by bumping `gen` (release); workers that see the new
 * generation claim chunks until the counter passes n, then bump `done`. The
 * caller works too and then waits for done == size - 1. Workers spin for a
 * short while before sleeping on the futex of `gen`, because in a forward
 * pass jobs follow each other within microseconds and a futex wake costs
 * several. `n_sleep` lets the caller skip the wake syscall when nobody sleeps.
 *
 * One job at a time: the job lives in the pool, so `run_mu` is held over a
 * whole pool_run (publishing the job, the caller's share, the wait). Threads
 * that share a pool, such as sessions of one engine on threads of their own,
 * serialise there: each job gets every core, but they share the cores one
 * job, and so one forward pass step, at a time (no faster together than one
 * after the other). A job that calls pool_run runs that call inline on its
 * own thread (`tls_in_job`), since waiting for the pool it is part of would
 * never end.
 */
#include "core/pool.h"
#include "core/err.h"
#include "core/log.h"

#include <linux/futex.h>
#include <numa.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define POOL_MAX_PARTS 16
#define SPIN_NS 300000 /* spin 0.3 ms before sleeping */

typedef struct {
    _Alignas(64) atomic_int_fast64_t next;
} part_counter;

typedef struct {
    pool *p;
    int tid, part, part_tid, cpu;
    pthread_t th;
} worker;

struct pool {
    int size, nparts;
    int part_size[POOL_MAX_PARTS];
    worker *w;
    /* the current job */
    pool_fn fn;
    void *ctx;
    int64_t n, chunk;
    int per_part;
    part_counter cnt[POOL_MAX_PARTS];
    pthread_mutex_t run_mu; /* held by the thread whose job the pool runs */
    _Alignas(64) atomic_uint gen;
    _Alignas(64) atomic_int done;
    _Alignas(64) atomic_int n_sleep;
    atomic_int quit;
};

static _Thread_local int tls_tid, tls_part, tls_part_tid;
static _Thread_local int tls_in_job; /* this thread is running chunks of a job */

int pool_tid(void) { return tls_tid; }
int pool_part(void) { return tls_part; }
int pool_part_tid(void) { return tls_part_tid; }
int pool_size(const pool *p) { return p->size; }
int pool_nparts(const pool *p) { return p->nparts; }
int pool_part_size(const pool *p, int part) { return p->part_size[part]; }

static void cpu_relax(void) { __builtin_ia32_pause(); }

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void futex_wait(atomic_uint *addr, unsigned val)
{
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *addr)
{
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

/* Claim and run chunks of the current job until none are left. */
static void work(pool *p, int part)
{
    part_counter *c = &p->cnt[p->per_part ? part : 0];
    for (;;) {
        int64_t b = atomic_fetch_add_explicit(&c->next, p->chunk, memory_order_relaxed);
        if (b >= p->n)
            break;
        int64_t e = b + p->chunk < p->n ? b + p->chunk : p->n;
        p->fn(p->ctx, b, e);
    }
}

static void pin_to(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

void pool_bind_caller(const pool *p)
{
    tls_tid = 0;
    tls_part = 0;
    tls_part_tid = 0;
    if (p && p->size > 1)
        pin_to(p->w[0].cpu); /* only a pool that pins its workers gives thread 0 a core */
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    pool *p = w->p;
    tls_tid = w->tid;
    tls_part = w->part;
    tls_part_tid = w->part_tid;
    pin_to(w->cpu);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g == seen) {
            int64_t t0 = now_ns();
            int spins = 0;
            while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen) {
                cpu_relax();
                if (++spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                    atomic_fetch_add(&p->n_sleep, 1);
                    if (atomic_load(&p->gen) == seen)
                        futex_wait(&p->gen, seen);
                    atomic_fetch_sub(&p->n_sleep, 1);
                    t0 = now_ns();
                }
            }
        }
        seen = g;
        if (atomic_load_explicit(&p->quit, memory_order_acquire))
            break;
        tls_in_job = 1;
        work(p, w->part);
        tls_in_job = 0;
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
    return NULL;
}

static void run(pool *p, int64_t n, int64_t chunk, pool_fn fn, void *ctx, int per_part)
{
    if (n <= 0)
        return;
    if (chunk <= 0) {
        chunk = n / ((int64_t)p->size * 4);
        if (chunk < 1)
            chunk = 1;
    }
    if (p->size == 1 || (n <= chunk && !per_part)) {
        fn(ctx, 0, n); /* on the caller's thread; the pool is not touched, so no lock */
        return;
    }
    if (tls_in_job) {
        /* nested: this thread is a worker of a running job (maybe of this very
         * pool), so run the items here, once per partition as the pool would */
        int part = tls_part, part_tid = tls_part_tid;
        for (int i = 0; i < (per_part ? p->nparts : 1); i++) {
            tls_part = per_part ? i : part;
            tls_part_tid = per_part ? 0 : part_tid;
            fn(ctx, 0, n);
        }
        tls_part = part;
        tls_part_tid = part_tid;
        return;
    }
    pthread_mutex_lock(&p->run_mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->chunk = chunk;
    p->per_part = per_part;
    for (int i = 0; i < p->nparts; i++)
        atomic_store_explicit(&p->cnt[i].next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    if (atomic_load(&p->n_sleep) > 0)
        futex_wake_all(&p->gen);
    tls_in_job = 1;
    work(p, 0);
    tls_in_job = 0;
    while (atomic_load_explicit(&p->done, memory_order_acquire) < p->size - 1)
        cpu_relax();
    pthread_mutex_unlock(&p->run_mu);
}

void pool_run(pool *p, int64_t n, int64_t chunk, pool_fn fn, void *ctx)
{
    run(p, n, chunk, fn, ctx, 0);
}

void pool_run_parts(pool *p, int64_t n, int64_t chunk, pool_fn fn, void *ctx)
{
    if (p->nparts == 1) {
        run(p, n, chunk, fn, ctx, 0);
        return;
    }
    run(p, n, chunk, fn, ctx, 1);
}

/* The CPUs this process may use, in order; returns how many. */
static int allowed_cpus(int *cpus, int max)
{
    cpu_set_t set;
    int n = 0;
    if (sched_getaffinity(0, sizeof set, &set) != 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        for (int i = 0; i < c && n < max; i++)
            cpus[n++] = i;
        return n;
    }
    for (int i = 0; i < CPU_SETSIZE && n < max; i++)
        if (CPU_ISSET(i, &set))
            cpus[n++] = i;
    return n;
}

int pool_create(pool **out, int n_threads, int n_parts, char *err, size_t errlen)
{
    *out = NULL;
    int cpus[CPU_SETSIZE];
    int ncpu = allowed_cpus(cpus, CPU_SETSIZE);
    if (ncpu < 1)
        ncpu = 1, cpus[0] = -1;
    if (n_threads < 0 || n_threads > 4096)
        return td_err(err, errlen, TANDEM_EINVAL, "threads: %d is out of range (0 = all cores)", n_threads);
    if (n_threads == 0)
        n_threads = ncpu;
    /* More threads than cores only slows a job down: workers spin waiting for
     * the job, and a job ends when its slowest thread does, one that may be
     * waiting for a core. */
    if (n_threads > ncpu) {
        td_log(TD_LOG_WARN, "threads: %d requested, but this process may run on %d core(s); using %d", n_threads,
               ncpu, ncpu);
        n_threads = ncpu;
        if (n_parts > n_threads)
            n_parts = n_threads; /* partitions asked for with the threads asked for */
    }
    int numa_nodes = numa_available() >= 0 ? numa_num_configured_nodes() : 1;
    if (numa_nodes < 1)
        numa_nodes = 1;
    if (n_parts <= 0)
        n_parts = numa_nodes;
    if (n_parts > POOL_MAX_PARTS || n_parts > n_threads)
        return td_err(err, errlen, TANDEM_EINVAL,
                      "pool: %d partitions for %d threads (at most %d, and no more than threads)",
                      n_parts, n_threads, POOL_MAX_PARTS);
    pool *p = calloc(1, sizeof *p);
    if (!p || !(p->w = calloc((size_t)n_threads, sizeof *p->w))) {
        free(p);
        return td_err(err, errlen, TANDEM_ENOMEM, "pool: out of memory");
    }
    p->size = n_threads;
    p->nparts = n_parts;
    pthread_mutex_init(&p->run_mu, NULL);
    /* Sort the CPUs by NUMA node so contiguous partitions follow nodes. */
    int *order = cpus;
    if (numa_nodes > 1 && n_parts == numa_nodes) {
        for (int i = 1; i < ncpu; i++)
            for (int j = i; j > 0 && numa_node_of_cpu(order[j - 1]) > numa_node_of_cpu(order[j]); j--) {
                int t = order[j];
                order[j] = order[j - 1];
                order[j - 1] = t;
            }
    }
    for (int t = 0; t < n_threads; t++) {
        worker *w = &p->w[t];
        w->p = p;
        w->tid = t;
        w->part = (int)((int64_t)t * n_parts / n_threads);
        w->part_tid = p->part_size[w->part]++;
        w->cpu = cpus[0] >= 0 ? order[t] : -1; /* a core per thread: the count is capped above */
    }
    /* The caller is thread 0 of partition 0. */
    tls_tid = 0;
    tls_part = 0;
    tls_part_tid = 0;
    for (int t = 1; t < n_threads; t++) {
        if (pthread_create(&p->w[t].th, NULL, worker_main, &p->w[t]) != 0) {
            p->size = t; /* join those started */
            pool_free(p);
            return td_err(err, errlen, TANDEM_ENOMEM, "pool: could not start thread %d of %d", t, n_threads);
        }
    }
    td_log(TD_LOG_INFO, "pool: %d threads in %d partition(s), %d cores allowed, %d NUMA node(s)",
           n_threads, n_parts, ncpu, numa_nodes);
    *out = p;
    return 0;
}

void pool_free(pool *p)
{
    if (!p)
        return;
    atomic_store_explicit(&p->quit, 1, memory_order_release);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    futex_wake_all(&p->gen);
    for (int t = 1; t < p->size; t++)
        pthread_join(p->w[t].th, NULL);
    pthread_mutex_destroy(&p->run_mu);
    free(p->w);
    free(p);
}
