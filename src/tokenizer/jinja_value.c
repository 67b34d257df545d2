/*
 * jinja_value.c - the value layer of the chat-template interpreter: the
 * arena, error unwinding, UTF-8 helpers, and Python semantics of values
 * (truthiness, ==, ordering, str() and repr(), json.loads/json.dumps).
 *
 * Printing follows CPython exactly where templates can observe it: floats
 * print as repr(float) (shortest round-trip digits), containers as their
 * repr with single-quoted strings, None/True/False capitalised. tojson is
 * transformers' override: json.dumps(x, ensure_ascii=False, indent=None,
 * separators=None, sort_keys=False) with Python's separators and escapes.
 */
#include "tokenizer/jinja_impl.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- errors ---------------------------------------------------------------- */

void jinja_fail(jinja_err *e, int code, int line, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (line > 0)
        td_err(e->msg, e->msglen, code, "chat template line %d: %s", line, tmp);
    else
        td_err(e->msg, e->msglen, code, "chat template: %s", tmp);
    e->code = code;
    longjmp(e->jb, 1);
}

void jinja_rt_fail(jinja_rt *rt, int code, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    jinja_fail(rt->e, code, rt->line, "%s", tmp);
}

void jinja_rt_undef(jinja_rt *rt, jinja_val v)
{
    jinja_rt_fail(rt, TANDEM_EFORMAT, "%s", jinja_undef_msg(rt->a, v));
}

/* ---- arena ----------------------------------------------------------------- */

/* 32-byte header keeps the data 16-byte aligned. */
struct jinja_chunk { jinja_chunk *next; size_t cap, used, pad; };

#define CHUNK_MIN (64u << 10)

void jinja_arena_init(jinja_arena *a, jinja_err *e, size_t limit)
{
    a->head = NULL;
    a->total = 0;
    a->limit = limit;
    a->e = e;
}

void jinja_arena_free(jinja_arena *a)
{
    jinja_chunk *c = a->head;
    while (c) {
        jinja_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
    a->total = 0;
}

static jinja_chunk *arena_grow(jinja_arena *a, size_t n)
{
    /* Chunks double up to 1 MiB so a big render makes few mallocs. */
    size_t want = a->total / 2;
    if (want < CHUNK_MIN)
        want = CHUNK_MIN;
    if (want > (1u << 20))
        want = 1u << 20;
    if (want < n)
        want = n;
    if (want > a->limit || a->total > a->limit - want)
        jinja_fail(a->e, TANDEM_ENOMEM, 0, "rendering needs more than %zu MiB (template too costly)",
                   a->limit >> 20);
    jinja_chunk *c = malloc(sizeof *c + want);
    if (!c)
        jinja_fail(a->e, TANDEM_ENOMEM, 0, "out of memory");
    c->cap = want;
    c->used = 0;
    a->total += want;
    return c;
}

void *jinja_alloc(jinja_arena *a, size_t n)
{
    if (n > ((size_t)1 << 40))
        jinja_fail(a->e, TANDEM_ENOMEM, 0, "allocation too large");
    n = (n + 15) & ~(size_t)15;
    if (n == 0)
        n = 16;
    jinja_chunk *h = a->head;
    if (h && h->cap - h->used >= n) {
        void *p = (char *)(h + 1) + h->used;
        h->used += n;
        return p;
    }
    jinja_chunk *c = arena_grow(a, n);
    c->used = n;
    if (h && n > CHUNK_MIN / 4 && h->cap - h->used > CHUNK_MIN / 4) {
        /* A big block gets its own chunk behind the head, which keeps serving. */
        c->next = h->next;
        h->next = c;
    } else {
        c->next = h;
        a->head = c;
    }
    return c + 1;
}

void *jinja_zalloc(jinja_arena *a, size_t n)
{
    void *p = jinja_alloc(a, n);
    memset(p, 0, n);
    return p;
}

char *jinja_strndup(jinja_arena *a, const char *s, size_t n)
{
    char *p = jinja_alloc(a, n + 1);
    if (n)
        memcpy(p, s, n);
    p[n] = 0;
    return p;
}

/* ---- buffers, lists, dicts ------------------------------------------------- */

void jinja_buf_init(jinja_buf *b, jinja_arena *a)
{
    b->a = a;
    b->p = NULL;
    b->n = b->cap = 0;
}

void jinja_buf_put(jinja_buf *b, const void *s, size_t n)
{
    if (n == 0)
        return;
    if (b->cap - b->n < n) {
        size_t need = b->n + n;
        if (need < b->n)
            jinja_fail(b->a->e, TANDEM_ENOMEM, 0, "string too large");
        jinja_chunk *h = b->a->head;
        /* Extend in place when the buffer is the last thing in the head chunk. */
        /* Capacities stay multiples of 16 so the chunk's bump pointer stays aligned. */
        size_t need16 = (need + 15) & ~(size_t)15;
        if (b->p && h && b->p + b->cap == (char *)(h + 1) + h->used && h->cap - h->used >= need16 - b->cap) {
            h->used += need16 - b->cap;
            b->cap = need16;
        } else {
            size_t cap = b->cap * 2;
            if (cap < need16)
                cap = need16;
            if (cap < 64)
                cap = 64;
            char *p = jinja_alloc(b->a, cap);
            if (b->n)
                memcpy(p, b->p, b->n);
            b->p = p;
            b->cap = cap;
        }
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

void jinja_buf_putc(jinja_buf *b, char c) { jinja_buf_put(b, &c, 1); }
void jinja_buf_puts(jinja_buf *b, const char *s) { jinja_buf_put(b, s, strlen(s)); }

jinja_val jinja_cstr(const char *s) { return jinja_str(s, strlen(s)); }

jinja_list *jinja_list_new(jinja_arena *a, size_t cap)
{
    jinja_list *l = jinja_alloc(a, sizeof *l);
    l->n = 0;
    l->cap = cap;
    l->v = jinja_alloc(a, (cap ? cap : 1) * sizeof *l->v);  /* never NULL: memcpy of 0 items is fine */
    return l;
}

void jinja_list_push(jinja_arena *a, jinja_list *l, jinja_val v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        jinja_val *nv = jinja_alloc(a, cap * sizeof *nv);
        if (l->n)
            memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

jinja_dict *jinja_dict_new(jinja_arena *a, size_t cap)
{
    jinja_dict *d = jinja_alloc(a, sizeof *d);
    d->n = 0;
    d->cap = cap;
    d->k = jinja_alloc(a, (cap ? cap : 1) * sizeof *d->k);  /* never NULL */
    d->v = jinja_alloc(a, (cap ? cap : 1) * sizeof *d->v);
    return d;
}

int jinja_dict_find(const jinja_dict *d, jinja_val k, size_t *idx)
{
    for (size_t i = 0; i < d->n; i++) {
        if (jinja_eq(d->k[i], k)) {
            *idx = i;
            return 1;
        }
    }
    return 0;
}

int jinja_dict_get_s(const jinja_dict *d, const char *k, size_t n, jinja_val *out)
{
    for (size_t i = 0; i < d->n; i++) {
        const jinja_val *key = &d->k[i];
        if (key->t == JV_STR && key->u.s.n == n && memcmp(key->u.s.p, k, n) == 0) {
            *out = d->v[i];
            return 1;
        }
    }
    return 0;
}

void jinja_dict_put(jinja_arena *a, jinja_dict *d, jinja_val k, jinja_val v)
{
    size_t i;
    if (jinja_dict_find(d, k, &i)) {
        d->v[i] = v;  /* Python keeps the first key object and its position */
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        jinja_val *nk = jinja_alloc(a, cap * sizeof *nk), *nv = jinja_alloc(a, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}

/* ---- UTF-8 ----------------------------------------------------------------- */

uint32_t jinja_utf8_next(const char *s, size_t n, size_t *i)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t k = *i;
    uint32_t c = p[k];
    int len = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    if (c < 0x80 || k + (size_t)len > n) {
        *i = k + 1;
        return c;
    }
    if (len == 2)
        c = ((c & 0x1f) << 6) | (p[k + 1] & 0x3f);
    else if (len == 3)
        c = ((c & 0x0f) << 12) | ((p[k + 1] & 0x3f) << 6) | (p[k + 2] & 0x3f);
    else
        c = ((c & 0x07) << 18) | ((p[k + 1] & 0x3f) << 12) | ((p[k + 2] & 0x3f) << 6) | (p[k + 3] & 0x3f);
    *i = k + (size_t)len;
    return c;
}

void jinja_utf8_put(jinja_buf *b, uint32_t c)
{
    char t[4];
    size_t n;
    if (c < 0x80) {
        t[0] = (char)c;
        n = 1;
    } else if (c < 0x800) {
        t[0] = (char)(0xc0 | (c >> 6));
        t[1] = (char)(0x80 | (c & 0x3f));
        n = 2;
    } else if (c < 0x10000) {
        t[0] = (char)(0xe0 | (c >> 12));
        t[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        t[2] = (char)(0x80 | (c & 0x3f));
        n = 3;
    } else {
        t[0] = (char)(0xf0 | (c >> 18));
        t[1] = (char)(0x80 | ((c >> 12) & 0x3f));
        t[2] = (char)(0x80 | ((c >> 6) & 0x3f));
        t[3] = (char)(0x80 | (c & 0x3f));
        n = 4;
    }
    jinja_buf_put(b, t, n);
}

size_t jinja_utf8_count(const char *p, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)p[i] & 0xc0) != 0x80;
    return c;
}

int jinja_utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        uint32_t cp, min;
        if ((c & 0xe0) == 0xc0) {
            len = 2; cp = c & 0x1f; min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3; cp = c & 0x0f; min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4; cp = c & 0x07; min = 0x10000;
        } else {
            return 0;
        }
        if (i + (size_t)len > n)
            return 0;
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += (size_t)len;
    }
    return 1;
}

int jinja_py_isspace(uint32_t c)
{
    if (c < 0x80)
        return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
           c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Python str.isprintable() for one code point. */
static int py_isprintable(uint32_t c)
{
    if (c < 0x80)
        return c >= 0x20 && c < 0x7f;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS:
        return 0;
    default:
        return 1;
    }
}

/* ---- Python semantics -------------------------------------------------------- */

int jinja_truthy(jinja_val v)
{
    switch (v.t) {
    case JV_UNDEF: case JV_NONE: return 0;
    case JV_BOOL: case JV_INT: return v.u.i != 0;
    case JV_FLOAT: return v.u.f != 0.0;
    case JV_STR: return v.u.s.n != 0;
    case JV_LIST: return v.u.l->n != 0;
    case JV_DICT: return v.u.d->n != 0;
    default: return 1;
    }
}

int jinja_hashable(jinja_val v)
{
    if (v.t == JV_LIST && (v.flag & JVF_TUPLE)) {
        for (size_t i = 0; i < v.u.l->n; i++)
            if (!jinja_hashable(v.u.l->v[i]))
                return 0;
        return 1;
    }
    return v.t != JV_LIST && v.t != JV_DICT;
}

int jinja_eq(jinja_val a, jinja_val b)
{
    if (jinja_is_num(a) && jinja_is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT)
            return a.u.i == b.u.i;
        return jinja_num(a) == jinja_num(b);
    }
    if (a.t != b.t)
        return 0;
    switch (a.t) {
    case JV_UNDEF: case JV_NONE: return 1;
    case JV_STR: return a.u.s.n == b.u.s.n && memcmp(a.u.s.p, b.u.s.p, a.u.s.n) == 0;
    case JV_LIST:
        if ((a.flag & JVF_TUPLE) != (b.flag & JVF_TUPLE) || a.u.l->n != b.u.l->n)
            return 0;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!jinja_eq(a.u.l->v[i], b.u.l->v[i]))
                return 0;
        return 1;
    case JV_DICT:
        if (a.u.d->n != b.u.d->n)
            return 0;
        for (size_t i = 0; i < a.u.d->n; i++) {
            size_t j;
            if (!jinja_dict_find(b.u.d, a.u.d->k[i], &j) || !jinja_eq(a.u.d->v[i], b.u.d->v[j]))
                return 0;
        }
        return 1;
    case JV_NS: return a.u.d == b.u.d;
    case JV_MACRO: return a.u.m == b.u.m;
    case JV_FUNC: return a.u.fn == b.u.fn;
    case JV_LOOP: return a.u.loop == b.u.loop;
    default: return 0;
    }
}

const char *jinja_type_name(jinja_val v)
{
    switch (v.t) {
    case JV_UNDEF: return "Undefined";
    case JV_NONE: return "NoneType";
    case JV_BOOL: return "bool";
    case JV_INT: return "int";
    case JV_FLOAT: return "float";
    case JV_STR: return (v.flag & JVF_MARKUP) ? "Markup" : "str";
    case JV_LIST: return (v.flag & JVF_TUPLE) ? "tuple" : "list";
    case JV_DICT: return "dict";
    case JV_NS: return "Namespace";
    case JV_MACRO: return "Macro";
    case JV_FUNC: return "builtin_function_or_method";
    case JV_LOOP: return "LoopContext";
    default: return "object";
    }
}

static const char *owner_name(int t)
{
    switch (t) {
    case JV_NONE: return "None";
    case JV_BOOL: return "bool object";
    case JV_INT: return "int object";
    case JV_FLOAT: return "float object";
    case JV_STR: return "str object";
    case JV_LIST: return "list object";
    case JV_DICT: return "dict object";
    case JV_NS: return "Namespace object";
    case JV_LOOP: return "LoopContext object";
    default: return "object";
    }
}

const char *jinja_undef_msg(jinja_arena *a, jinja_val v)
{
    char tmp[512];
    if (v.owner == JU_HINT && v.u.name)
        return v.u.name;
    if (v.owner == JU_NAME)
        snprintf(tmp, sizeof tmp, "'%s' is undefined", v.u.name ? v.u.name : "?");
    else if (v.owner == JU_MISSING)
        snprintf(tmp, sizeof tmp, "a required argument is missing");
    else
        snprintf(tmp, sizeof tmp, "'%s' has no attribute '%s'", owner_name(v.owner), v.u.name ? v.u.name : "?");
    return jinja_strndup(a, tmp, strlen(tmp));
}

void jinja_float_repr(char out[40], double f)
{
    if (isnan(f)) {
        strcpy(out, "nan");
        return;
    }
    if (isinf(f)) {
        strcpy(out, f < 0 ? "-inf" : "inf");
        return;
    }
    if (f == 0) {
        strcpy(out, signbit(f) ? "-0.0" : "0.0");
        return;
    }
    /* Shortest digits that round-trip: the first precision whose correctly
     * rounded form parses back to f (what CPython's repr produces). */
    char buf[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, f);
        if (strtod(buf, NULL) == f)
            break;
    }
    const char *p = buf;
    int neg = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    char dig[24];
    int nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < 23)
            dig[nd++] = *p;
    while (nd > 1 && dig[nd - 1] == '0')
        nd--;
    int ex = atoi(p + 1);
    char *o = out;
    if (neg)
        *o++ = '-';
    if (ex >= -4 && ex < 16) {
        int decpt = ex + 1;
        if (decpt <= 0) {
            *o++ = '0';
            *o++ = '.';
            for (int i = 0; i < -decpt; i++)
                *o++ = '0';
            for (int i = 0; i < nd; i++)
                *o++ = dig[i];
        } else if (decpt >= nd) {
            for (int i = 0; i < nd; i++)
                *o++ = dig[i];
            for (int i = nd; i < decpt; i++)
                *o++ = '0';
            *o++ = '.';
            *o++ = '0';
        } else {
            for (int i = 0; i < nd; i++) {
                if (i == decpt)
                    *o++ = '.';
                *o++ = dig[i];
            }
        }
        *o = 0;
    } else {
        *o++ = dig[0];
        if (nd > 1) {
            *o++ = '.';
            for (int i = 1; i < nd; i++)
                *o++ = dig[i];
        }
        snprintf(o, 16, "e%c%02d", ex < 0 ? '-' : '+', ex < 0 ? -ex : ex);
    }
}

static void repr_str(jinja_buf *b, const char *s, size_t n)
{
    int has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = (has_sq && !has_dq) ? '"' : '\'';
    jinja_buf_putc(b, q);
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        uint32_t c = jinja_utf8_next(s, n, &i);
        char t[16];
        if (c == (uint32_t)q || c == '\\') {
            t[0] = '\\';
            t[1] = (char)c;
            jinja_buf_put(b, t, 2);
        } else if (c == '\t') {
            jinja_buf_puts(b, "\\t");
        } else if (c == '\n') {
            jinja_buf_puts(b, "\\n");
        } else if (c == '\r') {
            jinja_buf_puts(b, "\\r");
        } else if (py_isprintable(c)) {
            jinja_buf_put(b, s + start, i - start);
        } else {
            if (c <= 0xff)
                snprintf(t, sizeof t, "\\x%02x", c);
            else if (c <= 0xffff)
                snprintf(t, sizeof t, "\\u%04x", c);
            else
                snprintf(t, sizeof t, "\\U%08x", c);
            jinja_buf_puts(b, t);
        }
    }
    jinja_buf_putc(b, q);
}

static void print_val(jinja_buf *b, jinja_val v, int repr, int depth);

static void print_dict(jinja_buf *b, const jinja_dict *d, int depth)
{
    jinja_buf_putc(b, '{');
    for (size_t i = 0; i < d->n; i++) {
        if (i)
            jinja_buf_puts(b, ", ");
        print_val(b, d->k[i], 1, depth + 1);
        jinja_buf_puts(b, ": ");
        print_val(b, d->v[i], 1, depth + 1);
    }
    jinja_buf_putc(b, '}');
}

static void print_val(jinja_buf *b, jinja_val v, int repr, int depth)
{
    char t[64];
    if (depth > 200) {  /* only reachable through a namespace that holds itself */
        jinja_buf_puts(b, "...");
        return;
    }
    switch (v.t) {
    case JV_UNDEF:
        if (repr)
            jinja_buf_puts(b, "Undefined");
        return;
    case JV_NONE: jinja_buf_puts(b, "None"); return;
    case JV_BOOL: jinja_buf_puts(b, v.u.i ? "True" : "False"); return;
    case JV_INT:
        snprintf(t, sizeof t, "%lld", (long long)v.u.i);
        jinja_buf_puts(b, t);
        return;
    case JV_FLOAT:
        jinja_float_repr(t, v.u.f);
        jinja_buf_puts(b, t);
        return;
    case JV_STR:
        if (!repr) {
            jinja_buf_put(b, v.u.s.p, v.u.s.n);
        } else {
            if (v.flag & JVF_MARKUP)
                jinja_buf_puts(b, "Markup(");
            repr_str(b, v.u.s.p, v.u.s.n);
            if (v.flag & JVF_MARKUP)
                jinja_buf_putc(b, ')');
        }
        return;
    case JV_LIST: {
        int tup = v.flag & JVF_TUPLE;
        jinja_buf_putc(b, tup ? '(' : '[');
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i)
                jinja_buf_puts(b, ", ");
            print_val(b, v.u.l->v[i], 1, depth + 1);
        }
        if (tup && v.u.l->n == 1)
            jinja_buf_putc(b, ',');
        jinja_buf_putc(b, tup ? ')' : ']');
        return;
    }
    case JV_DICT: print_dict(b, v.u.d, depth); return;
    case JV_NS:
        jinja_buf_puts(b, "<Namespace ");
        print_dict(b, v.u.d, depth);
        jinja_buf_putc(b, '>');
        return;
    case JV_MACRO: {
        const jinja_node *n = v.u.m->node;
        if (n->kind == JN_MACRO) {
            jinja_buf_puts(b, "<Macro '");
            jinja_buf_puts(b, n->name);
            jinja_buf_puts(b, "'>");
        } else {
            jinja_buf_puts(b, "<Macro 'caller'>");
        }
        return;
    }
    case JV_FUNC:
        jinja_buf_puts(b, "<built-in method ");
        jinja_buf_puts(b, v.u.fn->name);
        jinja_buf_putc(b, '>');
        return;
    case JV_LOOP:
        snprintf(t, sizeof t, "<LoopContext %lld/%zu>", (long long)v.u.loop->i + 1, v.u.loop->items->n);
        jinja_buf_puts(b, t);
        return;
    default:
        return;
    }
}

void jinja_str_of(jinja_buf *b, jinja_val v) { print_val(b, v, 0, 0); }
void jinja_repr_of(jinja_buf *b, jinja_val v) { print_val(b, v, 1, 0); }

jinja_val jinja_to_str(jinja_rt *rt, jinja_val v)
{
    if (v.t == JV_STR)
        return v;
    if (v.t == JV_UNDEF)
        return jinja_str("", 0);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    jinja_str_of(&b, v);
    return jinja_buf_val(&b);
}

static int cmp_num(jinja_val a, jinja_val b)
{
    if (a.t != JV_FLOAT && b.t != JV_FLOAT)
        return a.u.i < b.u.i ? -1 : a.u.i > b.u.i;
    double x = jinja_num(a), y = jinja_num(b);
    return x < y ? -1 : x > y;
}

int jinja_cmp(jinja_rt *rt, jinja_val a, jinja_val b)
{
    if (a.t == JV_UNDEF)
        jinja_rt_undef(rt, a);
    if (b.t == JV_UNDEF)
        jinja_rt_undef(rt, b);
    if (jinja_is_num(a) && jinja_is_num(b))
        return cmp_num(a, b);
    if (a.t == JV_STR && b.t == JV_STR) {
        size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int c = memcmp(a.u.s.p, b.u.s.p, n);  /* UTF-8 byte order is code point order */
        if (c)
            return c < 0 ? -1 : 1;
        return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n;
    }
    if (a.t == JV_LIST && b.t == JV_LIST && (a.flag & JVF_TUPLE) == (b.flag & JVF_TUPLE)) {
        size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (size_t i = 0; i < n; i++) {
            if (jinja_eq(a.u.l->v[i], b.u.l->v[i]))
                continue;
            return jinja_cmp(rt, a.u.l->v[i], b.u.l->v[i]);
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
    }
    jinja_rt_fail(rt, TANDEM_EFORMAT, "'<' not supported between instances of '%s' and '%s'",
                  jinja_type_name(a), jinja_type_name(b));
}

/* ---- JSON ------------------------------------------------------------------ */

static jinja_val from_json(jinja_arena *a, const json_t *j, int depth)
{
    if (depth > 512)
        jinja_fail(a->e, TANDEM_EINVAL, 0, "context JSON nested too deeply");
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        jinja_dict *d = jinja_dict_new(a, json_object_size(j));
        const char *k;
        json_t *v;
        /* Keys are unique in a jansson object: append without searching. */
        json_object_foreach((json_t *)j, k, v) {
            d->k[d->n] = jinja_cstr(k);
            d->v[d->n] = from_json(a, v, depth + 1);
            d->n++;
        }
        return jinja_dict_val(d);
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        jinja_list *l = jinja_list_new(a, n);
        for (size_t i = 0; i < n; i++)
            l->v[i] = from_json(a, json_array_get(j, i), depth + 1);
        l->n = n;
        return jinja_list_val(l, 0);
    }
    case JSON_STRING: return jinja_str(json_string_value(j), json_string_length(j));
    case JSON_INTEGER: return jinja_int((int64_t)json_integer_value(j));
    case JSON_REAL: return jinja_float(json_real_value(j));
    case JSON_TRUE: return jinja_bool(1);
    case JSON_FALSE: return jinja_bool(0);
    default: return jinja_none();
    }
}

jinja_val jinja_from_json(jinja_arena *a, const json_t *j) { return from_json(a, j, 0); }

static void json_str(jinja_buf *b, const char *s, size_t n, int ensure_ascii)
{
    jinja_buf_putc(b, '"');
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        uint32_t c = jinja_utf8_next(s, n, &i);
        char t[16];
        switch (c) {
        case '"': jinja_buf_puts(b, "\\\""); continue;
        case '\\': jinja_buf_puts(b, "\\\\"); continue;
        case '\n': jinja_buf_puts(b, "\\n"); continue;
        case '\r': jinja_buf_puts(b, "\\r"); continue;
        case '\t': jinja_buf_puts(b, "\\t"); continue;
        case '\b': jinja_buf_puts(b, "\\b"); continue;
        case '\f': jinja_buf_puts(b, "\\f"); continue;
        default: break;
        }
        if (c < 0x20 || (ensure_ascii && c >= 0x7f)) {
            if (c >= 0x10000) {
                uint32_t v = c - 0x10000;
                snprintf(t, sizeof t, "\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
            } else {
                snprintf(t, sizeof t, "\\u%04x", c);
            }
            jinja_buf_puts(b, t);
        } else {
            jinja_buf_put(b, s + start, i - start);
        }
    }
    jinja_buf_putc(b, '"');
}

static void json_float(jinja_buf *b, double f)
{
    char t[40];
    if (isnan(f))
        jinja_buf_puts(b, "NaN");
    else if (isinf(f))
        jinja_buf_puts(b, f < 0 ? "-Infinity" : "Infinity");
    else {
        jinja_float_repr(t, f);
        jinja_buf_puts(b, t);
    }
}

static void json_newline(jinja_buf *b, const jinja_json_opts *o, int level)
{
    jinja_buf_putc(b, '\n');
    for (int i = 0; i < level; i++)
        jinja_buf_put(b, o->indent, o->indent_n);
}

static void json_val(jinja_rt *rt, jinja_buf *b, jinja_val v, const jinja_json_opts *o, int level)
{
    char t[32];
    if (level > 400)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "tojson: value nested too deeply");
    switch (v.t) {
    case JV_NONE: jinja_buf_puts(b, "null"); return;
    case JV_BOOL: jinja_buf_puts(b, v.u.i ? "true" : "false"); return;
    case JV_INT:
        snprintf(t, sizeof t, "%lld", (long long)v.u.i);
        jinja_buf_puts(b, t);
        return;
    case JV_FLOAT: json_float(b, v.u.f); return;
    case JV_STR: json_str(b, v.u.s.p, v.u.s.n, o->ensure_ascii); return;
    case JV_LIST: {
        const jinja_list *l = v.u.l;
        if (l->n == 0) {
            jinja_buf_puts(b, "[]");
            return;
        }
        jinja_buf_putc(b, '[');
        if (o->indent)
            json_newline(b, o, level + 1);
        for (size_t i = 0; i < l->n; i++) {
            if (i) {
                jinja_buf_put(b, o->item_sep, o->item_sep_n);
                if (o->indent)
                    json_newline(b, o, level + 1);
            }
            json_val(rt, b, l->v[i], o, level + 1);
        }
        if (o->indent)
            json_newline(b, o, level);
        jinja_buf_putc(b, ']');
        return;
    }
    case JV_DICT: {
        const jinja_dict *d = v.u.d;
        if (d->n == 0) {
            jinja_buf_puts(b, "{}");
            return;
        }
        size_t *order = jinja_alloc(rt->a, d->n * sizeof *order);
        for (size_t i = 0; i < d->n; i++)
            order[i] = i;
        if (o->sort_keys) {  /* insertion sort: stable, and dicts here are small */
            for (size_t i = 1; i < d->n; i++) {
                size_t x = order[i], j = i;
                while (j > 0 && jinja_cmp(rt, d->k[x], d->k[order[j - 1]]) < 0) {
                    order[j] = order[j - 1];
                    j--;
                }
                order[j] = x;
            }
        }
        jinja_buf_putc(b, '{');
        if (o->indent)
            json_newline(b, o, level + 1);
        for (size_t i = 0; i < d->n; i++) {
            jinja_val k = d->k[order[i]];
            if (i) {
                jinja_buf_put(b, o->item_sep, o->item_sep_n);
                if (o->indent)
                    json_newline(b, o, level + 1);
            }
            if (k.t == JV_STR) {
                json_str(b, k.u.s.p, k.u.s.n, o->ensure_ascii);
            } else if (k.t == JV_FLOAT) {
                jinja_buf_putc(b, '"');
                json_float(b, k.u.f);
                jinja_buf_putc(b, '"');
            } else if (k.t == JV_BOOL || k.t == JV_NONE || k.t == JV_INT) {
                jinja_buf_putc(b, '"');
                json_val(rt, b, k, o, level + 1);
                jinja_buf_putc(b, '"');
            } else {
                jinja_rt_fail(rt, TANDEM_EFORMAT, "tojson: keys must be str, int, float, bool or None, not %s",
                              jinja_type_name(k));
            }
            jinja_buf_put(b, o->key_sep, o->key_sep_n);
            json_val(rt, b, d->v[order[i]], o, level + 1);
        }
        if (o->indent)
            json_newline(b, o, level);
        jinja_buf_putc(b, '}');
        return;
    }
    default:
        jinja_rt_fail(rt, TANDEM_EFORMAT, "tojson: Object of type %s is not JSON serializable",
                      jinja_type_name(v));
    }
}

void jinja_tojson(jinja_rt *rt, jinja_buf *b, jinja_val v, const jinja_json_opts *o)
{
    json_val(rt, b, v, o, 0);
}
