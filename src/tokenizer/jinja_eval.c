/*
 * jinja_eval.c - renders a parsed template: statements, expressions, scopes.
 *
 * Scopes follow jinja2's compiled code: the template body writes the root
 * frame; every for-loop iteration, macro call, call-block body, set/filter
 * block and with-block runs in a fresh frame whose parent is the enclosing
 * (for macros: the defining) frame, so a {% set %} there is invisible after
 * it and the next loop iteration starts again from the outer values; only
 * namespace() objects carry state out. Lookups go frames -> context -> globals.
 *
 * Attribute and item access follow the sandbox (jinja2.sandbox): obj.x tries
 * the Python attribute (methods of str/dict/list) and then obj['x'];
 * obj['x'] tries the item and then the attribute; a miss yields Undefined.
 * Operators follow Python (int/float/str/list), errors name the line.
 *
 * Cost bounds: evaluation depth (MAX_DEPTH) and steps (MAX_STEPS) are
 * limited, so a hostile template fails cleanly instead of hanging or
 * overflowing the stack.
 */
#include "tokenizer/jinja_impl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define MAX_DEPTH 300
#define MAX_STEPS 20000000ull

enum { JX_NEXT, JX_BREAK, JX_CONTINUE };

static jinja_val eval(jinja_rt *rt, jinja_frame *f, const jinja_node *n);
static int exec_body(jinja_rt *rt, jinja_frame *f, const jinja_node *body, jinja_buf *out);

static void step(jinja_rt *rt, const jinja_node *n)
{
    rt->line = n->line;
    if (++rt->steps > MAX_STEPS)
        jinja_rt_fail(rt, TANDEM_ENOMEM, "rendering takes more than %llu steps (template too costly)",
                      (unsigned long long)MAX_STEPS);
}

/* ---- frames ---------------------------------------------------------------- */

static jinja_frame *frame_new(jinja_rt *rt, jinja_frame *parent)
{
    jinja_frame *f = jinja_alloc(rt->a, sizeof *f);
    f->parent = parent;
    f->n = f->cap = 0;
    f->names = NULL;
    f->vals = NULL;
    return f;
}

static void frame_set(jinja_rt *rt, jinja_frame *f, const char *name, jinja_val v)
{
    for (size_t i = 0; i < f->n; i++) {
        if (!strcmp(f->names[i], name)) {
            f->vals[i] = v;
            return;
        }
    }
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 4;
        const char **nn = jinja_alloc(rt->a, cap * sizeof *nn);
        jinja_val *nv = jinja_alloc(rt->a, cap * sizeof *nv);
        if (f->n) {
            memcpy(nn, f->names, f->n * sizeof *nn);
            memcpy(nv, f->vals, f->n * sizeof *nv);
        }
        f->names = nn;
        f->vals = nv;
        f->cap = cap;
    }
    f->names[f->n] = name;
    f->vals[f->n] = v;
    f->n++;
}

static jinja_val lookup(jinja_rt *rt, jinja_frame *f, const char *name)
{
    for (; f; f = f->parent)
        for (size_t i = f->n; i-- > 0;)
            if (!strcmp(f->names[i], name))
                return f->vals[i];
    jinja_val v;
    if (rt->ctx && jinja_dict_get_s(rt->ctx, name, strlen(name), &v))
        return v;
    if (jinja_global(name, &v))
        return v;
    return jinja_undef_name(name);
}

/* ---- access ---------------------------------------------------------------- */

static const char *key_name(jinja_rt *rt, jinja_val key)
{
    if (key.t == JV_STR)
        return jinja_strndup(rt->a, key.u.s.p, key.u.s.n);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    jinja_repr_of(&b, key);
    jinja_buf_putc(&b, 0);
    return b.p;
}

static jinja_val loop_attr(jinja_rt *rt, jinja_loop *l, const char *name, int *found)
{
    int64_t n = (int64_t)l->items->n, i = l->i;
    *found = 1;
    if (!strcmp(name, "index")) return jinja_int(i + 1);
    if (!strcmp(name, "index0")) return jinja_int(i);
    if (!strcmp(name, "revindex")) return jinja_int(n - i);
    if (!strcmp(name, "revindex0")) return jinja_int(n - i - 1);
    if (!strcmp(name, "first")) return jinja_bool(i == 0);
    if (!strcmp(name, "last")) return jinja_bool(i == n - 1);
    if (!strcmp(name, "length")) return jinja_int(n);
    if (!strcmp(name, "depth")) return jinja_int(l->depth0 + 1);
    if (!strcmp(name, "depth0")) return jinja_int(l->depth0);
    if (!strcmp(name, "previtem"))
        return i > 0 ? l->items->v[i - 1] : jinja_undef_hint("there is no previous item");
    if (!strcmp(name, "nextitem"))
        return i + 1 < n ? l->items->v[i + 1] : jinja_undef_hint("there is no next item");
    (void)rt;
    *found = 0;
    return jinja_missing();
}

jinja_val jinja_getattr(jinja_rt *rt, jinja_val obj, const char *name)
{
    jinja_val v;
    if (obj.t == JV_UNDEF)
        jinja_rt_undef(rt, obj);
    if (obj.t == JV_NS) {
        if (jinja_dict_get_s(obj.u.d, name, strlen(name), &v))
            return v;
        return jinja_undef_attr(JV_NS, name);
    }
    if (obj.t == JV_LOOP) {
        int found;
        v = loop_attr(rt, obj.u.loop, name, &found);
        if (found)
            return v;
    }
    if (jinja_method(rt, obj, name, &v))
        return v;
    if (obj.t == JV_DICT && jinja_dict_get_s(obj.u.d, name, strlen(name), &v))
        return v;
    return jinja_undef_attr(obj.t, name);
}

static int index_of(jinja_val key, int64_t n, int64_t *idx)
{
    if (key.t != JV_INT && key.t != JV_BOOL)
        return 0;
    int64_t i = key.u.i;
    if (i < 0)
        i += n;
    if (i < 0 || i >= n)
        return 0;
    *idx = i;
    return 1;
}

jinja_val jinja_getitem(jinja_rt *rt, jinja_val obj, jinja_val key)
{
    jinja_val v;
    int64_t i;
    if (obj.t == JV_UNDEF)
        jinja_rt_undef(rt, obj);
    if (key.t == JV_UNDEF && obj.t != JV_DICT)
        goto miss;
    switch (obj.t) {
    case JV_DICT: {
        size_t k;
        if (jinja_hashable(key) && jinja_dict_find(obj.u.d, key, &k))
            return obj.u.d->v[k];
        break;
    }
    case JV_LIST:
        if (index_of(key, (int64_t)obj.u.l->n, &i))
            return obj.u.l->v[i];
        break;
    case JV_STR:
        if (key.t == JV_INT || key.t == JV_BOOL) {
            int64_t n = (int64_t)jinja_utf8_count(obj.u.s.p, obj.u.s.n);
            if (index_of(key, n, &i))
                return jinja_s_slice(rt, obj, i, i + 1, 1);
        }
        break;
    default:
        break;
    }
    if (key.t == JV_STR) {
        const char *name = key_name(rt, key);
        if (obj.t == JV_NS || obj.t == JV_LOOP)
            return jinja_getattr(rt, obj, name);
        if (jinja_method(rt, obj, name, &v))
            return v;
    }
miss:
    return jinja_undef_attr(obj.t, key_name(rt, key));
}

void jinja_slice_indices(jinja_rt *rt, int64_t n, jinja_val start, jinja_val stop, jinja_val step_v,
                         int64_t *ostart, int64_t *ostop, int64_t *ostep, int64_t *olen)
{
    int64_t st = 1;
    jinja_val parts[3] = {start, stop, step_v};
    for (int k = 0; k < 3; k++) {
        jinja_val p = parts[k];
        if (p.t == JV_UNDEF && p.owner != JU_MISSING)
            jinja_rt_undef(rt, p);
        if (p.t != JV_UNDEF && p.t != JV_NONE && p.t != JV_INT && p.t != JV_BOOL)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "slice indices must be integers or None");
    }
    int has_step = step_v.t == JV_INT || step_v.t == JV_BOOL;
    if (has_step) {
        st = step_v.u.i;
        if (st == 0)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "slice step cannot be zero");
    }
    int64_t lo, hi;
    int has_lo = start.t == JV_INT || start.t == JV_BOOL, has_hi = stop.t == JV_INT || stop.t == JV_BOOL;
    if (st > 0) {
        lo = 0;
        hi = n;
        if (has_lo) {
            lo = start.u.i < 0 ? start.u.i + n : start.u.i;
            lo = lo < 0 ? 0 : lo > n ? n : lo;
        }
        if (has_hi) {
            hi = stop.u.i < 0 ? stop.u.i + n : stop.u.i;
            hi = hi < 0 ? 0 : hi > n ? n : hi;
        }
        *olen = hi > lo ? (hi - lo + st - 1) / st : 0;
    } else {
        lo = n - 1;
        hi = -1;
        if (has_lo) {
            lo = start.u.i < 0 ? start.u.i + n : start.u.i;
            lo = lo < -1 ? -1 : lo > n - 1 ? n - 1 : lo;
        }
        if (has_hi) {
            hi = stop.u.i < 0 ? stop.u.i + n : stop.u.i;
            hi = hi < -1 ? -1 : hi > n - 1 ? n - 1 : hi;
        }
        *olen = lo > hi ? (lo - hi + (-st) - 1) / (-st) : 0;
    }
    *ostart = lo;
    *ostop = hi;
    *ostep = st;
}

static jinja_val do_slice(jinja_rt *rt, jinja_val obj, jinja_val a, jinja_val b, jinja_val c)
{
    if (obj.t == JV_UNDEF)
        jinja_rt_undef(rt, obj);
    if (obj.t != JV_LIST && obj.t != JV_STR)
        return jinja_undef_attr(obj.t, "slice");
    int64_t n = obj.t == JV_LIST ? (int64_t)obj.u.l->n : (int64_t)jinja_utf8_count(obj.u.s.p, obj.u.s.n);
    int64_t lo, hi, st, len;
    jinja_slice_indices(rt, n, a, b, c, &lo, &hi, &st, &len);
    if (obj.t == JV_STR)
        return jinja_s_slice(rt, obj, lo, hi, st);
    jinja_list *l = jinja_list_new(rt->a, (size_t)len);
    for (int64_t k = 0, i = lo; k < len; k++, i += st)
        l->v[k] = obj.u.l->v[i];
    l->n = (size_t)len;
    return jinja_list_val(l, obj.flag & JVF_TUPLE);
}

const jinja_list *jinja_iter(jinja_rt *rt, jinja_val v)
{
    static jinja_val no_items[1];
    static jinja_list empty = {0, 0, no_items};  /* never written: n == cap == 0 */
    switch (v.t) {
    case JV_UNDEF: return &empty;
    case JV_LIST: return v.u.l;
    case JV_DICT: {
        jinja_list *l = jinja_list_new(rt->a, v.u.d->n);
        memcpy(l->v, v.u.d->k, v.u.d->n * sizeof *l->v);
        l->n = v.u.d->n;
        return l;
    }
    case JV_STR: {
        jinja_list *l = jinja_list_new(rt->a, v.u.s.n);
        size_t i = 0;
        while (i < v.u.s.n) {
            size_t start = i;
            jinja_utf8_next(v.u.s.p, v.u.s.n, &i);
            l->v[l->n++] = jinja_str(v.u.s.p + start, i - start);
        }
        return l;
    }
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "'%s' object is not iterable", jinja_type_name(v));
    }
}

/* ---- operators ---------------------------------------------------------------- */

static _Noreturn void bad_operands(jinja_rt *rt, const char *op, jinja_val a, jinja_val b)
{
    if (a.t == JV_STR && !strcmp(op, "+"))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "can only concatenate str (not \"%s\") to str", jinja_type_name(b));
    jinja_rt_fail(rt, TANDEM_EFORMAT, "unsupported operand type(s) for %s: '%s' and '%s'", op,
                  jinja_type_name(a), jinja_type_name(b));
}

static jinja_val repeat(jinja_rt *rt, jinja_val seq, int64_t times)
{
    if (times < 0)
        times = 0;
    size_t unit = seq.t == JV_STR ? seq.u.s.n : seq.u.l->n * sizeof(jinja_val);
    if (unit && (uint64_t)times > ((size_t)64 << 20) / unit)
        jinja_rt_fail(rt, TANDEM_ENOMEM, "repetition result too large (over 64 MiB)");
    if (seq.t == JV_STR) {
        char *p = jinja_alloc(rt->a, unit * (size_t)times + 1);
        for (int64_t k = 0; k < times; k++)
            memcpy(p + (size_t)k * unit, seq.u.s.p, unit);
        return jinja_str(p, unit * (size_t)times);
    }
    unit = seq.u.l->n;
    jinja_list *l = jinja_list_new(rt->a, unit * (size_t)times);
    for (int64_t k = 0; k < times; k++)
        for (size_t i = 0; i < unit; i++)
            l->v[l->n++] = seq.u.l->v[i];
    return jinja_list_val(l, seq.flag & JVF_TUPLE);
}

static double py_fmod(double x, double y)
{
    double m = fmod(x, y);
    if (m != 0 && ((y < 0) != (m < 0)))
        m += y;
    else if (m == 0)
        m = copysign(0.0, y);
    return m;
}

static double py_floordiv(double x, double y)
{
    double mod = fmod(x, y), div = (x - mod) / y;
    if (mod != 0 && ((y < 0) != (mod < 0)))
        div -= 1.0;
    if (div != 0) {
        double fl = floor(div);
        if (div - fl > 0.5)
            fl += 1.0;
        return fl;
    }
    return copysign(0.0, x / y);
}

jinja_val jinja_binop(jinja_rt *rt, int op, jinja_val a, jinja_val b)
{
    static const char *const names[] = {"+", "-", "*", "/", "//", "%", "**"};
    if (a.t == JV_UNDEF)
        jinja_rt_undef(rt, a);
    if (b.t == JV_UNDEF)
        jinja_rt_undef(rt, b);
    int an = jinja_is_num(a), bn = jinja_is_num(b);
    int ints = an && bn && a.t != JV_FLOAT && b.t != JV_FLOAT;
    int64_t r;
    switch (op) {
    case JO_ADD:
        if (ints) {
            if (__builtin_add_overflow(a.u.i, b.u.i, &r))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            return jinja_int(r);
        }
        if (an && bn)
            return jinja_float(jinja_num(a) + jinja_num(b));
        if (a.t == JV_STR && b.t == JV_STR) {
            /* markupsafe: Markup + str escapes the str */
            int markup = (a.flag | b.flag) & JVF_MARKUP;
            if (markup && !(a.flag & JVF_MARKUP))
                a = jinja_s_escape(rt, a);
            if (markup && !(b.flag & JVF_MARKUP))
                b = jinja_s_escape(rt, b);
            jinja_buf buf;
            jinja_buf_init(&buf, rt->a);
            jinja_buf_put(&buf, a.u.s.p, a.u.s.n);
            jinja_buf_put(&buf, b.u.s.p, b.u.s.n);
            jinja_val v = jinja_buf_val(&buf);
            v.flag = (uint8_t)markup;
            return v;
        }
        if (a.t == JV_LIST && b.t == JV_LIST) {
            if ((a.flag & JVF_TUPLE) != (b.flag & JVF_TUPLE))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "can only concatenate %s (not \"%s\") to %s",
                              jinja_type_name(a), jinja_type_name(b), jinja_type_name(a));
            jinja_list *l = jinja_list_new(rt->a, a.u.l->n + b.u.l->n);
            memcpy(l->v, a.u.l->v, a.u.l->n * sizeof *l->v);
            memcpy(l->v + a.u.l->n, b.u.l->v, b.u.l->n * sizeof *l->v);
            l->n = a.u.l->n + b.u.l->n;
            return jinja_list_val(l, a.flag & JVF_TUPLE);
        }
        break;
    case JO_SUB:
        if (ints) {
            if (__builtin_sub_overflow(a.u.i, b.u.i, &r))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            return jinja_int(r);
        }
        if (an && bn)
            return jinja_float(jinja_num(a) - jinja_num(b));
        break;
    case JO_MUL:
        if (ints) {
            if (__builtin_mul_overflow(a.u.i, b.u.i, &r))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            return jinja_int(r);
        }
        if (an && bn)
            return jinja_float(jinja_num(a) * jinja_num(b));
        if ((a.t == JV_STR || a.t == JV_LIST) && (b.t == JV_INT || b.t == JV_BOOL))
            return repeat(rt, a, b.u.i);
        if ((b.t == JV_STR || b.t == JV_LIST) && (a.t == JV_INT || a.t == JV_BOOL))
            return repeat(rt, b, a.u.i);
        break;
    case JO_DIV:
        if (an && bn) {
            if (jinja_num(b) == 0)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "division by zero");
            return jinja_float(jinja_num(a) / jinja_num(b));
        }
        break;
    case JO_FLOORDIV:
    case JO_MOD:
        if (ints) {
            if (b.u.i == 0)
                jinja_rt_fail(rt, TANDEM_EFORMAT, op == JO_MOD ? "integer modulo by zero"
                                                              : "integer division or modulo by zero");
            if (a.u.i == INT64_MIN && b.u.i == -1) {
                if (op == JO_MOD)
                    return jinja_int(0);
                jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            }
            int64_t q = a.u.i / b.u.i, m = a.u.i % b.u.i;
            if (m != 0 && ((m < 0) != (b.u.i < 0))) {
                q -= 1;
                m += b.u.i;
            }
            return jinja_int(op == JO_MOD ? m : q);
        }
        if (an && bn) {
            double x = jinja_num(a), y = jinja_num(b);
            if (y == 0)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "float %s by zero", op == JO_MOD ? "modulo" : "floor division");
            return jinja_float(op == JO_MOD ? py_fmod(x, y) : py_floordiv(x, y));
        }
        if (op == JO_MOD && a.t == JV_STR)
            return jinja_s_percent(rt, a, b);
        break;
    case JO_POW:
        if (ints && b.u.i >= 0) {
            int64_t base = a.u.i, e = b.u.i, acc = 1;
            while (e > 0) {
                if ((e & 1) && __builtin_mul_overflow(acc, base, &acc))
                    jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
                e >>= 1;
                if (e && __builtin_mul_overflow(base, base, &base))
                    jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            }
            return jinja_int(acc);
        }
        if (an && bn) {
            double x = jinja_num(a), y = jinja_num(b);
            if (x == 0 && y < 0)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "0.0 cannot be raised to a negative power");
            return jinja_float(pow(x, y));
        }
        break;
    default:
        break;
    }
    bad_operands(rt, names[op], a, b);
}

static int contains(jinja_rt *rt, jinja_val container, jinja_val item)
{
    switch (container.t) {
    case JV_UNDEF: return 0;
    case JV_STR:
        if (item.t == JV_UNDEF)
            jinja_rt_undef(rt, item);
        if (item.t != JV_STR)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "'in <string>' requires string as left operand, not %s",
                          jinja_type_name(item));
        if (item.u.s.n == 0)
            return 1;
        return memmem(container.u.s.p, container.u.s.n, item.u.s.p, item.u.s.n) != NULL;
    case JV_LIST:
        for (size_t i = 0; i < container.u.l->n; i++)
            if (jinja_eq(container.u.l->v[i], item))
                return 1;
        return 0;
    case JV_DICT: {
        size_t k;
        if (!jinja_hashable(item))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "unhashable type: '%s'", jinja_type_name(item));
        return jinja_dict_find(container.u.d, item, &k);
    }
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "argument of type '%s' is not iterable", jinja_type_name(container));
    }
}

static int compare(jinja_rt *rt, int op, jinja_val a, jinja_val b)
{
    switch (op) {
    case JC_EQ: return jinja_eq(a, b);
    case JC_NE: return !jinja_eq(a, b);
    case JC_LT: return jinja_cmp(rt, a, b) < 0;
    case JC_LE: return jinja_cmp(rt, a, b) <= 0;
    case JC_GT: return jinja_cmp(rt, a, b) > 0;
    case JC_GE: return jinja_cmp(rt, a, b) >= 0;
    case JC_IN: return contains(rt, b, a);
    default: return !contains(rt, b, a);
    }
}

/* ---- calls ------------------------------------------------------------------ */

static void eval_args(jinja_rt *rt, jinja_frame *f, const jinja_node *n, jinja_args *a, int extra_kw)
{
    jinja_val *v = jinja_alloc(rt->a, ((size_t)n->nkids + (size_t)n->nkw + (size_t)extra_kw + 1) * sizeof *v);
    const char **kwn = jinja_alloc(rt->a, ((size_t)n->nkw + (size_t)extra_kw + 1) * sizeof *kwn);
    for (int i = 0; i < n->nkids; i++)
        v[i] = eval(rt, f, n->kids[i]);
    jinja_val *kwv = v + n->nkids;
    for (int i = 0; i < n->nkw; i++) {
        kwn[i] = n->kwn[i];
        kwv[i] = eval(rt, f, n->kw[i]);
    }
    a->n = n->nkids;
    a->v = v;
    a->nkw = n->nkw;
    a->kwn = kwn;
    a->kwv = kwv;
}

static jinja_val call_macro(jinja_rt *rt, const jinja_macro *m, const jinja_args *a)
{
    const jinja_node *n = m->node;
    const char *mname = n->name;
    jinja_frame *fr = frame_new(rt, m->closure);
    int np = n->nkids;
    unsigned char *given = jinja_zalloc(rt->a, (size_t)np + 1);
    jinja_list *varargs = jinja_list_new(rt->a, 0);
    jinja_dict *kwargs = jinja_dict_new(rt->a, 0);
    jinja_val caller = jinja_undef_hint("No caller defined");
    for (int i = 0; i < a->n; i++) {
        if (i < np) {
            frame_set(rt, fr, n->kids[i]->name, a->v[i]);
            given[i] = 1;
        } else if (n->flags & JNF_VARARGS) {
            jinja_list_push(rt->a, varargs, a->v[i]);
        } else {
            jinja_rt_fail(rt, TANDEM_EFORMAT, "macro '%s' takes not more than %d argument(s)", mname, np);
        }
    }
    for (int k = 0; k < a->nkw; k++) {
        int j;
        for (j = 0; j < np; j++)
            if (!strcmp(n->kids[j]->name, a->kwn[k]))
                break;
        if (j < np) {
            if (given[j])
                jinja_rt_fail(rt, TANDEM_EFORMAT, "macro '%s' got multiple values for argument '%s'", mname,
                              a->kwn[k]);
            frame_set(rt, fr, n->kids[j]->name, a->kwv[k]);
            given[j] = 1;
        } else if (!strcmp(a->kwn[k], "caller") && (n->flags & JNF_CALLER) && n->kind == JN_MACRO) {
            caller = a->kwv[k];
        } else if (n->flags & JNF_KWARGS) {
            jinja_dict_put(rt->a, kwargs, jinja_cstr(a->kwn[k]), a->kwv[k]);
        } else {
            jinja_rt_fail(rt, TANDEM_EFORMAT, "macro '%s' takes no keyword argument '%s'", mname, a->kwn[k]);
        }
    }
    for (int j = 0; j < np; j++) {
        if (given[j])
            continue;
        const char *pname = n->kids[j]->name;
        if (n->kw[j]) {
            frame_set(rt, fr, pname, eval(rt, fr, n->kw[j]));
        } else {
            char msg[256];
            snprintf(msg, sizeof msg, "parameter '%s' was not provided", pname);
            frame_set(rt, fr, pname, jinja_undef_hint(jinja_strndup(rt->a, msg, strlen(msg))));
        }
    }
    if (n->flags & JNF_VARARGS)
        frame_set(rt, fr, "varargs", jinja_list_val(varargs, 1));
    if (n->flags & JNF_KWARGS)
        frame_set(rt, fr, "kwargs", jinja_dict_val(kwargs));
    if ((n->flags & JNF_CALLER) && n->kind == JN_MACRO)
        frame_set(rt, fr, "caller", caller);
    jinja_buf out;
    jinja_buf_init(&out, rt->a);
    exec_body(rt, fr, n->d, &out);
    return jinja_buf_val(&out);
}

jinja_val jinja_call(jinja_rt *rt, jinja_val callee, const jinja_args *a)
{
    switch (callee.t) {
    case JV_MACRO: return call_macro(rt, callee.u.m, a);
    case JV_FUNC: return callee.u.fn->fn(rt, callee.u.fn->self, a);
    case JV_UNDEF: jinja_rt_undef(rt, callee);
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "'%s' object is not callable", jinja_type_name(callee));
    }
}

static jinja_val apply_filter(jinja_rt *rt, jinja_frame *f, const jinja_node *n, jinja_val in)
{
    jinja_args a;
    eval_args(rt, f, n, &a, 0);
    rt->line = n->line;
    if (n->id == -1)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "no filter named '%s'", n->name);
    if (n->id == -2)
        jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "filter '%s' is not supported yet", n->name);
    return jinja_filter_apply(rt, n->id, in, &a);
}

/* A filter chain of a set or filter block: the innermost filter has a == NULL. */
static jinja_val apply_chain(jinja_rt *rt, jinja_frame *f, const jinja_node *n, jinja_val v)
{
    if (n->a)
        v = apply_chain(rt, f, n->a, v);
    return apply_filter(rt, f, n, v);
}

/* ---- expressions --------------------------------------------------------------- */

static jinja_val eval(jinja_rt *rt, jinja_frame *f, const jinja_node *n)
{
    if (++rt->depth > MAX_DEPTH)
        jinja_rt_fail(rt, TANDEM_ENOMEM, "template recursion too deep");
    step(rt, n);
    jinja_val v;
    switch (n->kind) {
    case JN_CONST:
        v = n->cval;
        break;
    case JN_NAME:
        v = lookup(rt, f, n->name);
        break;
    case JN_TUPLE:
    case JN_LIST: {
        jinja_list *l = jinja_list_new(rt->a, (size_t)n->nkids);
        for (int i = 0; i < n->nkids; i++)
            l->v[i] = eval(rt, f, n->kids[i]);
        l->n = (size_t)n->nkids;
        v = jinja_list_val(l, n->kind == JN_TUPLE);
        break;
    }
    case JN_DICT: {
        jinja_dict *d = jinja_dict_new(rt->a, (size_t)n->nkids / 2);
        for (int i = 0; i + 1 < n->nkids; i += 2) {
            jinja_val k = eval(rt, f, n->kids[i]);
            jinja_val x = eval(rt, f, n->kids[i + 1]);
            rt->line = n->line;
            if (!jinja_hashable(k))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "unhashable type: '%s'", jinja_type_name(k));
            jinja_dict_put(rt->a, d, k, x);
        }
        v = jinja_dict_val(d);
        break;
    }
    case JN_GETATTR: {
        jinja_val obj = eval(rt, f, n->a);
        rt->line = n->line;
        v = jinja_getattr(rt, obj, n->name);
        break;
    }
    case JN_GETITEM: {
        jinja_val obj = eval(rt, f, n->a);
        if (n->b->kind == JN_SLICE) {
            const jinja_node *s = n->b;
            jinja_val p[3];
            const jinja_node *parts[3] = {s->a, s->b, s->c};
            for (int k = 0; k < 3; k++)
                p[k] = parts[k] ? eval(rt, f, parts[k]) : jinja_missing();
            rt->line = n->line;
            v = do_slice(rt, obj, p[0], p[1], p[2]);
        } else {
            jinja_val key = eval(rt, f, n->b);
            rt->line = n->line;
            v = jinja_getitem(rt, obj, key);
        }
        break;
    }
    case JN_CALL: {
        jinja_val callee = eval(rt, f, n->a);
        jinja_args a;
        eval_args(rt, f, n, &a, 0);
        rt->line = n->line;
        v = jinja_call(rt, callee, &a);
        break;
    }
    case JN_FILTER:
        v = apply_filter(rt, f, n, n->a ? eval(rt, f, n->a) : jinja_missing());
        break;
    case JN_TEST: {
        jinja_val in = eval(rt, f, n->a);
        jinja_args a;
        eval_args(rt, f, n, &a, 0);
        rt->line = n->line;
        if (n->id == -1)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "no test named '%s'", n->name);
        if (n->id == -2)
            jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "test '%s' is not supported yet", n->name);
        v = jinja_bool(jinja_test_apply(rt, n->id, in, &a));
        break;
    }
    case JN_NOT:
        v = jinja_bool(!jinja_truthy(eval(rt, f, n->a)));
        break;
    case JN_NEG:
    case JN_POS: {
        jinja_val x = eval(rt, f, n->a);
        rt->line = n->line;
        if (x.t == JV_UNDEF)
            jinja_rt_undef(rt, x);
        if (x.t == JV_FLOAT)
            v = jinja_float(n->kind == JN_NEG ? -x.u.f : x.u.f);
        else if (x.t == JV_INT || x.t == JV_BOOL) {
            if (n->kind == JN_NEG && x.u.i == INT64_MIN)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "integer overflow");
            v = jinja_int(n->kind == JN_NEG ? -x.u.i : x.u.i);
        } else {
            jinja_rt_fail(rt, TANDEM_EFORMAT, "bad operand type for unary %c: '%s'", n->kind == JN_NEG ? '-' : '+',
                          jinja_type_name(x));
        }
        break;
    }
    case JN_BINOP: {
        jinja_val x = eval(rt, f, n->a);
        jinja_val y = eval(rt, f, n->b);
        rt->line = n->line;
        v = jinja_binop(rt, n->op, x, y);
        break;
    }
    case JN_AND:
        v = eval(rt, f, n->a);
        if (jinja_truthy(v))
            v = eval(rt, f, n->b);
        break;
    case JN_OR:
        v = eval(rt, f, n->a);
        if (!jinja_truthy(v))
            v = eval(rt, f, n->b);
        break;
    case JN_CONCAT: {
        jinja_buf b;
        jinja_buf_init(&b, rt->a);
        for (int i = 0; i < n->nkids; i++)
            jinja_str_of(&b, eval(rt, f, n->kids[i]));
        v = jinja_buf_val(&b);
        break;
    }
    case JN_COMPARE: {
        jinja_val left = eval(rt, f, n->a);
        v = jinja_bool(1);
        for (int i = 0; i < n->nkids; i++) {
            jinja_val right = eval(rt, f, n->kids[i]);
            rt->line = n->line;
            if (!compare(rt, n->ops[i], left, right)) {
                v = jinja_bool(0);
                break;
            }
            left = right;
        }
        break;
    }
    case JN_CONDEXPR:
        if (jinja_truthy(eval(rt, f, n->a)))
            v = eval(rt, f, n->b);
        else if (n->c)
            v = eval(rt, f, n->c);
        else
            v = jinja_undef_hint("the inline if-expression evaluated to false and no else section was defined.");
        break;
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "internal: unexpected node %d in an expression", n->kind);
    }
    rt->depth--;
    return v;
}

/* ---- statements ----------------------------------------------------------------- */

static void assign(jinja_rt *rt, jinja_frame *f, const jinja_node *t, jinja_val v)
{
    if (t->kind == JN_NAME) {
        frame_set(rt, f, t->name, v);
    } else if (t->kind == JN_NSREF) {
        jinja_val ns = lookup(rt, f, t->name);
        rt->line = t->line;
        if (ns.t != JV_NS)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "cannot assign attribute on non-namespace object");
        if (t->attr[0] == '_')
            jinja_rt_fail(rt, TANDEM_EFORMAT,
                          "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                          "but got '%s'. Please rename the attribute.", t->attr);
        jinja_dict_put(rt->a, ns.u.d, jinja_cstr(t->attr), v);
    } else {  /* JN_TUPLE */
        const jinja_list *items = jinja_iter(rt, v);
        rt->line = t->line;
        if ((int)items->n > t->nkids)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "too many values to unpack (expected %d)", t->nkids);
        if ((int)items->n < t->nkids)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "not enough values to unpack (expected %d, got %zu)", t->nkids,
                          items->n);
        for (int i = 0; i < t->nkids; i++)
            assign(rt, f, t->kids[i], items->v[i]);
    }
}

static jinja_val make_macro(jinja_rt *rt, const jinja_node *n, jinja_frame *closure)
{
    jinja_macro *m = jinja_alloc(rt->a, sizeof *m);
    m->node = n;
    m->closure = closure;
    jinja_val v = {0};
    v.t = JV_MACRO;
    v.u.m = m;
    return v;
}

static int exec_for(jinja_rt *rt, jinja_frame *f, const jinja_node *n, jinja_buf *out)
{
    const jinja_list *items = jinja_iter(rt, eval(rt, f, n->b));
    if (n->c) {
        jinja_list *kept = jinja_list_new(rt->a, items->n);
        jinja_frame *fr = frame_new(rt, f);  /* an expression cannot capture it */
        for (size_t i = 0; i < items->n; i++) {
            step(rt, n);
            fr->n = 0;
            assign(rt, fr, n->a, items->v[i]);
            if (jinja_truthy(eval(rt, fr, n->c)))
                kept->v[kept->n++] = items->v[i];
        }
        items = kept;
    }
    jinja_loop *loop = jinja_zalloc(rt->a, sizeof *loop);
    loop->items = items;
    jinja_val lv = {0};
    lv.t = JV_LOOP;
    lv.u.loop = loop;
    /* Without closures nothing outlives an iteration's frame, so one frame is
     * reused (cleared) for all iterations: a long loop then costs no memory. */
    jinja_frame *shared = (n->flags & JNF_CAPTURES) ? NULL : frame_new(rt, f);
    for (size_t i = 0; i < items->n; i++) {
        loop->i = (int64_t)i;
        step(rt, n);
        jinja_frame *fr = shared ? shared : frame_new(rt, f);
        fr->n = 0;
        assign(rt, fr, n->a, items->v[i]);
        frame_set(rt, fr, "loop", lv);
        if (exec_body(rt, fr, n->d, out) == JX_BREAK)
            break;
    }
    if (items->n == 0 && n->e)
        return exec_body(rt, frame_new(rt, f), n->e, out);
    return JX_NEXT;
}

static int exec(jinja_rt *rt, jinja_frame *f, const jinja_node *n, jinja_buf *out)
{
    step(rt, n);
    switch (n->kind) {
    case JN_BODY:
        return exec_body(rt, f, n, out);
    case JN_DATA:
        jinja_buf_put(out, n->cval.u.s.p, n->cval.u.s.n);
        return JX_NEXT;
    case JN_PRINT:
        jinja_str_of(out, eval(rt, f, n->a));
        return JX_NEXT;
    case JN_IF:
        for (int i = 0; i + 1 < n->nkids; i += 2)
            if (jinja_truthy(eval(rt, f, n->kids[i])))
                return exec_body(rt, f, n->kids[i + 1], out);
        if (n->c)
            return exec_body(rt, f, n->c, out);
        return JX_NEXT;
    case JN_FOR:
        return exec_for(rt, f, n, out);
    case JN_SET:
        assign(rt, f, n->a, eval(rt, f, n->b));
        return JX_NEXT;
    case JN_SETBLOCK: {
        jinja_buf b;
        jinja_buf_init(&b, rt->a);
        int r = exec_body(rt, frame_new(rt, f), n->d, &b);
        jinja_val v = jinja_buf_val(&b);
        if (n->b)
            v = apply_chain(rt, f, n->b, v);
        assign(rt, f, n->a, v);
        return r;
    }
    case JN_MACRO:
        frame_set(rt, f, n->name, make_macro(rt, n, f));
        return JX_NEXT;
    case JN_CALLBLOCK: {
        const jinja_node *call = n->a;
        jinja_val callee = eval(rt, f, call->a);
        jinja_args a;
        eval_args(rt, f, call, &a, 1);
        ((const char **)a.kwn)[a.nkw] = "caller";
        ((jinja_val *)a.kwv)[a.nkw] = make_macro(rt, n, f);
        a.nkw++;
        rt->line = n->line;
        jinja_str_of(out, jinja_call(rt, callee, &a));
        return JX_NEXT;
    }
    case JN_FILTERBLOCK: {
        jinja_buf b;
        jinja_buf_init(&b, rt->a);
        int r = exec_body(rt, frame_new(rt, f), n->d, &b);
        jinja_str_of(out, apply_chain(rt, f, n->b, jinja_buf_val(&b)));
        return r;
    }
    case JN_WITH: {
        jinja_frame *fr = frame_new(rt, f);
        for (int i = 0; i + 1 < n->nkids; i += 2)
            assign(rt, fr, n->kids[i], eval(rt, f, n->kids[i + 1]));
        return exec_body(rt, fr, n->d, out);
    }
    case JN_BREAK:
        return JX_BREAK;
    case JN_CONTINUE:
        return JX_CONTINUE;
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "internal: unexpected node %d in a statement", n->kind);
    }
}

static int exec_body(jinja_rt *rt, jinja_frame *f, const jinja_node *body, jinja_buf *out)
{
    if (++rt->depth > MAX_DEPTH)
        jinja_rt_fail(rt, TANDEM_ENOMEM, "template recursion too deep");
    int r = JX_NEXT;
    for (int i = 0; i < body->nkids && r == JX_NEXT; i++)
        r = exec(rt, f, body->kids[i], out);
    rt->depth--;
    return r;
}

void jinja_exec_root(jinja_rt *rt, const jinja_node *root, jinja_buf *out)
{
    exec_body(rt, frame_new(rt, NULL), root, out);
}
