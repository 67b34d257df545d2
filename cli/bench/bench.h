/*
 * bench.h - the benchmarks behind `tandem bench moe|e2e` (cli/bench/), out of
 * the library since the library became something others link: they drive
 * internal modules (the MoE operator's kernels and tuning, the hybrid
 * session), so they link the static archive and include src/ headers, and
 * nothing of them is in libtandem.so. dev/ programs link them the same way.
 */
#ifndef TANDEM_CLI_BENCH_H
#define TANDEM_CLI_BENCH_H

#include <stddef.h>
#include <stdint.h>

#include "core/pool.h"

/* `tandem bench moe ARGS` (moe_bench.c): the CPU MoE operator at real shapes,
 * one line per case in BENCH.md's key=value format. Returns an exit code. */
int bench_moe_main(int argc, char **argv);
/* `tandem bench e2e ARGS` (e2e_bench.c): the whole engine (hybrid and
 * CPU-only) at real shapes with dummy weights; BENCH.md's bench=e2e lines. */
int bench_e2e_main(int argc, char **argv);

/* The DRAM read ceiling in GB/s, as the benchmarks print it: all pool threads
 * reading 2.25 GiB of huge pages with the widest loads `isa` has, best of 6
 * passes (the expert kernels stream their weights the same way). 0 if the
 * buffer cannot be had. */
double moe_dram_gbps(pool *p, int isa);
/* GB of this process's anonymous memory on transparent huge pages, -1 if
 * unknown (the packed experts ask for huge pages; on 4 KB pages streaming
 * them costs a page walk every 64 lines). */
double moe_thp_gb(void);

/* ceilings (moe_bench_*.c, one per ISA): memory read of n bytes (a multiple
 * of 256), and vector / tile peak loops returning operations done */
uint64_t moe_bench_read512(const void *p, size_t n);
uint64_t moe_bench_read256(const void *p, size_t n);
double moe_bench_peak512(int int8, long iters);
double moe_bench_peak_amx(int int8, int loads, long iters);

#endif
