/*
 * router.h - expert selection from router logits, one token at a time.
 *
 * Implements the routing rules of model.h's route_kind exactly as the
 * reference implementations do (fp32 scores; ties broken towards the lower
 * expert id). Output: k expert ids and their weights (already multiplied by
 * the routed scaling factor).
 */
#ifndef TD_CPU_ROUTER_H
#define TD_CPU_ROUTER_H

#include <stdint.h>

#include "model/model.h"

typedef struct {
    route_kind kind;
    int n_expert, k;
    int norm;             /* renormalise the k weights to sum 1 */
    float scale;          /* routed_scaling_factor */
    int n_group, topk_group;
    const float *bias;    /* [n_expert] e_score_correction_bias, or NULL */
} route_params;

/* logits [n_expert] -> ids [k], w [k]. scratch: 3 * n_expert floats. */
void route_select(const route_params *r, const float *logits, int32_t *ids, float *w, float *scratch);

#endif
