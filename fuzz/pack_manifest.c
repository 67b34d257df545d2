/*
 * fuzz/pack_manifest.c - libFuzzer target: a pack's manifest.txt (src/runtime/pack.c).
 *
 * The manifest is checked against the engine it would serve, so this target
 * opens one engine at start (tests/fixtures/qwen3_moe, CPU only, INT8
 * experts, packs ignored; override with FUZZ_PACK_MODEL) and per input
 * writes the bytes as manifest.txt in a private temporary directory and calls
 * pack_manifest_matches(): the read of the file, the manifest this engine
 * would write (config hash, shard stats, sampled expert bytes) and the
 * line-by-line comparison that names the first differing line. The directory
 * is removed at exit.
 *
 *   make fuzz && build-fuzz/fuzz/pack_manifest fuzz/corpus/pack_manifest
 * Seed: the manifest `tandem convert --cpu-experts int8` wrote for a copy of
 * that fixture (its mtime fields differ from any checkout's, so the seed
 * matches up to the file line).
 */
#include "fuzz.h"
#include "runtime/engine.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tandem_engine *eng;
static char dir[64] = "/tmp/tandem-fuzz-pack-XXXXXX", file[96];

static void cleanup(void)
{
    unlink(file);
    rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[1024];
    if (!eng) {
        const char *model = getenv("FUZZ_PACK_MODEL") ? getenv("FUZZ_PACK_MODEL") : "tests/fixtures/qwen3_moe";
        tandem_engine_params p;
        tandem_engine_params_default(&p);
        p.n_threads = 1;
        p.gpu = 0;
        p.cpu_experts = TANDEM_FMT_INT8;
        p.ignore_packs = 1;
        if (tandem_engine_open(model, &p, &eng, err, sizeof err) != 0 || !mkdtemp(dir)) {
            fprintf(stderr, "fuzz/pack_manifest: %s (run from the repository root or set FUZZ_PACK_MODEL)\n", err);
            __builtin_trap();
        }
        snprintf(file, sizeof file, "%s/manifest.txt", dir);
        atexit(cleanup);
    }
    FILE *f = fopen(file, "wb");
    if (!f)
        return 0;
    int bad = fwrite(data, 1, size, f) != size;
    if (fclose(f) != 0 || bad)
        return 0;
    err[0] = 0;
    if (!pack_manifest_matches(eng, TANDEM_FMT_INT8, dir, err, sizeof err) && !err[0])
        __builtin_trap(); /* refused without saying why */
    return 0;
}
