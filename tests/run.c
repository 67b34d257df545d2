/*
 * run.c - the test runner: runs the registered groups (all, or those named as
 * --name on the command line) and ends with "N passed, N failed".
 */
#include "test.h"
#include "tandem.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUPS 128

static struct {
    const char *name;
    void (*fn)(void);
} groups[MAX_GROUPS];
static int n_groups, n_pass, n_fail, n_skip;
static const char *cur_group = "";

void test_register(const char *name, void (*fn)(void))
{
    if (n_groups < MAX_GROUPS) {
        groups[n_groups].name = name;
        groups[n_groups].fn = fn;
        n_groups++;
    }
}

void test_check(int ok, const char *expr, const char *file, int line)
{
    if (ok) {
        n_pass++;
        return;
    }
    n_fail++;
    printf("FAIL [%s] %s:%d: %s\n", cur_group, file, line, expr);
    fflush(stdout);
}

void test_checkf(int ok, const char *file, int line, const char *fmt, ...)
{
    if (ok) {
        n_pass++;
        return;
    }
    n_fail++;
    printf("FAIL [%s] %s:%d: ", cur_group, file, line);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

void test_skip(const char *what, const char *why)
{
    n_skip++;
    printf("skipped: [%s] %s: %s\n", cur_group, what, why);
}

int test_failed_count(void) { return n_fail; }

static int cmp_group(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int main(int argc, char **argv)
{
    /* sort by name so the order does not depend on link order */
    qsort(groups, (size_t)n_groups, sizeof groups[0], cmp_group);
    /* TANDEM_LOG as the `tandem` command takes it (the library reads no environment) */
    const char *lv = getenv("TANDEM_LOG");
    if (lv && *lv && tandem_log_level_parse(lv) >= 0)
        tandem_set_log_level(tandem_log_level_parse(lv));
    /* TANDEM_CPU likewise: `TANDEM_CPU=ref build/run_tests` runs every group on the reference kernels */
    const char *cpu = getenv("TANDEM_CPU");
    char err[256];
    if (cpu && *cpu && tandem_set_cpu_kernels(cpu, err, sizeof err)) {
        fprintf(stderr, "run_tests: TANDEM_CPU=%s\n", err);
        return 2;
    }
    int ran = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--list") || !strcmp(argv[i], "--help")) {
            printf("usage: run_tests [--GROUP ...]\ngroups:");
            for (int g = 0; g < n_groups; g++)
                printf(" %s", groups[g].name);
            printf("\n");
            return 0;
        }
        if (strncmp(argv[i], "--", 2) != 0) {
            fprintf(stderr, "run_tests: unknown argument '%s' (try --list)\n", argv[i]);
            return 2;
        }
    }
    for (int g = 0; g < n_groups; g++) {
        int want = argc == 1;
        for (int i = 1; i < argc; i++)
            if (!strcmp(argv[i] + 2, groups[g].name))
                want = 1;
        if (!want)
            continue;
        cur_group = groups[g].name;
        int f0 = n_fail, p0 = n_pass;
        groups[g].fn();
        printf("[%s] %d passed, %d failed\n", cur_group, n_pass - p0, n_fail - f0);
        fflush(stdout);
        ran++;
    }
    if (argc > 1 && ran == 0) {
        fprintf(stderr, "run_tests: no such group (try --list)\n");
        return 2;
    }
    if (n_skip)
        printf("%d skipped (see 'skipped:' lines)\n", n_skip);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
