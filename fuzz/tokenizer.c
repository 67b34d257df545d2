/*
 * fuzz/tokenizer.c - libFuzzer target: a Hugging Face tokenizer.json, or a
 * tiktoken.model (Kimi-K2) when the input does not start like JSON.
 *
 * Calls bpe_load_from_string() on the input (the library's in-memory entry,
 * the same code bpe_load() runs after reading the file), or
 * bpe_load_tiktoken_from_string() without a tokenizer_config.json (base64
 * lines, ranks, the splits of every token into merges): JSON, normalizer,
 * pre-tokenizer (regexes compiled with PCRE2), BPE vocabulary and merges,
 * added tokens, post-processor, decoder. A tokenizer that loads is then used
 * once as a model would use it: a fixed short text with special tokens,
 * spaces, digits, non-ASCII and an invalid byte is encoded, the ids decoded
 * (whole and streamed), so what the loader built is exercised too. Then
 * bpe_free().
 *
 *   make fuzz && build-fuzz/fuzz/tokenizer fuzz/corpus/tokenizer
 * Seeds: small tokenizers from tests/fixtures/tokenizers (under ~25 KB) and
 * the first 600 ranks of tests/fixtures/tokenizers/kimi_k2/tiktoken.model.
 */
#include "fuzz.h"
#include "tokenizer/bpe.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bpe *t = NULL;
    char err[512];
    size_t k = 0;
    while (k < size && (data[k] == ' ' || data[k] == '\n' || data[k] == '\r' || data[k] == '\t'))
        k++;
    int json = k < size && data[k] == '{';
    if (json ? bpe_load_from_string(&t, (const char *)data, size, "fuzz", err, sizeof err) != 0
             : bpe_load_tiktoken_from_string(&t, (const char *)data, size, NULL, 0, "fuzz", err, sizeof err) != 0)
        return 0;
    static const char text[] = "Hello  world<|im_end|> 12345 caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd\n\t\xff x";
    int32_t ids[256];
    int n = 0;
    if (bpe_encode(t, text, sizeof text - 1, 1, ids, 256, &n, err, sizeof err) == 0 && n <= 256) {
        char out[1024];
        size_t len;
        bpe_decode(t, ids, n, 0, out, sizeof out, &len);
        bpe_decode(t, ids, n, 1, out, sizeof out, &len);
        bpe_stream *s = NULL;
        if (bpe_stream_create(t, 0, &s) == 0) {
            bpe_stream_flush(s, out, sizeof out); /* nothing queued yet (a crash once: NULL + 0) */
            for (int i = 0; i < n; i++)
                bpe_stream_push(s, ids[i], out, sizeof out);
            while (bpe_stream_flush(s, out, sizeof out) > 0)
                ;
            bpe_stream_free(s);
        }
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= bpe_n_vocab(t))
                __builtin_trap(); /* an id outside the vocabulary the tokenizer reports */
    }
    bpe_free(t);
    return 0;
}
