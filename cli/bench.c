/*
 * bench.c - `tandem bench WHAT`: dispatch to the library's benchmarks, which
 * print BENCH.md's key=value lines.
 */
#include "cli.h"

#include <string.h>

int cmd_bench(int argc, char **argv)
{
    if (argc < 3 || !strcmp(argv[2], "--help") || !strcmp(argv[2], "-h")) {
        printf("usage: tandem bench moe|e2e [options]   (tandem bench moe --help, tandem bench e2e --help)\n");
        return argc < 3 ? 2 : 0;
    }
    if (!strcmp(argv[2], "moe"))
        return tandem_bench_moe(argc - 2, argv + 2);
    if (!strcmp(argv[2], "e2e"))
        return tandem_bench_e2e(argc - 2, argv + 2);
    fprintf(stderr, "tandem: unknown benchmark '%s' (moe, e2e)\n", argv[2]);
    return 2;
}
