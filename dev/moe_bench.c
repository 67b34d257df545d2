/*
 * moe_bench.c - runs `tandem bench moe` (tandem_bench_moe in
 * src/cpu/moe/moe_bench.c) as its own program, for machines and moments
 * where the CLI does not have the subcommand: build/dev/moe_bench [options].
 */
#include "tandem.h"

int main(int argc, char **argv) { return tandem_bench_moe(argc, argv); }
