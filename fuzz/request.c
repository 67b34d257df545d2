/*
 * fuzz/request.c - libFuzzer target: the body of an HTTP completion request.
 *
 * Calls srv_parse_request() (server/request.c), the server's JSON -> request
 * path, with the tokenizer and chat template of models/demo (override with
 * FUZZ_MODEL_DIR): JSON, every sampling and output field with its range,
 * stop strings, messages and content parts, tools and chat_template_kwargs
 * rendered through the template, prompts as text or token ids, tokenization,
 * the context check, the sampler. The first byte picks the route (even:
 * /v1/chat/completions, odd: /v1/completions); the rest is the body. An
 * accepted request is checked (a prompt inside the vocabulary and the
 * context) and freed with srv_req_free(); a refused one must carry a 4xx/5xx
 * status and a message.
 *
 *   make fuzz && build-fuzz/fuzz/request fuzz/corpus/request
 * Seeds: chat and completion bodies like the server tests send.
 */
#include "fuzz.h"
#include "server.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tandem_tokenizer *tok;
static srv_parse_ctx pc;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!tok) {
        const char *dir = getenv("FUZZ_MODEL_DIR") ? getenv("FUZZ_MODEL_DIR") : "models/demo";
        char err[512];
        if (tandem_tokenizer_open(dir, &tok, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz/request: %s (run from the repository root or set FUZZ_MODEL_DIR)\n", err);
            __builtin_trap();
        }
        pc.tok = tok;
        pc.model_id = "demo";
        pc.model_dir = dir;
        pc.n_ctx = 512;
        pc.n_vocab = tandem_tokenizer_n_vocab(tok);
        pc.think_token = tandem_token_id(tok, "<think>") >= 0;
    }
    if (size < 1)
        return 0;
    srv_error e;
    srv_req *r = srv_parse_request(&pc, data[0] & 1 ? SRV_COMPLETION : SRV_CHAT, (const char *)data + 1, size - 1, &e);
    if (!r) {
        if (e.status < 400 || e.status > 599 || !e.message[0])
            __builtin_trap(); /* a refusal without a status or a message */
        return 0;
    }
    if (r->n_prompt < 1 || r->n_prompt >= pc.n_ctx || !r->prompt || !r->smp || r->n_stops > SRV_MAX_STOPS)
        __builtin_trap();
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= pc.n_vocab)
            __builtin_trap();
    srv_req_free(r);
    return 0;
}
