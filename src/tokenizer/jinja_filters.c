/*
 * jinja_filters.c - jinja2's builtin filters and tests, as chat templates use
 * them, with jinja2 3.1's argument names and defaults; tojson is
 * transformers' override (json.dumps with ensure_ascii=False).
 *
 * Filters that return generators in jinja2 (map, select, reverse, ...)
 * return lists here: identical when iterated, joined or piped into |list,
 * which is how templates use them. Builtins listed in UNSUPPORTED fail with
 * "filter 'x' is not supported yet" when evaluated. The tests (`is ...`)
 * are in jinja_tests.c.
 */
#include "tokenizer/jinja_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

static const char *const NO_PARAMS[] = {NULL};

static int given(jinja_val v) { return !(v.t == JV_UNDEF && v.owner == JU_MISSING); }
static int set(jinja_val v) { return given(v) && v.t != JV_NONE; }

static jinja_val soft_str(jinja_rt *rt, jinja_val v) { return jinja_to_str(rt, v); }

static int64_t int_arg(jinja_rt *rt, jinja_val v, const char *what)
{
    if (v.t == JV_INT || v.t == JV_BOOL)
        return v.u.i;
    if (v.t == JV_UNDEF)
        jinja_rt_undef(rt, v);
    jinja_rt_fail(rt, TANDEM_EFORMAT, "%s: '%s' object cannot be interpreted as an integer", what,
                  jinja_type_name(v));
}

/* Account n units of work of a long-running builtin (sort, unique ...). */
static void tick(jinja_rt *rt, uint64_t n)
{
    rt->steps += n;
    if (rt->steps > 20000000ull)
        jinja_rt_fail(rt, TANDEM_ENOMEM, "rendering takes too many steps (template too costly)");
}

static jinja_list *copy_list(jinja_rt *rt, const jinja_list *l)
{
    jinja_list *o = jinja_list_new(rt->a, l->n);
    if (l->n)
        memcpy(o->v, l->v, l->n * sizeof *o->v);
    o->n = l->n;
    return o;
}

/* ---- attribute getters (jinja2 make_attrgetter) ------------------------------------ */

typedef struct getter {
    int nparts;
    jinja_val parts[16];
    jinja_val dflt;
    int lower;  /* ignore_case postprocessing */
} getter;

static void getter_init(jinja_rt *rt, getter *g, jinja_val attr, jinja_val dflt, int lower)
{
    g->nparts = 0;
    g->dflt = dflt;
    g->lower = lower;
    if (!set(attr))
        return;
    if (attr.t != JV_STR) {
        g->parts[g->nparts++] = attr;
        return;
    }
    const char *p = attr.u.s.p;
    size_t n = attr.u.s.n, i = 0;
    for (;;) {
        size_t j = i;
        while (j < n && p[j] != '.')
            j++;
        if (g->nparts == 16)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "attribute path too long");
        int digits = j > i;
        int64_t num = 0;
        for (size_t k = i; k < j; k++) {
            if (p[k] < '0' || p[k] > '9' || num > (INT64_MAX - 9) / 10) {
                digits = 0;
                break;
            }
            num = num * 10 + (p[k] - '0');
        }
        g->parts[g->nparts++] = digits ? jinja_int(num) : jinja_str(p + i, j - i);
        if (j >= n)
            break;
        i = j + 1;
    }
}

static jinja_val getter_get(jinja_rt *rt, const getter *g, jinja_val item)
{
    for (int i = 0; i < g->nparts; i++) {
        item = jinja_getitem(rt, item, g->parts[i]);
        if (set(g->dflt) && item.t == JV_UNDEF)
            item = g->dflt;
    }
    if (g->lower && item.t == JV_STR)
        item = jinja_s_case(rt, item, 0);
    return item;
}

/* ---- sorting ---------------------------------------------------------------------- */

/* Stable merge sort of v[] by keys k[] (Python's sorted(key, reverse)). */
static void msort(jinja_rt *rt, jinja_val *v, jinja_val *k, size_t n, int reverse, jinja_val *tv, jinja_val *tk)
{
    if (n < 2)
        return;
    size_t h = n / 2;
    msort(rt, v, k, h, reverse, tv, tk);
    msort(rt, v + h, k + h, n - h, reverse, tv, tk);
    tick(rt, n);
    size_t i = 0, j = h, o = 0;
    while (i < h && j < n) {
        int c = reverse ? jinja_cmp(rt, k[i], k[j]) : jinja_cmp(rt, k[j], k[i]);
        if (c < 0) {
            tv[o] = v[j];
            tk[o++] = k[j++];
        } else {
            tv[o] = v[i];
            tk[o++] = k[i++];
        }
    }
    for (; i < h; i++, o++) {
        tv[o] = v[i];
        tk[o] = k[i];
    }
    for (; j < n; j++, o++) {
        tv[o] = v[j];
        tk[o] = k[j];
    }
    memcpy(v, tv, n * sizeof *v);
    memcpy(k, tk, n * sizeof *k);
}

static jinja_list *sorted_by(jinja_rt *rt, const jinja_list *items, jinja_val *keys, int reverse)
{
    jinja_list *out = copy_list(rt, items);
    size_t n = items->n;
    jinja_val *tv = jinja_alloc(rt->a, (n + 1) * sizeof *tv), *tk = jinja_alloc(rt->a, (n + 1) * sizeof *tk);
    msort(rt, out->v, keys, n, reverse, tv, tk);
    return out;
}

/* ---- filters -------------------------------------------------------------------- */

#define FILTER(name) static jinja_val f_##name(jinja_rt *rt, jinja_val in, const jinja_args *a)
#define PARAMS(fname, ...)                                   \
    static const char *const P_[] = {__VA_ARGS__, NULL};     \
    jinja_val p[sizeof P_ / sizeof P_[0]];                   \
    jinja_bind(rt, a, fname, P_, p)
#define NOPARAMS(fname) jinja_bind(rt, a, fname, NO_PARAMS, NULL)

FILTER(abs)
{
    NOPARAMS("abs");
    if (in.t == JV_FLOAT)
        return jinja_float(fabs(in.u.f));
    if (in.t == JV_INT || in.t == JV_BOOL) {
        if (in.u.i == INT64_MIN)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
        return jinja_int(in.u.i < 0 ? -in.u.i : in.u.i);
    }
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    jinja_rt_fail(rt, TANDEM_EFORMAT, "bad operand type for abs(): '%s'", jinja_type_name(in));
}

FILTER(attr)
{
    PARAMS("attr", "name");
    jinja_val name = jinja_to_str(rt, p[0]);
    const char *s = jinja_strndup(rt->a, name.u.s.p, name.u.s.n);
    jinja_val v;
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (in.t == JV_NS || in.t == JV_LOOP)
        return jinja_getattr(rt, in, s);
    if (jinja_method(rt, in, s, &v))
        return v;
    return jinja_undef_attr(in.t, s);
}

FILTER(capitalize)
{
    NOPARAMS("capitalize");
    return jinja_s_capitalize(rt, soft_str(rt, in));
}

FILTER(center)
{
    PARAMS("center", "width");
    jinja_val s = soft_str(rt, in), fn;
    jinja_val w = given(p[0]) ? p[0] : jinja_int(80);
    jinja_args ca = {1, &w, 0, NULL, NULL};
    jinja_method(rt, s, "center", &fn);
    return jinja_call(rt, fn, &ca);
}

FILTER(length)
{
    NOPARAMS("length");
    switch (in.t) {
    case JV_UNDEF: return jinja_int(0);
    case JV_STR: return jinja_int((int64_t)jinja_utf8_count(in.u.s.p, in.u.s.n));
    case JV_LIST: return jinja_int((int64_t)in.u.l->n);
    case JV_DICT: return jinja_int((int64_t)in.u.d->n);
    default: jinja_rt_fail(rt, TANDEM_EFORMAT, "object of type '%s' has no len()", jinja_type_name(in));
    }
}

FILTER(default)
{
    PARAMS("default", "default_value", "boolean");
    jinja_val dv = given(p[0]) ? p[0] : jinja_str("", 0);
    if (in.t == JV_UNDEF || (given(p[1]) && jinja_truthy(p[1]) && !jinja_truthy(in)))
        return dv;
    return in;
}

FILTER(dictsort)
{
    PARAMS("dictsort", "case_sensitive", "by", "reverse");
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (in.t != JV_DICT)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "dictsort: '%s' object has no attribute 'items'", jinja_type_name(in));
    int pos = 0;
    if (given(p[1])) {
        jinja_val by = p[1];
        if (by.t == JV_STR && by.u.s.n == 5 && !memcmp(by.u.s.p, "value", 5))
            pos = 1;
        else if (!(by.t == JV_STR && by.u.s.n == 3 && !memcmp(by.u.s.p, "key", 3)))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "You can only sort by either \"key\" or \"value\"");
    }
    int cs = given(p[0]) && jinja_truthy(p[0]);
    const jinja_dict *d = in.u.d;
    jinja_list *items = jinja_list_new(rt->a, d->n);
    jinja_val *keys = jinja_alloc(rt->a, (d->n + 1) * sizeof *keys);
    for (size_t i = 0; i < d->n; i++) {
        jinja_list *pair = jinja_list_new(rt->a, 2);
        pair->v[0] = d->k[i];
        pair->v[1] = d->v[i];
        pair->n = 2;
        items->v[i] = jinja_list_val(pair, 1);
        keys[i] = pos ? d->v[i] : d->k[i];
        if (!cs && keys[i].t == JV_STR)
            keys[i] = jinja_s_case(rt, keys[i], 0);
    }
    items->n = d->n;
    return jinja_list_val(sorted_by(rt, items, keys, given(p[2]) && jinja_truthy(p[2])), 0);
}

FILTER(escape)
{
    NOPARAMS("escape");
    if (in.t == JV_STR && (in.flag & JVF_MARKUP))
        return in;
    return jinja_s_escape(rt, soft_str(rt, in));
}

FILTER(forceescape)
{
    NOPARAMS("forceescape");
    return jinja_s_escape(rt, soft_str(rt, in));
}

FILTER(first)
{
    NOPARAMS("first");
    const jinja_list *l = jinja_iter(rt, in);
    return l->n ? l->v[0] : jinja_undef_hint("No first item, sequence was empty.");
}

FILTER(last)
{
    NOPARAMS("last");
    const jinja_list *l = jinja_iter(rt, in);
    return l->n ? l->v[l->n - 1] : jinja_undef_hint("No last item, sequence was empty.");
}

/* Python float(str): optional whitespace, sign, digits with single '_'
 * between them, inf/nan; no hex. */
static int parse_py_float(const char *s, size_t n, double *out)
{
    char tmp[128];
    size_t k = 0, i = 0, end = n;
    while (i < n && (s[i] == ' ' || (s[i] >= '\t' && s[i] <= '\r')))
        i++;
    while (end > i && (s[end - 1] == ' ' || (s[end - 1] >= '\t' && s[end - 1] <= '\r')))
        end--;
    if (end - i == 0 || end - i >= sizeof tmp)
        return 0;
    for (size_t j = i; j < end; j++) {
        char c = s[j];
        if (c == '_') {
            if (j == i || j + 1 >= end || s[j - 1] < '0' || s[j - 1] > '9' || s[j + 1] < '0' || s[j + 1] > '9')
                return 0;
            continue;
        }
        if (c == 'x' || c == 'X' || c == 'p' || c == 'P')
            return 0;
        tmp[k++] = c;
    }
    tmp[k] = 0;
    char *e;
    double v = strtod(tmp, &e);
    if (*e)
        return 0;
    *out = v;
    return 1;
}

/* Python int(str, base) for base 2..36 or 0. */
static int parse_py_int(const char *s, size_t n, int base, int64_t *out)
{
    size_t i = 0, end = n;
    while (i < n && (s[i] == ' ' || (s[i] >= '\t' && s[i] <= '\r')))
        i++;
    while (end > i && (s[end - 1] == ' ' || (s[end - 1] >= '\t' && s[end - 1] <= '\r')))
        end--;
    int neg = 0;
    if (i < end && (s[i] == '+' || s[i] == '-'))
        neg = s[i++] == '-';
    if (i + 1 < end && s[i] == '0') {
        char c = s[i + 1] | 0x20;
        int b = c == 'x' ? 16 : c == 'o' ? 8 : c == 'b' ? 2 : 0;
        if (b && (base == 0 || base == b)) {
            base = b;
            i += 2;
            if (i < end && s[i] == '_')
                i++;
        }
    }
    if (base == 0)
        base = 10;
    if (i >= end)
        return 0;
    uint64_t v = 0;
    int prev_us = 1;
    for (; i < end; i++) {
        char c = s[i];
        if (c == '_') {
            if (prev_us)
                return 0;
            prev_us = 1;
            continue;
        }
        int d = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'z' ? (c | 0x20) - 'a' + 10 : 99;
        if (d >= base)
            return 0;
        if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base)
            return 0;
        v = v * (uint64_t)base + (uint64_t)d;
        prev_us = 0;
    }
    if (prev_us || v > (uint64_t)INT64_MAX)
        return 0;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 1;
}

FILTER(float)
{
    PARAMS("float", "default");
    jinja_val dflt = given(p[0]) ? p[0] : jinja_float(0.0);
    double d;
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (jinja_is_num(in))
        return jinja_float(jinja_num(in));
    if (in.t == JV_STR && parse_py_float(in.u.s.p, in.u.s.n, &d))
        return jinja_float(d);
    return dflt;
}

FILTER(int)
{
    PARAMS("int", "default", "base");
    jinja_val dflt = given(p[0]) ? p[0] : jinja_int(0);
    int64_t base = given(p[1]) ? int_arg(rt, p[1], "int") : 10;
    int64_t i;
    double d;
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (in.t == JV_INT || in.t == JV_BOOL)
        return jinja_int(in.u.i);
    if (in.t == JV_FLOAT)
        return isfinite(in.u.f) && fabs(in.u.f) < 9.2e18 ? jinja_int((int64_t)in.u.f) : dflt;
    if (in.t == JV_STR) {
        if ((base == 0 || (base >= 2 && base <= 36)) && parse_py_int(in.u.s.p, in.u.s.n, (int)base, &i))
            return jinja_int(i);
        if (parse_py_float(in.u.s.p, in.u.s.n, &d) && isfinite(d) && fabs(d) < 9.2e18)
            return jinja_int((int64_t)d);
    }
    return dflt;
}

FILTER(format)
{
    jinja_val s = soft_str(rt, in);
    if (a->n && a->nkw)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "can't handle positional and keyword arguments at the same time");
    if (a->nkw) {
        jinja_dict *d = jinja_dict_new(rt->a, (size_t)a->nkw);
        for (int k = 0; k < a->nkw; k++)
            jinja_dict_put(rt->a, d, jinja_cstr(a->kwn[k]), a->kwv[k]);
        return jinja_s_percent(rt, s, jinja_dict_val(d));
    }
    jinja_list *l = jinja_list_new(rt->a, (size_t)a->n);
    if (a->n)
        memcpy(l->v, a->v, (size_t)a->n * sizeof *l->v);
    l->n = (size_t)a->n;
    return jinja_s_percent(rt, s, jinja_list_val(l, 1));
}

FILTER(indent)
{
    PARAMS("indent", "width", "first", "blank");
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (in.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "unsupported operand type(s) for +=: '%s' and 'str'", jinja_type_name(in));
    jinja_val ind;
    if (given(p[0]) && p[0].t == JV_STR) {
        ind = p[0];
    } else {
        int64_t w = given(p[0]) ? int_arg(rt, p[0], "indent") : 4;
        if (w > 4096)
            jinja_rt_fail(rt, TANDEM_ENOMEM, "indent width too large");
        char *sp = jinja_alloc(rt->a, w > 0 ? (size_t)w : 1);
        memset(sp, ' ', w > 0 ? (size_t)w : 0);
        ind = jinja_str(sp, w > 0 ? (size_t)w : 0);
    }
    int first = given(p[1]) && jinja_truthy(p[1]), blank = given(p[2]) && jinja_truthy(p[2]);
    jinja_buf t;
    jinja_buf_init(&t, rt->a);
    jinja_buf_put(&t, in.u.s.p, in.u.s.n);
    jinja_buf_putc(&t, '\n');  /* jinja2's quirk for splitlines */
    const jinja_list *lines = jinja_s_splitlines(rt, jinja_buf_val(&t), 0).u.l;
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    if (first)
        jinja_buf_put(&b, ind.u.s.p, ind.u.s.n);
    for (size_t i = 0; i < lines->n; i++) {
        jinja_val line = lines->v[i];
        if (i) {
            jinja_buf_putc(&b, '\n');
            if (blank || line.u.s.n)
                jinja_buf_put(&b, ind.u.s.p, ind.u.s.n);
        }
        jinja_buf_put(&b, line.u.s.p, line.u.s.n);
    }
    return jinja_buf_val(&b);
}

FILTER(items)
{
    NOPARAMS("items");
    if (in.t == JV_UNDEF)
        return jinja_list_val(jinja_list_new(rt->a, 0), 0);
    if (in.t != JV_DICT)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "Can only get item pairs from a mapping.");
    jinja_val fn;
    jinja_args none = {0, NULL, 0, NULL, NULL};
    jinja_method(rt, in, "items", &fn);
    return jinja_call(rt, fn, &none);
}

FILTER(join)
{
    PARAMS("join", "d", "attribute");
    const jinja_list *items = jinja_iter(rt, in);
    getter g;
    getter_init(rt, &g, p[1], jinja_missing(), 0);
    jinja_val sep = given(p[0]) ? jinja_to_str(rt, p[0]) : jinja_str("", 0);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    for (size_t i = 0; i < items->n; i++) {
        if (i)
            jinja_buf_put(&b, sep.u.s.p, sep.u.s.n);
        jinja_str_of(&b, g.nparts ? getter_get(rt, &g, items->v[i]) : items->v[i]);
    }
    return jinja_buf_val(&b);
}

FILTER(list)
{
    NOPARAMS("list");
    return jinja_list_val(copy_list(rt, jinja_iter(rt, in)), 0);
}

FILTER(lower)
{
    NOPARAMS("lower");
    return jinja_s_case(rt, soft_str(rt, in), 0);
}

FILTER(upper)
{
    NOPARAMS("upper");
    return jinja_s_case(rt, soft_str(rt, in), 1);
}

static jinja_val call_named_filter(jinja_rt *rt, jinja_val name, jinja_val item, const jinja_args *rest)
{
    if (name.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "filter name must be a string");
    const char *s = jinja_strndup(rt->a, name.u.s.p, name.u.s.n);
    int id = jinja_filter_lookup(s);
    if (id == -1)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "No filter named '%s'.", s);
    if (id == -2)
        jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "filter '%s' is not supported yet", s);
    return jinja_filter_apply(rt, id, item, rest);
}

static int call_named_test(jinja_rt *rt, jinja_val name, jinja_val item, const jinja_args *rest)
{
    if (name.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "test name must be a string");
    const char *s = jinja_strndup(rt->a, name.u.s.p, name.u.s.n);
    int id = jinja_test_lookup(s);
    if (id == -1)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "No test named '%s'.", s);
    if (id == -2)
        jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "test '%s' is not supported yet", s);
    return jinja_test_apply(rt, id, item, rest);
}

FILTER(map)
{
    const jinja_list *items = jinja_iter(rt, in);
    jinja_list *out = jinja_list_new(rt->a, items->n);
    if (a->n == 0) {
        jinja_val attr = jinja_missing(), dflt = jinja_missing();
        for (int k = 0; k < a->nkw; k++) {
            if (!strcmp(a->kwn[k], "attribute"))
                attr = a->kwv[k];
            else if (!strcmp(a->kwn[k], "default"))
                dflt = a->kwv[k];
            else
                jinja_rt_fail(rt, TANDEM_EFORMAT, "Unexpected keyword argument '%s'", a->kwn[k]);
        }
        if (!given(attr))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "map requires a filter name or attribute=");
        getter g;
        getter_init(rt, &g, attr, dflt, 0);
        for (size_t i = 0; i < items->n; i++)
            out->v[i] = getter_get(rt, &g, items->v[i]);
    } else {
        jinja_args rest = {a->n - 1, a->v + 1, a->nkw, a->kwn, a->kwv};
        for (size_t i = 0; i < items->n; i++)
            out->v[i] = call_named_filter(rt, a->v[0], items->v[i], &rest);
    }
    out->n = items->n;
    return jinja_list_val(out, 0);
}

static jinja_val minmax(jinja_rt *rt, jinja_val in, const jinja_args *a, int want_max)
{
    PARAMS(want_max ? "max" : "min", "case_sensitive", "attribute");
    const jinja_list *items = jinja_iter(rt, in);
    if (!items->n)
        return jinja_undef_hint("No aggregated item, sequence was empty.");
    getter g;
    getter_init(rt, &g, p[1], jinja_missing(), !(given(p[0]) && jinja_truthy(p[0])));
    size_t best = 0;
    jinja_val bk = getter_get(rt, &g, items->v[0]);
    for (size_t i = 1; i < items->n; i++) {
        jinja_val k = getter_get(rt, &g, items->v[i]);
        int c = jinja_cmp(rt, k, bk);
        if (want_max ? c > 0 : c < 0) {
            best = i;
            bk = k;
        }
    }
    return items->v[best];
}

FILTER(max) { return minmax(rt, in, a, 1); }
FILTER(min) { return minmax(rt, in, a, 0); }

/* select/reject/selectattr/rejectattr (jinja2 select_or_reject). */
static jinja_val select_reject(jinja_rt *rt, jinja_val in, const jinja_args *a, int attr, int keep)
{
    const jinja_list *items = jinja_iter(rt, in);
    getter g;
    int off = 0;
    if (attr) {
        if (a->n < 1)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "Missing parameter for attribute name");
        getter_init(rt, &g, a->v[0], jinja_missing(), 0);
        off = 1;
    }
    int has_test = a->n > off;
    jinja_args rest = {has_test ? a->n - off - 1 : 0, a->v + off + 1, a->nkw, a->kwn, a->kwv};
    jinja_list *out = jinja_list_new(rt->a, items->n);
    for (size_t i = 0; i < items->n; i++) {
        jinja_val x = attr ? getter_get(rt, &g, items->v[i]) : items->v[i];
        int r = has_test ? call_named_test(rt, a->v[off], x, &rest) : jinja_truthy(x);
        if (r == keep)
            out->v[out->n++] = items->v[i];
    }
    return jinja_list_val(out, 0);
}

FILTER(select) { return select_reject(rt, in, a, 0, 1); }
FILTER(reject) { return select_reject(rt, in, a, 0, 0); }
FILTER(selectattr) { return select_reject(rt, in, a, 1, 1); }
FILTER(rejectattr) { return select_reject(rt, in, a, 1, 0); }

FILTER(replace)
{
    PARAMS("replace", "old", "new", "count");
    if (!given(p[0]) || !given(p[1]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "replace() missing required arguments 'old' and 'new'");
    int64_t count = set(p[2]) ? int_arg(rt, p[2], "replace") : -1;
    return jinja_s_replace(rt, soft_str(rt, in), jinja_to_str(rt, p[0]), jinja_to_str(rt, p[1]), count);
}

FILTER(reverse)
{
    NOPARAMS("reverse");
    if (in.t == JV_STR) {
        int64_t n = (int64_t)jinja_utf8_count(in.u.s.p, in.u.s.n);
        return jinja_s_slice(rt, in, n - 1, -1, -1);
    }
    const jinja_list *l = jinja_iter(rt, in);
    jinja_list *o = jinja_list_new(rt->a, l->n);
    for (size_t i = 0; i < l->n; i++)
        o->v[i] = l->v[l->n - 1 - i];
    o->n = l->n;
    return jinja_list_val(o, 0);
}

FILTER(round)
{
    PARAMS("round", "precision", "method");
    int64_t prec = given(p[0]) ? int_arg(rt, p[0], "round") : 0;
    int method = 0;  /* common */
    if (given(p[1])) {
        jinja_val m = p[1];
        if (m.t == JV_STR && m.u.s.n == 4 && !memcmp(m.u.s.p, "ceil", 4))
            method = 1;
        else if (m.t == JV_STR && m.u.s.n == 5 && !memcmp(m.u.s.p, "floor", 5))
            method = 2;
        else if (!(m.t == JV_STR && m.u.s.n == 6 && !memcmp(m.u.s.p, "common", 6)))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "method must be common, ceil or floor");
    }
    if (in.t == JV_UNDEF)
        jinja_rt_undef(rt, in);
    if (!jinja_is_num(in))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "type %s doesn't define __round__ method", jinja_type_name(in));
    if (prec > 300)
        prec = 300;
    if (prec < -300)
        prec = -300;
    double scale = pow(10.0, (double)prec);
    if (method) {
        double x = jinja_num(in) * scale;
        return jinja_float((method == 1 ? ceil(x) : floor(x)) / scale);
    }
    if (in.t != JV_FLOAT) {  /* round(int, n) stays an int */
        if (prec >= 0)
            return jinja_int(in.u.i);
        double r = nearbyint((double)in.u.i / (1.0 / scale)) * (1.0 / scale);
        return jinja_int((int64_t)r);
    }
    double x = in.u.f;
    if (!isfinite(x))
        return jinja_float(x);
    if (prec >= 0) {
        /* printf rounds the exact binary value half-to-even, as Python's round */
        char buf[512];
        snprintf(buf, sizeof buf, "%.*f", (int)prec, x);
        return jinja_float(strtod(buf, NULL));
    }
    double y = nearbyint(x * scale) / scale;
    return jinja_float(y);
}

FILTER(safe)
{
    NOPARAMS("safe");
    jinja_val s = soft_str(rt, in);
    s.flag = JVF_MARKUP;
    return s;
}

FILTER(sort)
{
    PARAMS("sort", "reverse", "case_sensitive", "attribute");
    const jinja_list *items = jinja_iter(rt, in);
    int lower = !(given(p[1]) && jinja_truthy(p[1]));
    /* comma separated attributes give a list key (make_multi_attrgetter) */
    jinja_val attrs[16];
    int na = 0;
    if (set(p[2]) && p[2].t == JV_STR) {
        const char *s = p[2].u.s.p;
        size_t n = p[2].u.s.n, i = 0;
        for (;;) {
            size_t j = i;
            while (j < n && s[j] != ',')
                j++;
            if (na == 16)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "too many sort attributes");
            attrs[na++] = jinja_str(s + i, j - i);
            if (j >= n)
                break;
            i = j + 1;
        }
    } else {
        attrs[na++] = set(p[2]) ? p[2] : jinja_missing();
    }
    getter g[16];
    for (int k = 0; k < na; k++)
        getter_init(rt, &g[k], attrs[k], jinja_missing(), lower);
    jinja_val *keys = jinja_alloc(rt->a, (items->n + 1) * sizeof *keys);
    for (size_t i = 0; i < items->n; i++) {
        jinja_list *kl = jinja_list_new(rt->a, (size_t)na);
        for (int k = 0; k < na; k++)
            kl->v[k] = getter_get(rt, &g[k], items->v[i]);
        kl->n = (size_t)na;
        keys[i] = jinja_list_val(kl, 0);
    }
    return jinja_list_val(sorted_by(rt, items, keys, given(p[0]) && jinja_truthy(p[0])), 0);
}

FILTER(string)
{
    NOPARAMS("string");
    return soft_str(rt, in);
}

FILTER(sum)
{
    PARAMS("sum", "attribute", "start");
    const jinja_list *items = jinja_iter(rt, in);
    getter g;
    getter_init(rt, &g, p[0], jinja_missing(), 0);
    jinja_val acc = given(p[1]) ? p[1] : jinja_int(0);
    for (size_t i = 0; i < items->n; i++)
        acc = jinja_binop(rt, JO_ADD, acc, g.nparts ? getter_get(rt, &g, items->v[i]) : items->v[i]);
    return acc;
}

/* jinja2's |title: split at runs of [-\s({[<], upper the first character of
 * each piece and lower the rest. */
FILTER(title)
{
    NOPARAMS("title");
    jinja_val s = soft_str(rt, in);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    size_t i = 0;
    int start = 1;
    while (i < s.u.s.n) {
        size_t at = i;
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        int sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || jinja_py_isspace(c);
        if (sep) {
            jinja_buf_put(&b, s.u.s.p + at, i - at);
            start = 1;
            continue;
        }
        jinja_val m = jinja_s_case(rt, jinja_str(s.u.s.p + at, i - at), start);
        jinja_buf_put(&b, m.u.s.p, m.u.s.n);
        start = 0;
    }
    return jinja_buf_val(&b);
}

FILTER(tojson)
{
    PARAMS("tojson", "ensure_ascii", "indent", "separators", "sort_keys");
    jinja_json_opts o;
    memset(&o, 0, sizeof o);
    o.ensure_ascii = given(p[0]) && jinja_truthy(p[0]);
    o.sort_keys = given(p[3]) && jinja_truthy(p[3]);
    if (set(p[1])) {
        if (p[1].t == JV_STR) {
            o.indent = p[1].u.s.p;
            o.indent_n = p[1].u.s.n;
        } else {
            int64_t w = int_arg(rt, p[1], "tojson indent");
            if (w > 4096)
                jinja_rt_fail(rt, TANDEM_ENOMEM, "tojson indent too large");
            char *sp = jinja_alloc(rt->a, w > 0 ? (size_t)w : 1);
            memset(sp, ' ', w > 0 ? (size_t)w : 0);
            o.indent = sp;
            o.indent_n = w > 0 ? (size_t)w : 0;
        }
    }
    if (set(p[2])) {
        jinja_val s = p[2];
        if (s.t != JV_LIST || s.u.l->n != 2 || s.u.l->v[0].t != JV_STR || s.u.l->v[1].t != JV_STR)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "tojson: separators must be a pair of strings");
        o.item_sep = s.u.l->v[0].u.s.p;
        o.item_sep_n = s.u.l->v[0].u.s.n;
        o.key_sep = s.u.l->v[1].u.s.p;
        o.key_sep_n = s.u.l->v[1].u.s.n;
    } else {
        o.item_sep = o.indent ? "," : ", ";
        o.item_sep_n = o.indent ? 1 : 2;
        o.key_sep = ": ";
        o.key_sep_n = 2;
    }
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    jinja_tojson(rt, &b, in, &o);
    return jinja_buf_val(&b);
}

FILTER(trim)
{
    PARAMS("trim", "chars");
    return jinja_s_strip(rt, soft_str(rt, in), given(p[0]) ? p[0] : jinja_none(), 1, 1);
}

FILTER(unique)
{
    PARAMS("unique", "case_sensitive", "attribute");
    const jinja_list *items = jinja_iter(rt, in);
    getter g;
    getter_init(rt, &g, p[1], jinja_missing(), !(given(p[0]) && jinja_truthy(p[0])));
    jinja_list *out = jinja_list_new(rt->a, items->n);
    jinja_val *seen = jinja_alloc(rt->a, (items->n + 1) * sizeof *seen);
    size_t nseen = 0;
    for (size_t i = 0; i < items->n; i++) {
        jinja_val k = getter_get(rt, &g, items->v[i]);
        if (!jinja_hashable(k))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "unhashable type: '%s'", jinja_type_name(k));
        tick(rt, nseen);
        size_t j;
        for (j = 0; j < nseen; j++)
            if (jinja_eq(seen[j], k))
                break;
        if (j < nseen)
            continue;
        seen[nseen++] = k;
        out->v[out->n++] = items->v[i];
    }
    return jinja_list_val(out, 0);
}

FILTER(wordcount)
{
    NOPARAMS("wordcount");
    jinja_val s = soft_str(rt, in);
    int64_t words = 0;
    int inword = 0;
    size_t i = 0;
    while (i < s.u.s.n) {
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
        int w = c == '_' || (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
                (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
        if (w && !inword)
            words++;
        inword = w;
    }
    return jinja_int(words);
}

FILTER(batch)
{
    PARAMS("batch", "linecount", "fill_with");
    int64_t count = int_arg(rt, p[0], "batch");
    const jinja_list *items = jinja_iter(rt, in);
    jinja_list *out = jinja_list_new(rt->a, 4), *cur = jinja_list_new(rt->a, 4);
    for (size_t i = 0; i < items->n; i++) {
        if ((int64_t)cur->n == count) {
            jinja_list_push(rt->a, out, jinja_list_val(cur, 0));
            cur = jinja_list_new(rt->a, 4);
        }
        jinja_list_push(rt->a, cur, items->v[i]);
        tick(rt, 1);
    }
    if (cur->n) {
        if (set(p[1]) && (int64_t)cur->n < count) {
            if (count > 1000000)
                jinja_rt_fail(rt, TANDEM_ENOMEM, "batch size too large");
            while ((int64_t)cur->n < count)
                jinja_list_push(rt->a, cur, p[1]);
        }
        jinja_list_push(rt->a, out, jinja_list_val(cur, 0));
    }
    return jinja_list_val(out, 0);
}

FILTER(truncate)
{
    PARAMS("truncate", "length", "killwords", "end", "leeway");
    int64_t length = given(p[0]) ? int_arg(rt, p[0], "truncate") : 255;
    jinja_val end = given(p[2]) ? p[2] : jinja_str("...", 3);
    int64_t leeway = set(p[3]) ? int_arg(rt, p[3], "truncate") : 5;
    if (in.t == JV_UNDEF)
        return in;
    if (in.t != JV_STR || end.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "truncate expects a string, not %s", jinja_type_name(in));
    int64_t endlen = (int64_t)jinja_utf8_count(end.u.s.p, end.u.s.n);
    if (length < endlen || leeway < 0)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "truncate: expected length >= %lld and leeway >= 0", (long long)endlen);
    int64_t n = (int64_t)jinja_utf8_count(in.u.s.p, in.u.s.n);
    if (n <= length + leeway)
        return in;
    jinja_val head = jinja_s_slice(rt, in, 0, length - endlen, 1);
    if (!(given(p[1]) && jinja_truthy(p[1]))) {  /* drop the last partial word: rsplit(" ", 1)[0] */
        const char *sp = NULL;
        for (size_t i = head.u.s.n; i-- > 0;)
            if (head.u.s.p[i] == ' ') {
                sp = head.u.s.p + i;
                break;
            }
        if (sp)
            head.u.s.n = (size_t)(sp - head.u.s.p);
    }
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    jinja_buf_put(&b, head.u.s.p, head.u.s.n);
    jinja_buf_put(&b, end.u.s.p, end.u.s.n);
    return jinja_buf_val(&b);
}

typedef jinja_val (*filter_fn)(jinja_rt *, jinja_val, const jinja_args *);
static const struct { const char *name; filter_fn fn; } FILTERS[] = {
    {"abs", f_abs}, {"attr", f_attr}, {"batch", f_batch}, {"capitalize", f_capitalize}, {"center", f_center},
    {"count", f_length}, {"d", f_default}, {"default", f_default}, {"dictsort", f_dictsort},
    {"e", f_escape}, {"escape", f_escape}, {"first", f_first}, {"float", f_float},
    {"forceescape", f_forceescape}, {"format", f_format}, {"indent", f_indent}, {"int", f_int},
    {"items", f_items}, {"join", f_join}, {"last", f_last}, {"length", f_length}, {"list", f_list},
    {"lower", f_lower}, {"map", f_map}, {"max", f_max}, {"min", f_min}, {"reject", f_reject},
    {"rejectattr", f_rejectattr}, {"replace", f_replace}, {"reverse", f_reverse}, {"round", f_round},
    {"safe", f_safe}, {"select", f_select}, {"selectattr", f_selectattr}, {"sort", f_sort},
    {"string", f_string}, {"sum", f_sum}, {"title", f_title}, {"tojson", f_tojson}, {"trim", f_trim},
    {"truncate", f_truncate}, {"unique", f_unique}, {"upper", f_upper}, {"wordcount", f_wordcount},
};

/* jinja2 builtins not implemented: known, so the error says "not supported yet". */
static const char *const UNSUPPORTED[] = {
    "filesizeformat", "groupby", "pprint", "random", "slice", "striptags",
    "urlencode", "urlize", "wordwrap", "xmlattr", NULL,
};

#define NFILTERS ((int)(sizeof FILTERS / sizeof FILTERS[0]))

int jinja_filter_lookup(const char *name)
{
    for (int i = 0; i < NFILTERS; i++)
        if (!strcmp(FILTERS[i].name, name))
            return i;
    for (int i = 0; UNSUPPORTED[i]; i++)
        if (!strcmp(UNSUPPORTED[i], name))
            return -2;
    return -1;
}

jinja_val jinja_filter_apply(jinja_rt *rt, int id, jinja_val in, const jinja_args *a)
{
    return FILTERS[id].fn(rt, in, a);
}
