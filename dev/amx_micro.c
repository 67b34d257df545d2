/*
 * amx_micro.c - where the AMX tile kernels lose time: the 2 x 2 register
 * block of moe_amx_body.h (4 accumulators, 2 A and 2 B tiles, 4 tile loads
 * per 4 TDPs) with its operands in different places, against the same TDPs
 * with no loads (the peak loop of `tandem bench moe`). One line per case:
 *   bench=amx_micro case=NAME threads=T a_KB=.. b_KB=.. ns_per_tdp=.. TFLOPs=.. frac=..
 * frac = the case's TDP rate over the register loop's at the same thread
 * count. A and B cycle through buffers of a_KB / b_KB (2 tiles = 2 KB per
 * step each): 4 KB sits in L1, 256 KB in L2, 64 MB in DRAM. Options per
 * case: pf (prefetcht0 the tiles `pf` steps ahead), spill (every `spill`
 * steps the 4 accumulators go to a 4 KB block and come back, as between
 * K chunks), t1 (the streamed operand loaded with TILELOADDT1), ord (1:
 * software-pipelined: each tile of the next step is loaded right after the
 * last TDP of this step that reads it, instead of all at the step's start;
 * tells whether tile loads wait for the TDPs before them).
 * AMX machines only (the H200 machine): build/dev/amx_micro [threads].
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <immintrin.h>

#include "cpu/moe/moe_impl.h" /* moe_tilecfg */

#define LOAD(t, p) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(p)), "r"(64L) : "memory")
#define LOADT1(t, p) \
    __asm__ volatile("tileloaddt1 (%0,%1,1), %%tmm" #t ::"r"((const void *)(p)), "r"(64L) : "memory")
#define STORE(t, p) __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(p)), "r"(64L) : "memory")
#define DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)


typedef struct {
    const char *name;
    size_t a_kb, b_kb;
    int pf, spill, t1; /* t1: 1 = A with TILELOADDT1, 2 = B */
    int ord;           /* 1: each tile of step s+1 loaded right after the last TDP of step s that reads it */
    int regs;          /* the register loop (no loads) */
} micro_case;

static const micro_case cases[] = {
    /* name                a_KB  b_KB  pf spill t1 ord regs */
    { "regs",              4,    4,    0, 0,    0, 0, 1 },
    { "l1_l1",             4,    4,    0, 0,    0, 0, 0 },
    { "l1_l1_ord1",        4,    4,    0, 0,    0, 1, 0 },
    { "l1_l1_spill16",     4,    4,    0, 16,   0, 0, 0 },
    { "l1_l1_spill4",      4,    4,    0, 4,    0, 0, 0 },
    { "a_l2_b_l1",         256,  16,   0, 0,    0, 0, 0 },
    { "a_l2_b_l1_pf",      256,  16,   1, 0,    0, 0, 0 },
    { "a_l2_b_l1_pf2",     256,  16,   2, 0,    0, 0, 0 },
    { "a_l2_b_l1_pf2_ord1",256,  16,   2, 0,    0, 1, 0 },
    { "a_l2_b_l1_t1",      256,  16,   0, 0,    1, 0, 0 },
    { "a_l1_b_l2",         16,   256,  0, 0,    0, 0, 0 },
    { "a_l1_b_l2_pf2",     16,   256,  2, 0,    0, 0, 0 },
    { "a_l2_b_l2",         256,  256,  0, 0,    0, 0, 0 },
    { "a_l2_b_l2_ord1",    256,  256,  0, 0,    0, 1, 0 },
    { "a_l2_b_l2_pf1",     256,  256,  1, 0,    0, 0, 0 },
    { "a_l2_b_l2_pf2",     256,  256,  2, 0,    0, 0, 0 },
    { "a_l2_b_l2_pf2_ord1",256,  256,  2, 0,    0, 1, 0 },
    { "a_l2_b_l2_pf4",     256,  256,  4, 0,    0, 0, 0 },
    { "a_l1_b_dram_pf4",   16,   65536, 4, 0,   0, 0, 0 },
    { "a_l2_b_dram_pf4",   256,  65536, 4, 0,   0, 0, 0 },
};
#define NCASES (int)(sizeof cases / sizeof cases[0])

typedef struct {
    const micro_case *c;
    int cpu;
    long steps;
    double ns;
    uint8_t *a, *b;
    pthread_barrier_t *bar;
} job_t;

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void prefetch2k(const uint8_t *p)
{
    for (int l = 0; l < 32; l++)
        _mm_prefetch((const char *)(p + l * 64), _MM_HINT_T0);
}

static void run_case(job_t *j)
{
    const micro_case *c = j->c;
    _Alignas(64) uint8_t spill[4096];
    memset(spill, 0, sizeof spill);
    size_t na = c->a_kb / 2, nb = c->b_kb / 2; /* 2 KB steps */
    moe_tilecfg g;
    moe_tilecfg_full(&g);
    __asm__ volatile("ldtilecfg %0" ::"m"(g) : "memory");
    __asm__ volatile("tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3" ::);
    LOAD(4, j->a);
    LOAD(5, j->a + 1024);
    LOAD(6, j->b);
    LOAD(7, j->b + 1024);
    pthread_barrier_wait(j->bar);
    double t0 = now_ns();
    if (c->regs) {
        for (long s = 0; s < j->steps; s++) {
            DP(0, 4, 6);
            DP(1, 4, 7);
            DP(2, 5, 6);
            DP(3, 5, 7);
        }
    } else {
        size_t ia = 0, ib = 0;
        for (long s = 0; s < j->steps; s++) {
            const uint8_t *a = j->a + ia * 2048, *b = j->b + ib * 2048;
            if (++ia == na)
                ia = 0;
            if (++ib == nb)
                ib = 0;
            if (c->pf) {
                prefetch2k(j->a + ((ia + c->pf - 1) % na) * 2048);
                prefetch2k(j->b + ((ib + c->pf - 1) % nb) * 2048);
            }
            if (c->ord) {
                /* the tiles of this step were loaded during the previous one */
                const uint8_t *an = j->a + ia * 2048, *bn = j->b + ib * 2048;
                DP(0, 4, 6);
                DP(1, 4, 7);
                LOAD(4, an);
                DP(2, 5, 6);
                LOAD(6, bn);
                DP(3, 5, 7);
                LOAD(7, bn + 1024);
                LOAD(5, an + 1024);
                continue;
            }
            if (c->t1 == 1)
                LOADT1(4, a);
            else
                LOAD(4, a);
            if (c->t1 == 2) {
                LOADT1(6, b);
                LOADT1(7, b + 1024);
            } else {
                LOAD(6, b);
                LOAD(7, b + 1024);
            }
            DP(0, 4, 6);
            DP(1, 4, 7);
            if (c->t1 == 1)
                LOADT1(5, a + 1024);
            else
                LOAD(5, a + 1024);
            DP(2, 5, 6);
            DP(3, 5, 7);
            if (c->spill && (s + 1) % c->spill == 0) {
                STORE(0, spill);
                STORE(1, spill + 1024);
                STORE(2, spill + 2048);
                STORE(3, spill + 3072);
                LOAD(0, spill);
                LOAD(1, spill + 1024);
                LOAD(2, spill + 2048);
                LOAD(3, spill + 3072);
            }
        }
    }
    STORE(0, spill);
    j->ns = now_ns() - t0;
    __asm__ volatile("tilerelease" ::: "memory");
}

static void *thread_main(void *arg)
{
    job_t *j = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(j->cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
    run_case(j);
    return NULL;
}

/* mean ns per TDP over nt threads running case c at once */
static double measure(const micro_case *c, int nt, uint8_t **abuf, uint8_t **bbuf, long steps)
{
    pthread_t th[256];
    job_t jobs[256];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nt);
    for (int i = 0; i < nt; i++) {
        jobs[i] = (job_t){ .c = c, .cpu = i, .steps = steps, .a = abuf[i], .b = bbuf[i], .bar = &bar };
        pthread_create(&th[i], NULL, thread_main, &jobs[i]);
    }
    double sum = 0;
    for (int i = 0; i < nt; i++) {
        pthread_join(th[i], NULL);
        sum += jobs[i].ns;
    }
    pthread_barrier_destroy(&bar);
    return sum / nt / ((double)steps * 4);
}

int main(int argc, char **argv)
{
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
        fprintf(stderr, "amx_micro: the OS did not grant the AMX tile state (no AMX here?)\n");
        return 1;
    }
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN), nmax = argc > 1 ? atoi(argv[1]) : ncpu;
    if (nmax < 1 || nmax > 256 || nmax > ncpu)
        nmax = ncpu;
    uint8_t *abuf[256], *bbuf[256];
    for (int i = 0; i < nmax; i++) {
        abuf[i] = aligned_alloc(4096, 64u << 20);
        bbuf[i] = aligned_alloc(4096, 64u << 20);
        if (!abuf[i] || !bbuf[i]) {
            fprintf(stderr, "amx_micro: out of memory for %d threads' buffers\n", nmax);
            return 1;
        }
        /* small bf16 values (0x3c00 ~ 0.0078): no overflow, no denormals */
        for (size_t k = 0; k < (64u << 20) / 2; k++) {
            ((uint16_t *)abuf[i])[k] = 0x3c00;
            ((uint16_t *)bbuf[i])[k] = 0x3c00;
        }
    }
    /* every case on 1 and on all threads; the scaling in between for three */
    int counts[5] = { 1, 2, 4, 8, nmax };
    for (int ci = 0; ci < 5; ci++) {
        int nt = counts[ci], all = ci == 0 || ci == 4;
        if (nt > nmax || (!all && nt == nmax))
            continue;
        double regs = 0;
        for (int k = 0; k < NCASES; k++) {
            const micro_case *c = &cases[k];
            if (!all && strcmp(c->name, "regs") && strcmp(c->name, "l1_l1") && strcmp(c->name, "a_l2_b_l1_t1"))
                continue;
            long steps = c->b_kb > 1024 || c->a_kb > 1024 ? 200000 : 400000;
            measure(c, nt, abuf, bbuf, steps / 8); /* warm-up: clocks, caches */
            double ns = measure(c, nt, abuf, bbuf, steps);
            if (c->regs)
                regs = ns;
            printf("bench=amx_micro case=%s threads=%d a_KB=%zu b_KB=%zu pf=%d spill=%d t1=%d ns_per_tdp=%.2f "
                   "TFLOPs=%.2f frac=%.3f\n",
                   c->name, nt, c->a_kb, c->b_kb, c->pf, c->spill, c->t1, ns, 16384.0 / ns * nt / 1e3,
                   regs / ns);
            fflush(stdout);
        }
    }
    return 0;
}
