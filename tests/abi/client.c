/*
 * client.c - a program built against a frozen copy of the 0.1 header
 * (tests/abi/v0/tandem.h), compiled on its own and linked with the current
 * libtandem.so: what an application shipped against the first release does.
 * It checks the library's version against the header's, routes the log
 * through a callback, and generates a few greedy tokens with the demo model.
 * Exit 0 on success; every failure prints one line.
 *
 *   client MODEL_DIR
 */
#include "tandem.h"

#include <stdio.h>
#include <string.h>

static int n_logged;

static void on_log(int level, const char *msg, void *user)
{
    (void)level, (void)msg;
    n_logged += user == &n_logged;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "models/demo";
    if (tandem_version_number() / 10000 != TANDEM_VERSION_MAJOR || tandem_version_number() < TANDEM_VERSION_NUMBER) {
        printf("abi client: library %s is not compatible with header %s\n", tandem_version(), TANDEM_VERSION);
        return 1;
    }
    tandem_set_log(on_log, &n_logged);
    tandem_set_log_level(TANDEM_LOG_DEBUG);
    char err[512];
    tandem_engine_params ep;
    tandem_engine_params_default(&ep);
    ep.n_threads = 2;
    ep.gpu = 0;
    tandem_engine *e = NULL;
    tandem_session *s = NULL;
    tandem_tokenizer *t = NULL;
    tandem_session_params sp;
    tandem_session_params_default(&sp);
    sp.n_ctx = 64;
    if (tandem_engine_open(dir, &ep, &e, err, sizeof err) || tandem_session_create(e, &sp, &s, err, sizeof err) ||
        tandem_tokenizer_open(dir, &t, err, sizeof err)) {
        printf("abi client: %s\n", err);
        return 1;
    }
    tandem_model_info mi;
    tandem_engine_info(e, &mi);
    int32_t tok[32], pos[32];
    int n = 0, rc = tandem_tokenize(t, "Package: ", 9, 1, tok, 32, &n, err, sizeof err);
    char text[256] = "";
    for (int step = 0; !rc && step < 8; step++) {
        for (int i = 0; i < n; i++)
            pos[i] = tandem_kv_len(s, 0) + i;
        tandem_batch b = { n, tok, pos, NULL, NULL };
        if ((rc = tandem_forward(s, &b, err, sizeof err)))
            break;
        const float *l = tandem_logits(s, 0);
        int best = 0;
        for (int v = 1; v < tandem_n_vocab(e); v++)
            best = l[v] > l[best] ? v : best;
        tok[0] = best;
        n = 1;
        snprintf(text + strlen(text), sizeof text - strlen(text), " %d", best);
    }
    tandem_set_log(NULL, NULL);
    tandem_set_log_level(TANDEM_LOG_WARN);
    if (!rc)
        printf("abi client: library %s, header %s, %s (%d layers, isa %s), tokens%s, %d log lines to the callback\n",
               tandem_version(), TANDEM_VERSION, mi.arch, mi.n_layer, mi.isa, text, n_logged);
    else
        printf("abi client: %s\n", err);
    tandem_tokenizer_close(t);
    tandem_session_free(s);
    tandem_engine_close(e);
    return rc || !n_logged;
}
