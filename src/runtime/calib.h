/*
 * calib.h - routing counts: how often the router of each MoE layer chose
 * each routed expert. CPU sessions collect them (tandem_count_routes), they
 * are saved as JSON (tandem_save_route_counts, `tandem calibrate`), and the
 * hybrid engine reads them at load to keep each layer's most chosen experts
 * on the GPU (--gpu-experts N).
 *
 * File (one JSON object):
 *   {"format": "tandem-expert-counts", "version": 1,
 *    "architecture": "Qwen3MoeForCausalLM", "n_layer": 48, "n_expert": 128,
 *    "n_expert_used": 8, "tokens": 4096,
 *    "layers": {"0": [c_0, ..., c_127], "1": [...], ...}}
 * with one entry per MoE layer (keys are layer indices) and nothing else.
 */
#ifndef TD_RUNTIME_CALIB_H
#define TD_RUNTIME_CALIB_H

#include <stddef.h>
#include <stdint.h>

struct tandem_engine;

#define CALIB_FILE "expert-counts.json" /* looked for in the model directory */

/* counts: [n_layer][n_expert] (rows of dense layers ignored). */
int calib_save(const struct tandem_engine *e, const int64_t *counts, int64_t tokens, const char *path, char *err,
               size_t errlen);

/* Read path into counts [n_layer][n_expert] (dense rows zero). Checks that the
 * file describes this model (architecture, layer and expert counts, one row
 * per MoE layer of the right length, counts >= 0) and names the field that
 * does not. */
int calib_load(const struct tandem_engine *e, const char *path, int64_t *counts, int64_t *tokens, char *err,
               size_t errlen);

/* The n experts with the highest counts (ties: lower id first), written to
 * out[0..n) in ascending id order. */
void calib_pick(const int64_t *counts, int n_expert, int n, int32_t *out);

/* Fraction of the routings in counts [n_expert] that the n most chosen
 * experts take (1 when nothing was counted and n == n_expert). */
double calib_share(const int64_t *counts, int n_expert, int n);

#endif
