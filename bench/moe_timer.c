/*
 * moe_timer.c - the C side of bench/py_overhead.py: times tandem_moe_forward
 * called from C on an operator and batch the Python script built, so Python's
 * tandem.MoE and C run the same operator on the same tensors, alternating in
 * one process. Built by the script as a small shared library against
 * libtandem.so (public API only).
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <tandem_moe.h>

#include <time.h>

/* seconds per call over iters calls, or a negative TANDEM_E* code */
double moe_timer_run(tandem_moe *m, const tandem_moe_batch *b, int iters)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < iters; i++) {
        int rc = tandem_moe_forward(m, b, NULL, 0);
        if (rc)
            return rc;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return ((double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec)) / iters;
}
