/*
 * bench.c - `tandem bench WHAT`: dispatch to the benchmarks (cli/bench/ and
 * bench_mem.c), which print BENCH.md's key=value lines.
 */
#include "cli.h"
#include "bench/bench.h"

#include <string.h>

int cmd_bench(int argc, char **argv)
{
    if (argc < 3 || !strcmp(argv[2], "--help") || !strcmp(argv[2], "-h")) {
        printf("usage: tandem bench moe|e2e|mem [options]   (tandem bench WHAT --help)\n");
        return argc < 3 ? 2 : 0;
    }
    if (!strcmp(argv[2], "moe"))
        return bench_moe_main(argc - 2, argv + 2);
    if (!strcmp(argv[2], "e2e"))
        return bench_e2e_main(argc - 2, argv + 2);
    if (!strcmp(argv[2], "mem"))
        return tandem_cli_bench_mem(argc - 2, argv + 2);
    fprintf(stderr, "tandem: unknown benchmark '%s' (moe, e2e, mem)\n", argv[2]);
    return 2;
}
