/*
 * layout.c - prints the sizes of the public structs and the values of the
 * public constants, as "name value" lines. tests/abi/check.sh compiles it
 * twice, against the frozen 0.1 header and against include/, and requires
 * the same lines: a program built against 0.1 allocates these structs itself
 * (tandem_engine_params_default fills the caller's struct), so within
 * soname libtandem.so.0 none may change size or meaning. A new field means a
 * new major version (TANDEM_VERSION_MAJOR, the soname) and a new frozen header.
 */
#include "tandem.h"

#include <stddef.h>
#include <stdio.h>

#define SZ(t) printf("sizeof(%s) %zu\n", #t, sizeof(t))
#define OFF(t, f) printf("offsetof(%s, %s) %zu\n", #t, #f, offsetof(t, f))
#define VAL(c) printf("%s %ld\n", #c, (long)(c))

int main(void)
{
    SZ(tandem_engine_params);
    OFF(tandem_engine_params, cpu_experts);
    OFF(tandem_engine_params, host_mem_gb);
    SZ(tandem_model_info);
    OFF(tandem_model_info, gpu);
    SZ(tandem_session_params);
    SZ(tandem_batch);
    SZ(tandem_sampling);
    OFF(tandem_sampling, seed);
    SZ(tandem_plan_item);
    SZ(tandem_plan);
    OFF(tandem_plan, model);
    VAL(TANDEM_VERSION_MAJOR);
    VAL(TANDEM_EINVAL);
    VAL(TANDEM_EGPU);
    VAL(TANDEM_FMT_BF16);
    VAL(TANDEM_FMT_INT8);
    VAL(TANDEM_FMT_INT4);
    VAL(TANDEM_FMT_F32);
    VAL(TANDEM_FMT_FP8);
    VAL(TANDEM_LOG_DEBUG);
    VAL(TANDEM_PLAN_MAX_ITEMS);
    return 0;
}
