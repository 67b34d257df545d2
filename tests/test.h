/*
 * test.h - the plain-C test harness: named groups, CHECK macros that record
 * file:line and continue, skips that say why.
 *
 *     TEST_GROUP(kernels) { CHECK(x == 1); CHECK_NEAR(a, b, 1e-5); }
 *
 * Groups register themselves (a constructor per group), so a new test file
 * needs no edit elsewhere. `build/run_tests --kernels --io` runs the named
 * groups; no arguments runs them all. The last line printed is
 * "N passed, N failed" (N counts checks; skips are listed, not counted).
 */
#ifndef TD_TEST_H
#define TD_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

void test_register(const char *name, void (*fn)(void));
void test_check(int ok, const char *expr, const char *file, int line);
void test_checkf(int ok, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void test_skip(const char *what, const char *why);
int test_failed_count(void);

#define TEST_GROUP(name)                                                  \
    static void test_group_##name(void);                                  \
    __attribute__((constructor)) static void test_reg_##name(void)        \
    {                                                                     \
        test_register(#name, test_group_##name);                          \
    }                                                                     \
    static void test_group_##name(void)

#define CHECK(c) test_check(!!(c), #c, __FILE__, __LINE__)
/* printf-style message on failure */
#define CHECKF(c, ...) test_checkf(!!(c), __FILE__, __LINE__, __VA_ARGS__)
#define CHECK_NEAR(a, b, tol)                                                     \
    do {                                                                          \
        double a_ = (a), b_ = (b);                                                \
        test_checkf(fabs(a_ - b_) <= (tol), __FILE__, __LINE__,                   \
                    "%s = %.8g, %s = %.8g, |diff| %.3g > %.3g", #a, a_, #b, b_,   \
                    fabs(a_ - b_), (double)(tol));                                \
    } while (0)
#define SKIP(what, why) test_skip(what, why)

/* splitmix64 random numbers for test data: one stream per state word, so
 * each test file keeps its own and its cases do not move when another file's
 * change */
static inline uint64_t test_rng(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline double test_unif(uint64_t *s) { return (double)(test_rng(s) >> 11) / 9007199254740992.0; }
static inline double test_gauss(uint64_t *s)
{
    double u = test_unif(s), v = test_unif(s);
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

#endif
