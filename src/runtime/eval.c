/*
 * eval.c - likelihood of a token sequence, for perplexity: the one
 * definition shared by `tandem perplexity`, the tests and the accuracy
 * measurements of lossy features (quantised experts, deferral).
 */
#include "core/err.h"
#include "runtime/engine.h"

#include <math.h>
#include <stdlib.h>

int tandem_eval_nll(tandem_session *s, int seq, const int32_t *tokens, int n, double *nll, char *err,
                    size_t errlen)
{
    *nll = NAN;
    if (n < 2)
        return td_err(err, errlen, TANDEM_EINVAL, "perplexity needs at least 2 tokens");
    if (n > s->n_batch || n - 1 > s->n_outputs)
        return td_err(err, errlen, TANDEM_EFULL, "perplexity: %d tokens exceed the session's batch (%d) or outputs (%d)",
                      n, s->n_batch, s->n_outputs);
    int32_t *pos = malloc((size_t)n * (sizeof *pos + sizeof(int32_t) + 1));
    if (!pos)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    int32_t *sq = pos + n;
    int8_t *want = (int8_t *)(sq + n);
    for (int i = 0; i < n; i++) {
        pos[i] = i;
        sq[i] = seq;
        want[i] = i < n - 1;
    }
    int rc = tandem_kv_clear(s, seq);
    if (rc) {
        free(pos);
        return td_err(err, errlen, rc, "perplexity: no sequence %d", seq);
    }
    tandem_batch b = { n, tokens, pos, sq, want };
    rc = tandem_forward(s, &b, err, errlen);
    if (!rc) {
        const int V = s->e->d.n_vocab;
        double sum = 0;
        for (int i = 0; i < n - 1; i++) {
            const float *l = tandem_logits(s, i);
            float mx = l[0];
            for (int v = 1; v < V; v++)
                mx = l[v] > mx ? l[v] : mx;
            double z = 0;
            for (int v = 0; v < V; v++)
                z += exp((double)l[v] - mx);
            sum += -((double)l[tokens[i + 1]] - mx - log(z));
        }
        *nll = sum / (n - 1);
    }
    free(pos);
    return rc;
}
