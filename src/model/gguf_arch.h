/*
 * gguf_arch.h - GGUF metadata -> model_desc, and where each tensor the
 * model needs lives in a GGUF file (llama.cpp's names).
 *
 * Architectures, as llama.cpp names them in general.architecture:
 *   qwen3moe, qwen2moe, llama (MoE only: Mixtral), deepseek2 (DeepSeek-V2/V3/R1,
 *   Kimi-K2; MLA with the split attn_k_b/attn_v_b or the older attn_kv_b),
 *   glm4moe (GLM-4.5; the nextn/MTP layers are not run).
 * The description is the one the safetensors path builds from config.json
 * (model.h), so the forward pass does not know where a model came from.
 * Two differences from Hugging Face checkpoints are absorbed here:
 *   - llama.cpp's converter permutes the Q and K rows of "llama" models so
 *     that rope pairs are adjacent (dims 2i, 2i+1): such files get
 *     ROPE_PAIRS, which is the same rotation on the permuted rows.
 *   - GGUF stores routed experts merged, [n_expert][rows][cols] per layer
 *     (ffn_gate_exps ...; older files: one tensor per expert), and newer
 *     deepseek2 files split kv_b into attn_k_b [H][R][nope] (transposed)
 *     and attn_v_b [H][v][R]; the loader rebuilds kv_b from them.
 */
#ifndef TD_MODEL_GGUF_ARCH_H
#define TD_MODEL_GGUF_ARCH_H

#include <stddef.h>

#include "io/gguf.h"
#include "model/model.h"

/* Fill d from g's metadata (and which tensors are present). An architecture
 * outside the list above, or a value tandem does not implement (a rope
 * scaling type, a dense llama model) is an error naming the key. */
int model_load_gguf(model_desc *d, const gguf_file *g, char *err, size_t errlen);

/* How tensor spec s (model_tensors) is found in the file. */
typedef enum {
    GGUF_REF_PLAIN,   /* the tensor itself: ne = {cols, rows} (1-D: {rows}) */
    GGUF_REF_EXPERT,  /* slice `expert` of a merged tensor, ne = {cols, rows, n_expert} */
    GGUF_REF_KV_B,    /* kv_b rebuilt from attn_k_b (name) and attn_v_b (name2) */
} gguf_ref_kind;

typedef struct {
    gguf_ref_kind kind;
    const gguf_tensor *t;     /* the tensor (k_b for KV_B) */
    const gguf_tensor *t2;    /* v_b for KV_B */
    int expert;
    char name[96];            /* for messages: the GGUF name looked for */
} gguf_ref;

/* Locate s in g and check its type is readable and its shape is s's.
 * 0, or TANDEM_EFORMAT / TANDEM_EUNSUPPORTED naming the tensor. */
int model_gguf_find(const model_desc *d, const gguf_file *g, const tensor_spec *s, gguf_ref *out, char *err,
                    size_t errlen);

#endif
