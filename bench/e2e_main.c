/*
 * e2e_main.c - a stand-alone driver for the end-to-end benchmark, for builds
 * whose `tandem` command has no `bench e2e` yet: bench/e2e.sh links it
 * against the library. Same arguments as `tandem bench e2e`.
 */
#include "runtime/hybrid.h"

int main(int argc, char **argv)
{
    argv[0] = "e2e";
    return tandem_bench_e2e(argc, argv);
}
