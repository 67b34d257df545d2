/*
 * calib.c - routing counts: the JSON file (calib.h), the choice of the
 * most routed experts, and the public calls that collect counts in a CPU
 * session (tandem_count_routes, tandem_route_counts, tandem_save_route_counts).
 * forward.c adds to s->route_counts after each MoE layer's router.
 */
#include "runtime/calib.h"
#include "core/err.h"
#include "runtime/engine.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

int calib_save(const tandem_engine *e, const int64_t *counts, int64_t tokens, const char *path, char *err,
               size_t errlen)
{
    const model_desc *d = &e->d;
    json_t *root = json_object(), *layers = json_object();
    json_object_set_new(root, "format", json_string("tandem-expert-counts"));
    json_object_set_new(root, "version", json_integer(1));
    json_object_set_new(root, "architecture", json_string(d->arch_name));
    json_object_set_new(root, "n_layer", json_integer(d->n_layer));
    json_object_set_new(root, "n_expert", json_integer(d->n_expert));
    json_object_set_new(root, "n_expert_used", json_integer(d->n_expert_used));
    json_object_set_new(root, "tokens", json_integer(tokens));
    for (int l = 0; l < d->n_layer; l++) {
        if (!d->layer_moe[l])
            continue;
        json_t *row = json_array();
        for (int x = 0; x < d->n_expert; x++)
            json_array_append_new(row, json_integer(counts[(int64_t)l * d->n_expert + x]));
        char key[16];
        snprintf(key, sizeof key, "%d", l);
        json_object_set_new(layers, key, row);
    }
    json_object_set_new(root, "layers", layers);
    int rc = json_dump_file(root, path, JSON_COMPACT) == 0
                 ? 0
                 : td_err(err, errlen, TANDEM_EIO, "%s: cannot write the routing counts", path);
    json_decref(root);
    return rc;
}

static int want_int(json_t *root, const char *key, int64_t want, const char *path, char *err, size_t errlen)
{
    json_t *v = json_object_get(root, key);
    if (!json_is_integer(v))
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: field '%s' is missing or not an integer", path, key);
    if (want >= 0 && json_integer_value(v) != want)
        return td_err(err, errlen, TANDEM_EINVAL, "%s: field '%s' is %lld, but this model has %lld", path, key,
                      (long long)json_integer_value(v), (long long)want);
    return 0;
}

int calib_load(const tandem_engine *e, const char *path, int64_t *counts, int64_t *tokens, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: not a routing counts file (%s, line %d)", path, je.text,
                      je.line);
    int rc = 0;
    json_t *fmt = json_object_get(root, "format"), *arch = json_object_get(root, "architecture");
    json_t *layers = json_object_get(root, "layers");
    if (!json_is_object(root) || !json_is_string(fmt) || strcmp(json_string_value(fmt), "tandem-expert-counts")) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: field 'format' is not \"tandem-expert-counts\"", path);
        goto done;
    }
    if ((rc = want_int(root, "version", 1, path, err, errlen)) || (rc = want_int(root, "n_layer", d->n_layer, path,
                                                                                   err, errlen)) ||
        (rc = want_int(root, "n_expert", d->n_expert, path, err, errlen)) ||
        (rc = want_int(root, "tokens", -1, path, err, errlen)))
        goto done;
    if (!json_is_string(arch) || strcmp(json_string_value(arch), d->arch_name)) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "%s: field 'architecture' is %s, but this model is %s", path,
                    json_is_string(arch) ? json_string_value(arch) : "missing", d->arch_name);
        goto done;
    }
    *tokens = json_integer_value(json_object_get(root, "tokens"));
    if (!json_is_object(layers)) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: field 'layers' is missing or not an object", path);
        goto done;
    }
    memset(counts, 0, (size_t)d->n_layer * (size_t)d->n_expert * sizeof *counts);
    int n_moe = 0;
    for (int l = 0; l < d->n_layer; l++) {
        if (!d->layer_moe[l])
            continue;
        n_moe++;
        char key[16];
        snprintf(key, sizeof key, "%d", l);
        json_t *row = json_object_get(layers, key);
        if (!json_is_array(row) || json_array_size(row) != (size_t)d->n_expert) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: layers.%s must be an array of %d counts (layer %d is MoE)",
                        path, key, d->n_expert, l);
            goto done;
        }
        for (int x = 0; x < d->n_expert; x++) {
            json_t *c = json_array_get(row, (size_t)x);
            if (!json_is_integer(c) || json_integer_value(c) < 0) {
                rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: layers.%s[%d] is not a count (an integer >= 0)", path,
                            key, x);
                goto done;
            }
            counts[(int64_t)l * d->n_expert + x] = json_integer_value(c);
        }
    }
    if (json_object_size(layers) != (size_t)n_moe) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: field 'layers' has %zu entries, this model has %d MoE layers",
                    path, json_object_size(layers), n_moe);
        goto done;
    }
done:
    json_decref(root);
    return rc;
}

/* rank of x among the experts: by count, descending, then id ascending */
static int before(const int64_t *c, int a, int b) { return c[a] > c[b] || (c[a] == c[b] && a < b); }

void calib_pick(const int64_t *counts, int n_expert, int n, int32_t *out)
{
    int k = 0;
    for (int x = 0; x < n_expert && k < n; x++) {
        int ahead = 0; /* experts ranked before x */
        for (int y = 0; y < n_expert && ahead < n; y++)
            ahead += y != x && before(counts, y, x);
        if (ahead < n)
            out[k++] = x;
    }
}

double calib_share(const int64_t *counts, int n_expert, int n)
{
    int32_t *top = malloc((size_t)(n > 0 ? n : 1) * sizeof *top);
    int64_t all = 0, in = 0;
    if (!top)
        return 0;
    calib_pick(counts, n_expert, n, top);
    for (int x = 0; x < n_expert; x++)
        all += counts[x];
    for (int i = 0; i < n; i++)
        in += counts[top[i]];
    free(top);
    return all ? (double)in / (double)all : n >= n_expert;
}

/* ---- the public calls ------------------------------------------------------------- */
int tandem_count_routes(tandem_session *s, int on, char *err, size_t errlen)
{
    if (!s)
        return td_err(err, errlen, TANDEM_EINVAL, "no session");
    if (on && s->hys)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "routing counts are collected by CPU sessions only (open the engine with the GPU off)");
    if (!on) {
        free(s->route_counts);
        s->route_counts = NULL;
        s->routed_tokens = 0;
        return 0;
    }
    if (s->route_counts)
        return 0;
    if (!s->e->d.n_expert)
        return td_err(err, errlen, TANDEM_EINVAL, "this model has no routed experts to count");
    s->route_counts = calloc((size_t)s->e->d.n_layer * (size_t)s->e->d.n_expert, sizeof *s->route_counts);
    s->routed_tokens = 0;
    return s->route_counts ? 0 : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
}

const int64_t *tandem_route_counts(const tandem_session *s, int64_t *tokens)
{
    if (tokens)
        *tokens = s ? s->routed_tokens : 0;
    return s ? s->route_counts : NULL;
}

int tandem_save_route_counts(const tandem_session *s, const char *path, char *err, size_t errlen)
{
    if (!s || !s->route_counts)
        return td_err(err, errlen, TANDEM_EINVAL, "routing counts are not being collected (tandem_count_routes)");
    return calib_save(s->e, s->route_counts, s->routed_tokens, path, err, errlen);
}
