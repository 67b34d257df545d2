/*
 * isa.c - CPU feature detection: CPUID leaf 7 for the instruction sets, XGETBV
 * for the register state the OS saves (YMM, ZMM, AMX tiles), and the Linux
 * permission request that AMX tile data needs before first use.
 */
#include "core/isa.h"
#include "core/err.h"
#include "core/log.h"

#include <cpuid.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int isa_chosen = -1;

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* Ask Linux for permission to use AMX tile data; needed once per process. */
static int amx_request_perm(void)
{
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int isa_detect(void)
{
    static int cached = -1;
    if (cached >= 0)
        return cached;
    unsigned a, b, c, d;
    int level = ISA_REF;
    if (!__get_cpuid(1, &a, &b, &c, &d)) {
        cached = level;
        return level;
    }
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int ymm_os = (xcr0 & 6) == 6, zmm_os = (xcr0 & 0xe6) == 0xe6;
    int amx_os = (xcr0 & (3u << 17)) == (3u << 17);
    unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) {
        unsigned bb, cc, dd;
        __get_cpuid_count(7, 1, &a71, &bb, &cc, &dd);
    }
    int avx2 = (b7 >> 5) & 1;
    int avx512f = (b7 >> 16) & 1, avx512dq = (b7 >> 17) & 1;
    int avx512bw = (b7 >> 30) & 1, avx512vl = (b7 >> 31) & 1;
    int vnni = (c7 >> 11) & 1, bf16 = (a71 >> 5) & 1;
    int amx_bf16 = (d7 >> 22) & 1, amx_tile = (d7 >> 24) & 1, amx_int8 = (d7 >> 25) & 1;
    if (ymm_os && avx2 && fma && f16c)
        level = ISA_AVX2;
    if (level == ISA_AVX2 && zmm_os && avx512f && avx512dq && avx512bw && avx512vl && vnni && bf16)
        level = ISA_AVX512;
    if (level == ISA_AVX512 && amx_os && amx_tile && amx_bf16 && amx_int8 && amx_request_perm())
        level = ISA_AMX;
    cached = level;
    return level;
}

const char *isa_name(int isa)
{
    static const char *names[] = { "ref", "avx2", "avx512", "amx" };
    return isa >= 0 && isa < ISA_COUNT ? names[isa] : "?";
}

int isa_parse(const char *name)
{
    for (int i = 0; i < ISA_COUNT; i++)
        if (!strcmp(name, isa_name(i)))
            return i;
    return -1;
}

int isa_force(int isa)
{
    if (isa < 0 || isa > isa_detect())
        return TANDEM_EUNSUPPORTED;
    isa_chosen = isa;
    return 0;
}

int isa_select(char *err, size_t errlen)
{
    (void)err, (void)errlen;
    int best = isa_detect();
    if (isa_chosen < 0)
        isa_chosen = best;
    td_log(TD_LOG_INFO, "CPU kernels: %s (best available: %s)", isa_name(isa_chosen), isa_name(best));
    return 0;
}

int tandem_set_cpu_kernels(const char *name, char *err, size_t errlen)
{
    int best = isa_detect();
    if (!name || !*name) {
        isa_chosen = best;
        return 0;
    }
    int want = isa_parse(name);
    if (want < 0)
        return td_err(err, errlen, TANDEM_EINVAL, "'%s': unknown kernel set (use ref, avx2, avx512 or amx)", name);
    if (want > best)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "'%s': this CPU supports at most '%s'", name, isa_name(best));
    isa_chosen = want;
    return 0;
}

int isa_current(void)
{
    if (isa_chosen < 0)
        isa_select(NULL, 0);
    return isa_chosen < 0 ? ISA_REF : isa_chosen;
}
