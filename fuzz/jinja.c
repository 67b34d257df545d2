/*
 * fuzz/jinja.c - libFuzzer target: a chat template (Jinja2 subset).
 *
 * Calls jinja_parse() on the input, then jinja_render_len() against a small
 * fixed context shaped like a chat request (messages with every role, a
 * tool, tool calls, add_generation_prompt, bos/eos tokens), so the lexer,
 * parser, evaluator, filters, tests and methods all see fuzzed programs. The
 * interpreter bounds a render's memory and steps (hostile templates), so an
 * input that loops is an error, not a timeout. Then jinja_free().
 *
 *   make fuzz && build-fuzz/fuzz/jinja fuzz/corpus/jinja
 * Seeds: the model templates of tests/fixtures/templates and the sources of
 * their test cases.
 */
#include "fuzz.h"
#include "tokenizer/jinja.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static json_t *ctx;

static const char ctx_json[] =
    "{\"messages\": ["
    "{\"role\": \"system\", \"content\": \"You are terse.\"},"
    "{\"role\": \"user\", \"content\": \"What is 2+2? \\u00e9\"},"
    "{\"role\": \"assistant\", \"content\": \"<think>easy</think>4\", \"tool_calls\": [{\"type\": \"function\","
    " \"function\": {\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 2}}}]},"
    "{\"role\": \"tool\", \"content\": \"4\"},"
    "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"thanks\"}]}],"
    "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"add\", \"description\": \"a+b\","
    " \"parameters\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}}}],"
    "\"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\","
    "\"enable_thinking\": false, \"n\": 3, \"x\": 1.5, \"none\": null}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ctx) {
        json_error_t je;
        ctx = json_loads(ctx_json, 0, &je);
        if (!ctx)
            __builtin_trap(); /* the fixed context above is malformed */
    }
    jinja_tmpl *t = NULL;
    char err[512];
    if (jinja_parse(&t, (const char *)data, size, err, sizeof err) != 0)
        return 0;
    char *out = NULL;
    size_t len = 0;
    if (jinja_render_len(t, ctx, &out, &len, err, sizeof err) == 0)
        free(out);
    jinja_free(t);
    return 0;
}
