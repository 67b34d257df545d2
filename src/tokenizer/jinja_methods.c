/*
 * jinja_methods.c - what templates can call that is not a filter: methods of
 * str, dict, list and loop (as bound functions), and the global functions of
 * transformers' environment: range, dict, namespace, raise_exception,
 * strftime_now (plus jinja2's lipsum/cycler/joiner, reported unsupported).
 *
 * As in jinja2's ImmutableSandboxedEnvironment, methods that would mutate a
 * list or dict (append, update, pop ...) are unsafe: using them fails with
 * jinja2's SecurityError message. dict.keys()/values()/items() return lists
 * (Python returns views, which only differ if a template prints them).
 */
#include "tokenizer/jinja_impl.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

unsigned jinja_bind(jinja_rt *rt, const jinja_args *a, const char *fname, const char *const *params,
                    jinja_val *out)
{
    int np = 0;
    while (params[np])
        np++;
    for (int i = 0; i < np; i++)
        out[i] = jinja_missing();
    if (a->n > np)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() takes at most %d argument(s) (%d given)", fname, np, a->n);
    unsigned mask = 0;
    for (int i = 0; i < a->n; i++) {
        out[i] = a->v[i];
        mask |= 1u << i;
    }
    for (int k = 0; k < a->nkw; k++) {
        int j;
        for (j = 0; j < np; j++)
            if (!strcmp(params[j], a->kwn[k]))
                break;
        if (j == np)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() got an unexpected keyword argument '%s'", fname, a->kwn[k]);
        if (mask & (1u << j))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() got multiple values for argument '%s'", fname, a->kwn[k]);
        out[j] = a->kwv[k];
        mask |= 1u << j;
    }
    return mask;
}

static int given(jinja_val v) { return !(v.t == JV_UNDEF && v.owner == JU_MISSING); }

static int64_t int_arg(jinja_rt *rt, jinja_val v, const char *what)
{
    if (v.t == JV_INT || v.t == JV_BOOL)
        return v.u.i;
    if (v.t == JV_UNDEF)
        jinja_rt_undef(rt, v);
    jinja_rt_fail(rt, TANDEM_EFORMAT, "%s: '%s' object cannot be interpreted as an integer", what,
                  jinja_type_name(v));
}

static void need_str_arg(jinja_rt *rt, jinja_val v, const char *fname)
{
    if (v.t == JV_UNDEF)
        jinja_rt_undef(rt, v);
    if (v.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() argument must be str, not %s", fname, jinja_type_name(v));
}

/* ---- str ------------------------------------------------------------------------ */

static const char *const P_NONE[] = {NULL};
static const char *const P_CHARS[] = {"chars", NULL};
static const char *const P_SPLIT[] = {"sep", "maxsplit", NULL};
static const char *const P_KEEPENDS[] = {"keepends", NULL};
static const char *const P_REPLACE[] = {"old", "new", "count", NULL};
static const char *const P_RANGE[] = {"sub", "start", "end", NULL};
static const char *const P_ONE[] = {"x", NULL};
static const char *const P_PAD[] = {"width", "fillchar", NULL};

static jinja_val m_strip_(jinja_rt *rt, jinja_val s, const jinja_args *a, int l, int r, const char *name)
{
    jinja_val p[1];
    jinja_bind(rt, a, name, P_CHARS, p);
    return jinja_s_strip(rt, s, p[0], l, r);
}
static jinja_val m_strip(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_strip_(rt, s, a, 1, 1, "strip"); }
static jinja_val m_lstrip(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_strip_(rt, s, a, 1, 0, "lstrip"); }
static jinja_val m_rstrip(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_strip_(rt, s, a, 0, 1, "rstrip"); }

static jinja_val m_split_(jinja_rt *rt, jinja_val s, const jinja_args *a, int right)
{
    jinja_val p[2];
    jinja_bind(rt, a, right ? "rsplit" : "split", P_SPLIT, p);
    int64_t max = given(p[1]) ? int_arg(rt, p[1], "maxsplit") : -1;
    return jinja_s_split(rt, s, p[0], max < 0 ? -1 : max, right);
}
static jinja_val m_split(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_split_(rt, s, a, 0); }
static jinja_val m_rsplit(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_split_(rt, s, a, 1); }

static jinja_val m_splitlines(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_val p[1];
    jinja_bind(rt, a, "splitlines", P_KEEPENDS, p);
    return jinja_s_splitlines(rt, s, given(p[0]) && jinja_truthy(p[0]));
}

static jinja_val m_replace(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_val p[3];
    jinja_bind(rt, a, "replace", P_REPLACE, p);
    if (!given(p[0]) || !given(p[1]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "replace() takes at least 2 arguments");
    return jinja_s_replace(rt, s, p[0], p[1], given(p[2]) ? int_arg(rt, p[2], "replace") : -1);
}

/* s[start:end] for the optional start/end of find/count/startswith;
 * *base gets the code point index of the slice start. */
static jinja_val sub_range(jinja_rt *rt, jinja_val s, jinja_val start, jinja_val end, int64_t *base)
{
    *base = 0;
    if (!given(start) && !given(end))
        return s;
    int64_t n = (int64_t)jinja_utf8_count(s.u.s.p, s.u.s.n), lo, hi, st, len;
    jinja_slice_indices(rt, n, start.t == JV_NONE ? jinja_missing() : start,
                        end.t == JV_NONE ? jinja_missing() : end, jinja_missing(), &lo, &hi, &st, &len);
    *base = lo;
    return jinja_s_slice(rt, s, lo, hi, 1);
}

static jinja_val m_startswith_(jinja_rt *rt, jinja_val s, const jinja_args *a, int end, const char *name)
{
    jinja_val p[3];
    int64_t base;
    jinja_bind(rt, a, name, P_RANGE, p);
    if (!given(p[0]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() takes at least 1 argument", name);
    jinja_val x = p[0];
    int ok = x.t == JV_STR || (x.t == JV_LIST && (x.flag & JVF_TUPLE));
    if (x.t == JV_LIST)
        for (size_t i = 0; ok && i < x.u.l->n; i++)
            ok = x.u.l->v[i].t == JV_STR;
    if (!ok)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s first arg must be str or a tuple of str, not %s", name,
                      jinja_type_name(x));
    return jinja_bool(jinja_s_startswith(sub_range(rt, s, p[1], p[2], &base), x, end));
}
static jinja_val m_startswith(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_startswith_(rt, s, a, 0, "startswith"); }
static jinja_val m_endswith(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_startswith_(rt, s, a, 1, "endswith"); }

static jinja_val m_find_(jinja_rt *rt, jinja_val s, const jinja_args *a, int right, int raise, const char *name)
{
    jinja_val p[3];
    int64_t base;
    jinja_bind(rt, a, name, P_RANGE, p);
    if (!given(p[0]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s() takes at least 1 argument", name);
    need_str_arg(rt, p[0], name);
    int64_t i = jinja_s_find(sub_range(rt, s, p[1], p[2], &base), p[0], right);
    if (i < 0 && raise)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "substring not found");
    return jinja_int(i < 0 ? -1 : i + base);
}
static jinja_val m_find(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_find_(rt, s, a, 0, 0, "find"); }
static jinja_val m_rfind(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_find_(rt, s, a, 1, 0, "rfind"); }
static jinja_val m_index(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_find_(rt, s, a, 0, 1, "index"); }
static jinja_val m_rindex(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_find_(rt, s, a, 1, 1, "rindex"); }

static jinja_val m_count(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_val p[3];
    int64_t base;
    jinja_bind(rt, a, "count", P_RANGE, p);
    need_str_arg(rt, p[0], "count");
    jinja_val r = sub_range(rt, s, p[1], p[2], &base);
    if (p[0].u.s.n == 0)
        return jinja_int((int64_t)jinja_utf8_count(r.u.s.p, r.u.s.n) + 1);
    int64_t c = 0;
    size_t i = 0;
    const char *hit;
    while ((hit = memmem(r.u.s.p + i, r.u.s.n - i, p[0].u.s.p, p[0].u.s.n)) != NULL) {
        c++;
        i = (size_t)(hit - r.u.s.p) + p[0].u.s.n;
    }
    return jinja_int(c);
}

static jinja_val m_upper(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_bind(rt, a, "upper", P_NONE, NULL);
    return jinja_s_case(rt, s, 1);
}
static jinja_val m_lower(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_bind(rt, a, "lower", P_NONE, NULL);
    return jinja_s_case(rt, s, 0);
}
static jinja_val m_title(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_bind(rt, a, "title", P_NONE, NULL);
    return jinja_s_title_py(rt, s);
}
static jinja_val m_capitalize(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_bind(rt, a, "capitalize", P_NONE, NULL);
    return jinja_s_capitalize(rt, s);
}

/* str.isdigit() and friends: kind 0 digit, 1 alpha, 2 alnum, 3 space, 4 lower, 5 upper */
static jinja_val is_kind(jinja_rt *rt, jinja_val s, const jinja_args *a, int kind)
{
    jinja_bind(rt, a, "is...", P_NONE, NULL);
    if (s.u.s.n == 0)
        return jinja_bool(0);
    size_t i = 0;
    int cased = 0;
    while (i < s.u.s.n) {
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
        int alpha = k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO;
        int digit = k == UTF8PROC_CATEGORY_ND;
        int num = k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO;
        switch (kind) {
        case 0: if (!digit) return jinja_bool(0); break;
        case 1: if (!alpha) return jinja_bool(0); break;
        case 2: if (!alpha && !num) return jinja_bool(0); break;
        case 3: if (!jinja_py_isspace(c)) return jinja_bool(0); break;
        case 4: if (k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LT) return jinja_bool(0);
                cased |= k == UTF8PROC_CATEGORY_LL; break;
        default: if (k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT) return jinja_bool(0);
                 cased |= k == UTF8PROC_CATEGORY_LU; break;
        }
    }
    return jinja_bool(kind < 4 ? 1 : cased);
}
static jinja_val m_isdigit(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 0); }
static jinja_val m_isalpha(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 1); }
static jinja_val m_isalnum(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 2); }
static jinja_val m_isspace(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 3); }
static jinja_val m_islower(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 4); }
static jinja_val m_isupper(jinja_rt *rt, jinja_val s, const jinja_args *a) { return is_kind(rt, s, a, 5); }

static jinja_val m_join(jinja_rt *rt, jinja_val s, const jinja_args *a)
{
    jinja_val p[1];
    jinja_bind(rt, a, "join", P_ONE, p);
    const jinja_list *items = jinja_iter(rt, p[0]);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    for (size_t i = 0; i < items->n; i++) {
        if (items->v[i].t != JV_STR)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "sequence item %zu: expected str instance, %s found", i,
                          jinja_type_name(items->v[i]));
        if (i)
            jinja_buf_put(&b, s.u.s.p, s.u.s.n);
        jinja_buf_put(&b, items->v[i].u.s.p, items->v[i].u.s.n);
    }
    return jinja_buf_val(&b);
}

static jinja_val m_format(jinja_rt *rt, jinja_val s, const jinja_args *a) { return jinja_s_format(rt, s, a); }

static jinja_val m_removefix(jinja_rt *rt, jinja_val s, const jinja_args *a, int suffix)
{
    jinja_val p[1];
    jinja_bind(rt, a, suffix ? "removesuffix" : "removeprefix", P_ONE, p);
    need_str_arg(rt, p[0], suffix ? "removesuffix" : "removeprefix");
    if (!jinja_s_startswith(s, p[0], suffix))
        return s;
    return suffix ? jinja_str(s.u.s.p, s.u.s.n - p[0].u.s.n) : jinja_str(s.u.s.p + p[0].u.s.n, s.u.s.n - p[0].u.s.n);
}
static jinja_val m_removeprefix(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_removefix(rt, s, a, 0); }
static jinja_val m_removesuffix(jinja_rt *rt, jinja_val s, const jinja_args *a) { return m_removefix(rt, s, a, 1); }

/* center/ljust/rjust/zfill: mode 0 center, 1 ljust, 2 rjust, 3 zfill */
static jinja_val pad(jinja_rt *rt, jinja_val s, const jinja_args *a, int mode)
{
    jinja_val p[2];
    jinja_bind(rt, a, mode == 3 ? "zfill" : "center", P_PAD, p);
    int64_t width = int_arg(rt, p[0], "width");
    if (width > (1 << 24))
        jinja_rt_fail(rt, TANDEM_ENOMEM, "padding width too large");
    jinja_val fill = given(p[1]) ? p[1] : jinja_str(mode == 3 ? "0" : " ", 1);
    need_str_arg(rt, fill, "fillchar");
    if (jinja_utf8_count(fill.u.s.p, fill.u.s.n) != 1)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "The fill character must be exactly one character long");
    int64_t len = (int64_t)jinja_utf8_count(s.u.s.p, s.u.s.n), marg = width - len;
    if (marg <= 0)
        return s;
    int64_t left = mode == 0 ? marg / 2 + (marg & width & 1) : mode == 1 ? 0 : marg;
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    size_t start = 0;
    if (mode == 3 && s.u.s.n && (s.u.s.p[0] == '+' || s.u.s.p[0] == '-')) {
        jinja_buf_putc(&b, s.u.s.p[0]);
        start = 1;
    }
    for (int64_t k = 0; k < left; k++)
        jinja_buf_put(&b, fill.u.s.p, fill.u.s.n);
    jinja_buf_put(&b, s.u.s.p + start, s.u.s.n - start);
    for (int64_t k = left; k < marg; k++)
        jinja_buf_put(&b, fill.u.s.p, fill.u.s.n);
    return jinja_buf_val(&b);
}
static jinja_val m_center(jinja_rt *rt, jinja_val s, const jinja_args *a) { return pad(rt, s, a, 0); }
static jinja_val m_ljust(jinja_rt *rt, jinja_val s, const jinja_args *a) { return pad(rt, s, a, 1); }
static jinja_val m_rjust(jinja_rt *rt, jinja_val s, const jinja_args *a) { return pad(rt, s, a, 2); }
static jinja_val m_zfill(jinja_rt *rt, jinja_val s, const jinja_args *a) { return pad(rt, s, a, 3); }

/* ---- dict, list, loop -------------------------------------------------------------- */

static const char *const P_GET[] = {"key", "default", NULL};

static jinja_val m_get(jinja_rt *rt, jinja_val d, const jinja_args *a)
{
    jinja_val p[2];
    size_t i;
    jinja_bind(rt, a, "get", P_GET, p);
    if (!given(p[0]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "get expected at least 1 argument, got 0");
    if (!jinja_hashable(p[0]))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "unhashable type: '%s'", jinja_type_name(p[0]));
    if (jinja_dict_find(d.u.d, p[0], &i))
        return d.u.d->v[i];
    return given(p[1]) ? p[1] : jinja_none();
}

static jinja_val dict_view(jinja_rt *rt, jinja_val d, const jinja_args *a, int what)
{
    jinja_bind(rt, a, what == 0 ? "keys" : what == 1 ? "values" : "items", P_NONE, NULL);
    const jinja_dict *x = d.u.d;
    jinja_list *l = jinja_list_new(rt->a, x->n);
    for (size_t i = 0; i < x->n; i++) {
        if (what == 0) {
            l->v[i] = x->k[i];
        } else if (what == 1) {
            l->v[i] = x->v[i];
        } else {
            jinja_list *pair = jinja_list_new(rt->a, 2);
            pair->v[0] = x->k[i];
            pair->v[1] = x->v[i];
            pair->n = 2;
            l->v[i] = jinja_list_val(pair, 1);
        }
    }
    l->n = x->n;
    return jinja_list_val(l, 0);
}
static jinja_val m_keys(jinja_rt *rt, jinja_val d, const jinja_args *a) { return dict_view(rt, d, a, 0); }
static jinja_val m_values(jinja_rt *rt, jinja_val d, const jinja_args *a) { return dict_view(rt, d, a, 1); }
static jinja_val m_items(jinja_rt *rt, jinja_val d, const jinja_args *a) { return dict_view(rt, d, a, 2); }

static jinja_val m_copy(jinja_rt *rt, jinja_val x, const jinja_args *a)
{
    jinja_bind(rt, a, "copy", P_NONE, NULL);
    return x;  /* values are immutable, so sharing is a copy */
}

static jinja_val m_list_count(jinja_rt *rt, jinja_val l, const jinja_args *a)
{
    jinja_val p[1];
    jinja_bind(rt, a, "count", P_ONE, p);
    int64_t c = 0;
    for (size_t i = 0; i < l.u.l->n; i++)
        c += jinja_eq(l.u.l->v[i], p[0]);
    return jinja_int(c);
}

static jinja_val m_list_index(jinja_rt *rt, jinja_val l, const jinja_args *a)
{
    jinja_val p[1];
    jinja_bind(rt, a, "index", P_ONE, p);
    for (size_t i = 0; i < l.u.l->n; i++)
        if (jinja_eq(l.u.l->v[i], p[0]))
            return jinja_int((int64_t)i);
    jinja_rt_fail(rt, TANDEM_EFORMAT, "value is not in list");
}

static jinja_val m_cycle(jinja_rt *rt, jinja_val lv, const jinja_args *a)
{
    if (a->nkw || a->n == 0)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "loop.cycle() takes one or more positional arguments");
    return a->v[lv.u.loop->i % a->n];
}

static jinja_val m_changed(jinja_rt *rt, jinja_val lv, const jinja_args *a)
{
    jinja_loop *l = lv.u.loop;
    jinja_list *now = jinja_list_new(rt->a, (size_t)a->n);
    memcpy(now->v, a->v, (size_t)a->n * sizeof *now->v);
    now->n = (size_t)a->n;
    jinja_val nv = jinja_list_val(now, 0);
    if (l->has_changed && jinja_eq(jinja_list_val(l->changed, 0), nv))
        return jinja_bool(0);
    l->has_changed = 1;
    l->changed = now;
    return jinja_bool(1);
}

typedef struct method_def { const char *name; jinja_fn fn; } method_def;

static const method_def STR_METHODS[] = {
    {"strip", m_strip}, {"lstrip", m_lstrip}, {"rstrip", m_rstrip}, {"split", m_split},
    {"rsplit", m_rsplit}, {"splitlines", m_splitlines}, {"replace", m_replace},
    {"startswith", m_startswith}, {"endswith", m_endswith}, {"find", m_find}, {"rfind", m_rfind},
    {"index", m_index}, {"rindex", m_rindex}, {"count", m_count}, {"upper", m_upper},
    {"lower", m_lower}, {"casefold", m_lower}, {"title", m_title}, {"capitalize", m_capitalize},
    {"isdigit", m_isdigit}, {"isdecimal", m_isdigit}, {"isnumeric", m_isdigit}, {"isalpha", m_isalpha},
    {"isalnum", m_isalnum}, {"isspace", m_isspace}, {"islower", m_islower}, {"isupper", m_isupper},
    {"join", m_join}, {"format", m_format}, {"removeprefix", m_removeprefix},
    {"removesuffix", m_removesuffix}, {"center", m_center}, {"ljust", m_ljust}, {"rjust", m_rjust},
    {"zfill", m_zfill}, {NULL, NULL},
};
static const method_def DICT_METHODS[] = {
    {"get", m_get}, {"keys", m_keys}, {"values", m_values}, {"items", m_items}, {"copy", m_copy},
    {"pop", NULL}, {"popitem", NULL}, {"setdefault", NULL}, {"update", NULL}, {"clear", NULL},
    {NULL, NULL},
};
static const method_def LIST_METHODS[] = {
    {"count", m_list_count}, {"index", m_list_index}, {"copy", m_copy}, {"append", NULL},
    {"extend", NULL}, {"insert", NULL}, {"pop", NULL}, {"remove", NULL}, {"reverse", NULL},
    {"sort", NULL}, {"clear", NULL}, {NULL, NULL},
};
static const method_def LOOP_METHODS[] = {{"cycle", m_cycle}, {"changed", m_changed}, {NULL, NULL}};

int jinja_method(jinja_rt *rt, jinja_val obj, const char *name, jinja_val *out)
{
    const method_def *tab;
    switch (obj.t) {
    case JV_STR: tab = STR_METHODS; break;
    case JV_DICT: tab = DICT_METHODS; break;
    case JV_LIST: tab = LIST_METHODS; break;
    case JV_LOOP: tab = LOOP_METHODS; break;
    default: return 0;
    }
    for (; tab->name; tab++) {
        if (strcmp(tab->name, name))
            continue;
        if (!tab->fn || (obj.t == JV_LIST && (obj.flag & JVF_TUPLE) && tab->fn == m_copy)) {
            if (obj.t == JV_LIST && (obj.flag & JVF_TUPLE))
                return 0;  /* tuples have no such attribute */
            char msg[160];
            snprintf(msg, sizeof msg, "access to attribute '%s' of '%s' object is unsafe.", name, jinja_type_name(obj));
            *out = jinja_undef_hint(jinja_strndup(rt->a, msg, strlen(msg)));
            return 1;
        }
        jinja_func *f = jinja_alloc(rt->a, sizeof *f);
        f->fn = tab->fn;
        f->self = obj;
        f->name = tab->name;
        out->t = JV_FUNC;
        out->flag = 0;
        out->owner = 0;
        out->u.fn = f;
        return 1;
    }
    return 0;
}

/* ---- globals -------------------------------------------------------------------- */

#define MAX_RANGE 100000

static jinja_val g_range(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    (void)self;
    if (a->nkw)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "range() takes no keyword arguments");
    if (a->n < 1 || a->n > 3)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "range expected 1 to 3 arguments, got %d", a->n);
    int64_t start = 0, stop, stepv = 1;
    if (a->n == 1) {
        stop = int_arg(rt, a->v[0], "range");
    } else {
        start = int_arg(rt, a->v[0], "range");
        stop = int_arg(rt, a->v[1], "range");
        if (a->n == 3)
            stepv = int_arg(rt, a->v[2], "range");
    }
    if (stepv == 0)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "range() arg 3 must not be zero");
    double count = stepv > 0 ? ((double)stop - (double)start) / (double)stepv
                             : ((double)start - (double)stop) / (double)-stepv;
    if (count > MAX_RANGE)
        jinja_rt_fail(rt, TANDEM_EFORMAT,
                      "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).", MAX_RANGE);
    jinja_list *l = jinja_list_new(rt->a, count > 0 ? (size_t)count + 1 : 0);
    for (int64_t i = start; stepv > 0 ? i < stop : i > stop; i += stepv)
        l->v[l->n++] = jinja_int(i);
    return jinja_list_val(l, 0);
}

/* dict(*args, **kwargs) semantics, shared by dict() and namespace(). */
static jinja_dict *make_dict(jinja_rt *rt, const jinja_args *a, const char *fname, int ns)
{
    jinja_dict *d = jinja_dict_new(rt->a, 4);
    if (a->n > 1)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s expected at most 1 argument, got %d", fname, a->n);
    if (a->n == 1) {
        jinja_val src = a->v[0];
        if (src.t == JV_DICT) {
            for (size_t i = 0; i < src.u.d->n; i++)
                jinja_dict_put(rt->a, d, src.u.d->k[i], src.u.d->v[i]);
        } else {
            const jinja_list *items = jinja_iter(rt, src);
            for (size_t i = 0; i < items->n; i++) {
                jinja_val it = items->v[i];
                const jinja_list *kv = it.t == JV_LIST ? it.u.l : NULL;
                if (!kv || kv->n != 2)
                    jinja_rt_fail(rt, TANDEM_EFORMAT, "%s: sequence element #%zu is not a key/value pair", fname, i);
                if (!jinja_hashable(kv->v[0]))
                    jinja_rt_fail(rt, TANDEM_EFORMAT, "unhashable type: '%s'", jinja_type_name(kv->v[0]));
                jinja_dict_put(rt->a, d, kv->v[0], kv->v[1]);
            }
        }
    }
    for (int k = 0; k < a->nkw; k++)
        jinja_dict_put(rt->a, d, jinja_cstr(a->kwn[k]), a->kwv[k]);
    if (ns) {
        for (size_t i = 0; i < d->n; i++)
            if (d->k[i].t == JV_STR && d->k[i].u.s.n && d->k[i].u.s.p[0] == '_')
                jinja_rt_fail(rt, TANDEM_EFORMAT,
                              "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                              "but got '%.*s'. Please rename the attribute.", (int)d->k[i].u.s.n, d->k[i].u.s.p);
    }
    return d;
}

static jinja_val g_dict(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    (void)self;
    return jinja_dict_val(make_dict(rt, a, "dict", 0));
}

static jinja_val g_namespace(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    (void)self;
    jinja_val v = {0};
    v.t = JV_NS;
    v.u.d = make_dict(rt, a, "namespace", 1);
    return v;
}

static jinja_val g_raise(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    static const char *const P[] = {"message", NULL};
    jinja_val p[1];
    (void)self;
    jinja_bind(rt, a, "raise_exception", P, p);
    jinja_val msg = jinja_to_str(rt, given(p[0]) ? p[0] : jinja_str("", 0));
    jinja_rt_fail(rt, TANDEM_EFORMAT, "%.*s", (int)msg.u.s.n, msg.u.s.p);
}

static jinja_val g_strftime_now(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    static const char *const P[] = {"format", NULL};
    jinja_val p[1];
    (void)self;
    jinja_bind(rt, a, "strftime_now", P, p);
    need_str_arg(rt, p[0], "strftime_now");
    char fmt[256], out[1024];
    if (p[0].u.s.n >= sizeof fmt)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "strftime_now: format too long");
    memcpy(fmt, p[0].u.s.p, p[0].u.s.n);
    fmt[p[0].u.s.n] = 0;
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    size_t n = strftime(out, sizeof out, fmt, &tm);
    return jinja_str(jinja_strndup(rt->a, out, n), n);
}

static jinja_val g_unsupported(jinja_rt *rt, jinja_val self, const jinja_args *a)
{
    (void)a;
    jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "function '%.*s' is not supported yet", (int)self.u.s.n, self.u.s.p);
}

static jinja_func G_FUNCS[] = {
    {g_range, {0}, "range"},
    {g_dict, {0}, "dict"},
    {g_namespace, {0}, "namespace"},
    {g_raise, {0}, "raise_exception"},
    {g_strftime_now, {0}, "strftime_now"},
    {g_unsupported, {JV_STR, 0, 0, {.s = {"lipsum", 6}}}, "lipsum"},
    {g_unsupported, {JV_STR, 0, 0, {.s = {"cycler", 6}}}, "cycler"},
    {g_unsupported, {JV_STR, 0, 0, {.s = {"joiner", 6}}}, "joiner"},
};

int jinja_global(const char *name, jinja_val *out)
{
    for (size_t i = 0; i < sizeof G_FUNCS / sizeof G_FUNCS[0]; i++) {
        if (!strcmp(G_FUNCS[i].name, name)) {
            jinja_val v = {0};
            v.t = JV_FUNC;
            v.u.fn = &G_FUNCS[i];
            *out = v;
            return 1;
        }
    }
    return 0;
}
