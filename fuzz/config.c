/*
 * fuzz/config.c - libFuzzer target: a model's config.json.
 *
 * Calls model_load_config() on the input as a file (a memfd, see fuzz.h):
 * JSON, architecture lookup, every field read with its range checks, rope
 * scaling, layer lists, quantization_config (FP8 blocks, compressed-tensors
 * schemes), then model_desc_free(). A config that loads must keep the
 * promises of config.c's range checks (positive sizes, heads and experts in
 * range, the MoE layer count matching the layer mask, a dense d_ff where a
 * layer is dense): they are asserted here, so a check that lets a bad value
 * through is a crash.
 *
 *   make fuzz && build-fuzz/fuzz/config fuzz/corpus/config
 * Seeds: the config.json of every fixture and of models/demo.
 */
#include "fuzz.h"
#include "model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_memfile(data, size);
    if (!path)
        return 0;
    model_desc d;
    char err[512];
    if (model_load_config(&d, path, err, sizeof err) != 0)
        return 0;
    /* what config.c promises the loader (its range checks) */
    int moe = 0;
    for (int l = 0; l < d.n_layer; l++)
        moe += d.layer_moe[l] != 0;
    if (d.n_layer < 1 || d.d_model < 1 || d.n_vocab < 1 || d.n_head < 1 || d.n_kv_head < 1 ||
        d.n_kv_head > d.n_head || d.n_expert < 1 || d.n_expert_used < 1 || d.n_expert_used > d.n_expert ||
        d.d_ff_expert < 1 || moe != d.n_layer_moe || (moe < d.n_layer && d.d_ff < 1))
        __builtin_trap();
    model_desc_free(&d);
    return 0;
}
