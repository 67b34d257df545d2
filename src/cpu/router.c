/*
 * router.c - top-k expert selection for every routing rule.
 *
 *   ROUTE_SOFTMAX        p = softmax(logits); top-k of p; optional renorm.
 *   ROUTE_SOFTMAX_GROUP  p = softmax(logits); keep the topk_group groups with
 *                        the largest max(p) in the group; top-k of the rest.
 *   ROUTE_SIGMOID_GROUP  s = sigmoid(logits); c = s + bias; keep the
 *                        topk_group groups with the largest sum of their two
 *                        best c; top-k by c; weights are s (not c); renorm
 *                        divides by (sum + 1e-20).
 * All rules then multiply the weights by the routed scaling factor.
 */
#include "cpu/router.h"

#include <math.h>

/* Index of the largest value among v[i] with allowed[i] (ties: lowest i). */
static int argmax_masked(const float *v, const float *allowed, int n)
{
    int best = -1;
    for (int i = 0; i < n; i++)
        if (allowed[i] != 0 && (best < 0 || v[i] > v[best]))
            best = i;
    return best;
}

void route_select(const route_params *r, const float *logits, int32_t *ids, float *w, float *scratch)
{
    const int E = r->n_expert, G = r->n_group, per = E / G;
    float *score = scratch, *choice = scratch + E, *allowed = scratch + 2 * E;
    if (r->kind == ROUTE_SIGMOID_GROUP) {
        for (int e = 0; e < E; e++) {
            score[e] = 1.0f / (1.0f + expf(-logits[e]));
            choice[e] = score[e] + (r->bias ? r->bias[e] : 0.0f);
        }
    } else {
        float m = -INFINITY;
        for (int e = 0; e < E; e++)
            m = logits[e] > m ? logits[e] : m;
        double s = 0;
        for (int e = 0; e < E; e++) {
            score[e] = expf(logits[e] - m);
            s += score[e];
        }
        for (int e = 0; e < E; e++) {
            score[e] = (float)(score[e] / s);
            choice[e] = score[e];
        }
    }
    for (int e = 0; e < E; e++)
        allowed[e] = 1;
    if (r->kind != ROUTE_SOFTMAX && G > 1 && r->topk_group < G) {
        /* rank groups; group scores live in a small stack array */
        float gs[1024];
        float gallow[1024];
        int ng = G <= 1024 ? G : 1024;
        for (int g = 0; g < ng; g++) {
            const float *c = choice + g * per;
            if (r->kind == ROUTE_SIGMOID_GROUP) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int i = 0; i < per; i++) {
                    if (c[i] > b1) {
                        b2 = b1;
                        b1 = c[i];
                    } else if (c[i] > b2) {
                        b2 = c[i];
                    }
                }
                gs[g] = per > 1 ? b1 + b2 : b1;
            } else {
                float b = -INFINITY;
                for (int i = 0; i < per; i++)
                    b = c[i] > b ? c[i] : b;
                gs[g] = b;
            }
            gallow[g] = 1;
        }
        float keep[1024] = { 0 };
        for (int k = 0; k < r->topk_group; k++) {
            int g = argmax_masked(gs, gallow, ng);
            keep[g] = 1;
            gallow[g] = 0;
        }
        for (int e = 0; e < E; e++)
            allowed[e] = keep[e / per];
    }
    double sum = 0;
    for (int k = 0; k < r->k; k++) {
        int e = argmax_masked(choice, allowed, E);
        ids[k] = e;
        w[k] = score[e];
        allowed[e] = 0;
        sum += w[k];
    }
    if (r->norm) {
        double den = r->kind == ROUTE_SIGMOID_GROUP ? sum + 1e-20 : sum;
        for (int k = 0; k < r->k; k++)
            w[k] = (float)(w[k] / den);
    }
    for (int k = 0; k < r->k; k++)
        w[k] *= r->scale;
}
