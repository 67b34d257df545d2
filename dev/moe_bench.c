/*
 * moe_bench.c - runs `tandem bench moe` (bench_moe_main in
 * cli/bench/moe_bench.c) as its own program, for machines and moments
 * where the CLI does not have the subcommand: build/dev/moe_bench [options].
 */
#include "../cli/bench/bench.h"

int main(int argc, char **argv) { return bench_moe_main(argc, argv); }
