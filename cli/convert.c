/*
 * convert.c - `tandem convert`: pack a model's CPU experts once and save them
 * beside the checkpoint, so later loads map them instead of re-packing.
 */
#include "cli.h"

static const char *usage =
    "usage: tandem convert [-m MODEL] --cpu-experts bf16|int8|int4|fp8 [-t N] [--repack]\n"
    "\n"
    "Packs (and quantises) the routed experts into the layout the CPU kernels read\n"
    "and writes them to MODEL/packed-FMT-pN/, one file per MoE layer, with a\n"
    "manifest of the checkpoint they came from. Later runs with the same\n"
    "--cpu-experts map these files instead of packing at every start, and refuse\n"
    "them once the checkpoint changes. A conversion cut short resumes where it\n"
    "stopped.\n"
    "\n"
    "  --repack   rebuild a pack made from another checkpoint or config\n";

int cmd_convert(int argc, char **argv)
{
    cli_opts o;
    int rc = cli_parse(argc, argv, 2, &o, "-m --model --cpu-experts -t --threads --repack -v", usage);
    if (rc)
        return rc > 0 ? 0 : 2;
    char err[1024];
    tandem_engine_params p;
    cli_engine_params(&o, &p);
    if (tandem_convert_experts(o.model, &p, o.repack, err, sizeof err)) {
        fprintf(stderr, "tandem: %s\n", err);
        return 1;
    }
    printf("%s: experts packed\n", o.model);
    return 0;
}
