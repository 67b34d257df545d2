/*
 * convert.c - `tandem convert`: pack a model's CPU experts once and save them
 * beside the checkpoint, so later loads map them instead of re-packing.
 */
#include "cli.h"

static const char *usage =
    "usage: tandem convert [-m MODEL] --cpu-experts bf16|int8|int4 [-t N]\n"
    "\n"
    "Packs (and quantises) the routed experts into the layout the CPU kernels read\n"
    "and writes them to MODEL/packed-FMT-pN/. Later runs with the same\n"
    "--cpu-experts map these files instead of packing at every start.\n";

int cmd_convert(int argc, char **argv)
{
    cli_opts o;
    int rc = cli_parse(argc, argv, 2, &o, "-m --model --cpu-experts -t --threads -v", usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    char err[1024];
    if (tandem_convert_experts(o.model, o.cpu_experts, o.threads, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return 1;
    }
    printf("%s: experts packed\n", o.model);
    return 0;
}
