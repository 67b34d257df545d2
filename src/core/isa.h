/*
 * isa.h - which CPU kernels this machine can run, decided once at start.
 *
 * Levels are ordered: a machine that runs one level runs every level below.
 *   ISA_REF     plain C, the reference for every kernel (always available)
 *   ISA_AVX2    AVX2 + FMA + F16C
 *   ISA_AVX512  AVX-512 F/BW/VL/DQ + BF16 + VNNI
 *   ISA_AMX     AVX512 level + AMX tile/BF16/INT8, with the OS's permission
 *               (arch_prctl ARCH_REQ_XCOMP_PERM) obtained
 * Detection reads CPUID and XGETBV, never compile-time flags.
 * tandem_set_cpu_kernels() (tandem.h; the command maps TANDEM_CPU onto it)
 * forces a level; the library reads no environment for it.
 */
#ifndef TD_ISA_H
#define TD_ISA_H

#include <stddef.h>

enum { ISA_REF = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AMX = 3, ISA_COUNT };

int isa_detect(void);              /* best level this machine supports */
const char *isa_name(int isa);
int isa_parse(const char *name);   /* -1 if unknown */

/* Choose the level for this process: the one tandem_set_cpu_kernels() forced,
 * else the best. Stores it for isa_current(). Returns 0. */
int isa_select(char *err, size_t errlen);
int isa_current(void);

/* Force a level (tests); returns 0, or TANDEM_EUNSUPPORTED if not available. */
int isa_force(int isa);

#endif
