/*
 * jinja_str.c - Python str operations for the chat-template interpreter:
 * strip/split/replace/find/case mapping/slicing over code points, markupsafe
 * escaping, and the two formatting languages templates can reach
 * ("%s" % x with the |format filter, and str.format).
 *
 * Whitespace is Python's str.isspace(); indices count code points; case
 * mapping is utf8proc's simple (one-to-one) mapping, which differs from
 * Python only for the few characters with multi-character mappings
 * (e.g. 'ß'.upper() is 'SS' in Python, 'ß' here).
 */
#include "tokenizer/jinja_impl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <utf8proc.h>

static void need_str(jinja_rt *rt, jinja_val v, const char *what)
{
    if (v.t == JV_UNDEF)
        jinja_rt_undef(rt, v);
    if (v.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%s must be str, not %s", what, jinja_type_name(v));
}

/* Is code point c one of the code points of set[0..n)? */
static int in_set(uint32_t c, const char *set, size_t n)
{
    size_t i = 0;
    while (i < n)
        if (jinja_utf8_next(set, n, &i) == c)
            return 1;
    return 0;
}

static size_t prev_cp(const char *p, size_t i)
{
    do
        i--;
    while (i > 0 && ((unsigned char)p[i] & 0xc0) == 0x80);
    return i;
}

jinja_val jinja_s_strip(jinja_rt *rt, jinja_val s, jinja_val chars, int left, int right)
{
    need_str(rt, s, "the string to strip");
    int ws = chars.t == JV_NONE || chars.t == JV_UNDEF;
    if (!ws && chars.t != JV_STR)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "strip arg must be None or str");
    const char *p = s.u.s.p;
    size_t lo = 0, hi = s.u.s.n;
    if (left) {
        while (lo < hi) {
            size_t k = lo;
            uint32_t c = jinja_utf8_next(p, hi, &k);
            if (ws ? !jinja_py_isspace(c) : !in_set(c, chars.u.s.p, chars.u.s.n))
                break;
            lo = k;
        }
    }
    if (right) {
        while (hi > lo) {
            size_t start = prev_cp(p, hi), k = start;
            uint32_t c = jinja_utf8_next(p, hi, &k);
            if (ws ? !jinja_py_isspace(c) : !in_set(c, chars.u.s.p, chars.u.s.n))
                break;
            hi = start;
        }
    }
    return jinja_str(p + lo, hi - lo);
}

static uint32_t map_case(uint32_t c, int mode)  /* 0 lower, 1 upper, 2 title */
{
    if (c < 0x80) {
        if (mode == 0)
            return (c >= 'A' && c <= 'Z') ? c + 32 : c;
        return (c >= 'a' && c <= 'z') ? c - 32 : c;
    }
    utf8proc_int32_t r = mode == 0 ? utf8proc_tolower((utf8proc_int32_t)c)
                       : mode == 1 ? utf8proc_toupper((utf8proc_int32_t)c)
                                   : utf8proc_totitle((utf8proc_int32_t)c);
    return (uint32_t)r;
}

static int is_cased(uint32_t c)
{
    if (c < 0x80)
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT;
}

jinja_val jinja_s_case(jinja_rt *rt, jinja_val s, int upper)
{
    need_str(rt, s, "the string");
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    size_t i = 0;
    while (i < s.u.s.n) {
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        if (upper && c == 0xdf)  /* Python's full mapping: 'ß'.upper() == 'SS' */
            jinja_buf_put(&b, "SS", 2);
        else
            jinja_utf8_put(&b, map_case(c, upper));
    }
    return jinja_buf_val(&b);
}

jinja_val jinja_s_capitalize(jinja_rt *rt, jinja_val s)
{
    need_str(rt, s, "the string");
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    size_t i = 0;
    int first = 1;
    while (i < s.u.s.n) {
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        jinja_utf8_put(&b, map_case(c, first ? 2 : 0));
        first = 0;
    }
    return jinja_buf_val(&b);
}

jinja_val jinja_s_title_py(jinja_rt *rt, jinja_val s)
{
    need_str(rt, s, "the string");
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    size_t i = 0;
    int prev_cased = 0;
    while (i < s.u.s.n) {
        uint32_t c = jinja_utf8_next(s.u.s.p, s.u.s.n, &i);
        jinja_utf8_put(&b, map_case(c, prev_cased ? 0 : 2));
        prev_cased = is_cased(c);
    }
    return jinja_buf_val(&b);
}

jinja_val jinja_s_replace(jinja_rt *rt, jinja_val s, jinja_val old, jinja_val new_, int64_t count)
{
    need_str(rt, s, "the string");
    need_str(rt, old, "replace() argument 1");
    need_str(rt, new_, "replace() argument 2");
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0;
    if (old.u.s.n == 0) {  /* insert before every code point and at the end */
        while (count != 0) {
            jinja_buf_put(&b, new_.u.s.p, new_.u.s.n);
            count--;
            if (i >= n)
                break;
            size_t k = i;
            jinja_utf8_next(p, n, &k);
            jinja_buf_put(&b, p + i, k - i);
            i = k;
        }
        jinja_buf_put(&b, p + i, n - i);
        return jinja_buf_val(&b);
    }
    while (count != 0) {
        const char *hit = memmem(p + i, n - i, old.u.s.p, old.u.s.n);
        if (!hit)
            break;
        size_t at = (size_t)(hit - p);
        jinja_buf_put(&b, p + i, at - i);
        jinja_buf_put(&b, new_.u.s.p, new_.u.s.n);
        i = at + old.u.s.n;
        count--;
    }
    jinja_buf_put(&b, p + i, n - i);
    return jinja_buf_val(&b);
}

static int ws_at(const char *p, size_t n, size_t i, size_t *next)
{
    size_t k = i;
    uint32_t c = jinja_utf8_next(p, n, &k);
    *next = k;
    return jinja_py_isspace(c);
}

jinja_val jinja_s_split(jinja_rt *rt, jinja_val s, jinja_val sep, int64_t maxsplit, int right)
{
    need_str(rt, s, "the string");
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, k;
    jinja_list *l = jinja_list_new(rt->a, 4);
    if (sep.t == JV_NONE || sep.t == JV_UNDEF) {
        if (!right) {
            size_t i = 0;
            for (;;) {
                while (i < n && ws_at(p, n, i, &k))
                    i = k;
                if (i >= n)
                    break;
                if (maxsplit == 0) {
                    jinja_list_push(rt->a, l, jinja_str(p + i, n - i));
                    break;
                }
                size_t j = i;
                while (j < n && !ws_at(p, n, j, &k))
                    j = k;
                jinja_list_push(rt->a, l, jinja_str(p + i, j - i));
                i = j;
                maxsplit--;
            }
        } else {
            size_t i = n;
            for (;;) {
                while (i > 0 && ws_at(p, n, prev_cp(p, i), &k))
                    i = prev_cp(p, i);
                if (i == 0)
                    break;
                if (maxsplit == 0) {
                    jinja_list_push(rt->a, l, jinja_str(p, i));
                    break;
                }
                size_t j = i;
                while (j > 0 && !ws_at(p, n, prev_cp(p, j), &k))
                    j = prev_cp(p, j);
                jinja_list_push(rt->a, l, jinja_str(p + j, i - j));
                i = j;
                maxsplit--;
            }
        }
    } else {
        need_str(rt, sep, "the separator");
        if (sep.u.s.n == 0)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "empty separator");
        const char *q = sep.u.s.p;
        size_t m = sep.u.s.n;
        if (!right) {
            size_t i = 0;
            while (maxsplit != 0) {
                const char *hit = memmem(p + i, n - i, q, m);
                if (!hit)
                    break;
                size_t at = (size_t)(hit - p);
                jinja_list_push(rt->a, l, jinja_str(p + i, at - i));
                i = at + m;
                maxsplit--;
            }
            jinja_list_push(rt->a, l, jinja_str(p + i, n - i));
        } else {
            size_t end = n;
            while (maxsplit != 0 && end >= m) {
                size_t at = end - m + 1, found = (size_t)-1;
                while (at-- > 0) {
                    if (memcmp(p + at, q, m) == 0) {
                        found = at;
                        break;
                    }
                }
                if (found == (size_t)-1)
                    break;
                jinja_list_push(rt->a, l, jinja_str(p + found + m, end - found - m));
                end = found;
                maxsplit--;
            }
            jinja_list_push(rt->a, l, jinja_str(p, end));
        }
    }
    if (right) {  /* collected from the right */
        for (size_t a = 0, b = l->n ? l->n - 1 : 0; a < b; a++, b--) {
            jinja_val t = l->v[a];
            l->v[a] = l->v[b];
            l->v[b] = t;
        }
    }
    return jinja_list_val(l, 0);
}

static int line_break(uint32_t c)
{
    return c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || c == 0x1c || c == 0x1d || c == 0x1e ||
           c == 0x85 || c == 0x2028 || c == 0x2029;
}

jinja_val jinja_s_splitlines(jinja_rt *rt, jinja_val s, int keepends)
{
    need_str(rt, s, "the string");
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0, start = 0;
    jinja_list *l = jinja_list_new(rt->a, 4);
    while (i < n) {
        size_t at = i;
        uint32_t c = jinja_utf8_next(p, n, &i);
        if (!line_break(c))
            continue;
        if (c == '\r' && i < n && p[i] == '\n')
            i++;
        jinja_list_push(rt->a, l, jinja_str(p + start, (keepends ? i : at) - start));
        start = i;
    }
    if (start < n)
        jinja_list_push(rt->a, l, jinja_str(p + start, n - start));
    return jinja_list_val(l, 0);
}

int64_t jinja_s_find(jinja_val s, jinja_val sub, int right)
{
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, m = sub.u.s.n;
    if (m > n)
        return -1;
    const char *hit = NULL;
    if (!right) {
        hit = m ? memmem(p, n, sub.u.s.p, m) : p;
    } else {
        for (size_t at = n - m + 1; at-- > 0;) {
            if (memcmp(p + at, sub.u.s.p, m) == 0) {
                hit = p + at;
                break;
            }
        }
    }
    return hit ? (int64_t)jinja_utf8_count(p, (size_t)(hit - p)) : -1;
}

int jinja_s_startswith(jinja_val s, jinja_val prefix, int end)
{
    if (prefix.t == JV_LIST) {
        for (size_t i = 0; i < prefix.u.l->n; i++)
            if (prefix.u.l->v[i].t == JV_STR && jinja_s_startswith(s, prefix.u.l->v[i], end))
                return 1;
        return 0;
    }
    size_t n = s.u.s.n, m = prefix.u.s.n;
    if (m > n)
        return 0;
    return memcmp(end ? s.u.s.p + n - m : s.u.s.p, prefix.u.s.p, m) == 0;
}

jinja_val jinja_s_slice(jinja_rt *rt, jinja_val s, int64_t lo, int64_t hi, int64_t st)
{
    const char *p = s.u.s.p;
    size_t n = s.u.s.n;
    int64_t len = st > 0 ? (hi > lo ? (hi - lo + st - 1) / st : 0) : (lo > hi ? (lo - hi - st - 1) / (-st) : 0);
    if (len <= 0)
        return jinja_str("", 0);
    /* byte offset of every code point (n + 1 entries) */
    size_t ncp = jinja_utf8_count(p, n);
    if (ncp == n) {  /* ASCII */
        if (st == 1)
            return jinja_str(p + lo, (size_t)(hi - lo));
        char *o = jinja_alloc(rt->a, (size_t)len);
        for (int64_t k = 0, i = lo; k < len; k++, i += st)
            o[k] = p[i];
        return jinja_str(o, (size_t)len);
    }
    size_t *off = jinja_alloc(rt->a, (ncp + 1) * sizeof *off);
    size_t i = 0, c = 0;
    while (i < n) {
        off[c++] = i;
        jinja_utf8_next(p, n, &i);
    }
    off[c] = n;
    if (st == 1)
        return jinja_str(p + off[lo], off[hi] - off[lo]);
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    for (int64_t k = 0, j = lo; k < len; k++, j += st)
        jinja_buf_put(&b, p + off[j], off[j + 1] - off[j]);
    return jinja_buf_val(&b);
}

jinja_val jinja_s_escape(jinja_rt *rt, jinja_val s)
{
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    for (size_t i = 0; i < s.u.s.n; i++) {
        char c = s.u.s.p[i];
        switch (c) {
        case '&': jinja_buf_puts(&b, "&amp;"); break;
        case '<': jinja_buf_puts(&b, "&lt;"); break;
        case '>': jinja_buf_puts(&b, "&gt;"); break;
        case '"': jinja_buf_puts(&b, "&#34;"); break;
        case '\'': jinja_buf_puts(&b, "&#39;"); break;
        default: jinja_buf_putc(&b, c);
        }
    }
    jinja_val v = jinja_buf_val(&b);
    v.flag = JVF_MARKUP;
    return v;
}

/* ---- "%" formatting ------------------------------------------------------------ */

static void pad_put(jinja_buf *b, const char *s, size_t n, int width, int left, char fill)
{
    int len = (int)jinja_utf8_count(s, n);
    if (!left)
        for (int k = len; k < width; k++)
            jinja_buf_putc(b, fill);
    jinja_buf_put(b, s, n);
    if (left)
        for (int k = len; k < width; k++)
            jinja_buf_putc(b, ' ');
}

/* Format one number conversion (d i u o x X e E f F g G) with C's printf,
 * whose output matches Python's for these flags. */
static void fmt_number(jinja_rt *rt, jinja_buf *b, jinja_val v, char conv, const char *flags, int width,
                       int prec)
{
    char spec[48], out[512];
    if (v.t == JV_UNDEF)
        jinja_rt_undef(rt, v);
    if (!jinja_is_num(v))
        jinja_rt_fail(rt, TANDEM_EFORMAT, "%%%c format: a real number is required, not %s", conv,
                      jinja_type_name(v));
    if (strchr("diuoxX", conv)) {
        if (v.t == JV_FLOAT && strchr("oxX", conv))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "%%%c format: an integer is required, not float", conv);
        double d = jinja_num(v);
        if (v.t == JV_FLOAT && !(fabs(d) < 9.2e18))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "%%%c format: number out of range", conv);
        long long x = v.t == JV_FLOAT ? (long long)d : (long long)v.u.i;
        char c = conv == 'i' || conv == 'u' ? 'd' : conv;
        if (prec >= 0)
            snprintf(spec, sizeof spec, "%%%s%d.%dll%c", flags, width, prec, c);
        else
            snprintf(spec, sizeof spec, "%%%s%dll%c", flags, width, c);
        if (c == 'o' && strchr(flags, '#')) {  /* Python writes 0o17, C writes 017 */
            char body[96];
            snprintf(body, sizeof body, "%llo", x < 0 ? (unsigned long long)-x : (unsigned long long)x);
            snprintf(out, sizeof out, "%s0o%s", x < 0 ? "-" : "", body);
            pad_put(b, out, strlen(out), width, strchr(flags, '-') != NULL, ' ');
            return;
        }
        if ((c == 'x' || c == 'X') && x < 0) {  /* C would print two's complement */
            char body[96];
            snprintf(body, sizeof body, c == 'x' ? "%llx" : "%llX", (unsigned long long)-x);
            snprintf(out, sizeof out, "-%s%s", strchr(flags, '#') ? (c == 'x' ? "0x" : "0X") : "", body);
            pad_put(b, out, strlen(out), width, strchr(flags, '-') != NULL, ' ');
            return;
        }
        snprintf(out, sizeof out, spec, x);
    } else {
        snprintf(spec, sizeof spec, "%%%s%d.%d%c", flags, width, prec < 0 ? 6 : prec, conv);
        snprintf(out, sizeof out, spec, jinja_num(v));
    }
    jinja_buf_puts(b, out);
}

jinja_val jinja_s_percent(jinja_rt *rt, jinja_val fmt, jinja_val args)
{
    const jinja_val *argv = &args;
    size_t argc = 1, used = 0;
    int mapping = args.t == JV_DICT;
    if (args.t == JV_LIST && (args.flag & JVF_TUPLE)) {
        argv = args.u.l->v;
        argc = args.u.l->n;
    }
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    const char *p = fmt.u.s.p;
    size_t n = fmt.u.s.n, i = 0;
    int used_mapping = 0;
    while (i < n) {
        const char *pc = memchr(p + i, '%', n - i);
        if (!pc) {
            jinja_buf_put(&b, p + i, n - i);
            break;
        }
        size_t at = (size_t)(pc - p);
        jinja_buf_put(&b, p + i, at - i);
        i = at + 1;
        jinja_val v = jinja_missing();
        if (i < n && p[i] == '(') {
            size_t end = i + 1;
            while (end < n && p[end] != ')')
                end++;
            if (end >= n)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "incomplete format key");
            if (!mapping)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "format requires a mapping");
            if (!jinja_dict_get_s(args.u.d, p + i + 1, end - i - 1, &v))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "format key '%.*s' not found", (int)(end - i - 1), p + i + 1);
            used_mapping = 1;
            i = end + 1;
        }
        char flags[8];
        int nf = 0;
        while (i < n && strchr("-+ #0", p[i]) && nf < 7)
            flags[nf++] = p[i++];
        flags[nf] = 0;
        int width = 0, prec = -1;
        while (i < n && p[i] >= '0' && p[i] <= '9' && width < 10000)
            width = width * 10 + (p[i++] - '0');
        if (i < n && p[i] == '.') {
            i++;
            prec = 0;
            while (i < n && p[i] >= '0' && p[i] <= '9' && prec < 10000)
                prec = prec * 10 + (p[i++] - '0');
        }
        while (i < n && (p[i] == 'l' || p[i] == 'h' || p[i] == 'L'))
            i++;
        if (i >= n)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "incomplete format");
        char conv = p[i++];
        if (conv == '%') {
            jinja_buf_putc(&b, '%');
            continue;
        }
        if (v.t == JV_UNDEF && v.owner == JU_MISSING) {
            if (mapping && argc == 1 && !used_mapping)
                v = args;
            else if (used >= argc)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "not enough arguments for format string");
            else
                v = argv[used++];
        }
        int left = strchr(flags, '-') != NULL;
        switch (conv) {
        case 's': case 'r': case 'a': {
            jinja_buf t;
            jinja_buf_init(&t, rt->a);
            if (conv == 's')
                jinja_str_of(&t, v);
            else
                jinja_repr_of(&t, v);
            size_t len = t.n;
            if (prec >= 0) {  /* precision counts code points */
                size_t k = 0;
                for (int c = 0; c < prec && k < t.n; c++)
                    jinja_utf8_next(t.p, t.n, &k);
                len = k;
            }
            pad_put(&b, t.p ? t.p : "", len, width, left, ' ');
            break;
        }
        case 'c': {
            jinja_buf t;
            jinja_buf_init(&t, rt->a);
            if (v.t == JV_INT && v.u.i >= 0 && v.u.i <= 0x10ffff && !(v.u.i >= 0xd800 && v.u.i <= 0xdfff))
                jinja_utf8_put(&t, (uint32_t)v.u.i);
            else if (v.t == JV_STR && jinja_utf8_count(v.u.s.p, v.u.s.n) == 1)
                jinja_buf_put(&t, v.u.s.p, v.u.s.n);
            else
                jinja_rt_fail(rt, TANDEM_EFORMAT, "%%c requires an int or a unicode character");
            pad_put(&b, t.p, t.n, width, left, ' ');
            break;
        }
        case 'd': case 'i': case 'u': case 'o': case 'x': case 'X':
        case 'e': case 'E': case 'f': case 'F': case 'g': case 'G':
            fmt_number(rt, &b, v, conv, flags, width, prec);
            break;
        default:
            jinja_rt_fail(rt, TANDEM_EFORMAT, "unsupported format character '%c'", conv);
        }
    }
    if (!mapping && used < argc)
        jinja_rt_fail(rt, TANDEM_EFORMAT, "not all arguments converted during string formatting");
    return jinja_buf_val(&b);
}

/* ---- str.format ---------------------------------------------------------------- */

/* A format spec of the form [[fill]align][0][width][.precision][type]. */
static void format_spec(jinja_rt *rt, jinja_buf *b, jinja_val v, const char *spec, size_t n)
{
    if (n == 0) {
        jinja_str_of(b, v);
        return;
    }
    size_t i = 0;
    char fill = ' ', align = 0;
    if (n >= 2 && strchr("<>^", spec[1])) {
        fill = spec[0];
        align = spec[1];
        i = 2;
    } else if (strchr("<>^", spec[0])) {
        align = spec[0];
        i = 1;
    }
    if (i < n && spec[i] == '0' && !align) {
        fill = '0';
        align = '>';
        i++;
    }
    int width = 0, prec = -1;
    while (i < n && spec[i] >= '0' && spec[i] <= '9' && width < 10000)
        width = width * 10 + (spec[i++] - '0');
    if (i < n && spec[i] == '.') {
        i++;
        prec = 0;
        while (i < n && spec[i] >= '0' && spec[i] <= '9' && prec < 10000)
            prec = prec * 10 + (spec[i++] - '0');
    }
    char type = i < n ? spec[i++] : 0;
    if (i != n || (type && !strchr("sdf", type)))
        jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "str.format spec '%.*s' is not supported yet", (int)n, spec);
    jinja_buf t;
    jinja_buf_init(&t, rt->a);
    if (type == 'd' || type == 'f' || (!type && jinja_is_num(v))) {
        if (!jinja_is_num(v))
            jinja_rt_fail(rt, TANDEM_EFORMAT, "unknown format code '%c' for object of type '%s'", type,
                          jinja_type_name(v));
        if (type == 'd' && v.t == JV_FLOAT)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "unknown format code 'd' for object of type 'float'");
        if (type)
            fmt_number(rt, &t, v, type, "", 0, prec);
        else
            jinja_str_of(&t, v);
        if (!align)
            align = '>';
    } else {
        jinja_str_of(&t, v);
        if (prec >= 0) {
            size_t k = 0;
            for (int c = 0; c < prec && k < t.n; c++)
                jinja_utf8_next(t.p, t.n, &k);
            t.n = k;
        }
        if (!align)
            align = '<';
    }
    int len = (int)jinja_utf8_count(t.p ? t.p : "", t.n), padn = width > len ? width - len : 0;
    int lpad = align == '>' ? padn : align == '^' ? padn / 2 : 0;
    for (int k = 0; k < lpad; k++)
        jinja_buf_putc(b, fill);
    jinja_buf_put(b, t.p, t.n);
    for (int k = lpad; k < padn; k++)
        jinja_buf_putc(b, fill);
}

jinja_val jinja_s_format(jinja_rt *rt, jinja_val fmt, const jinja_args *a)
{
    jinja_buf b;
    jinja_buf_init(&b, rt->a);
    const char *p = fmt.u.s.p;
    size_t n = fmt.u.s.n, i = 0;
    int auto_idx = 0;
    while (i < n) {
        char c = p[i];
        if (c == '}') {
            if (i + 1 < n && p[i + 1] == '}') {
                jinja_buf_putc(&b, '}');
                i += 2;
                continue;
            }
            jinja_rt_fail(rt, TANDEM_EFORMAT, "Single '}' encountered in format string");
        }
        if (c != '{') {
            jinja_buf_putc(&b, c);
            i++;
            continue;
        }
        if (i + 1 < n && p[i + 1] == '{') {
            jinja_buf_putc(&b, '{');
            i += 2;
            continue;
        }
        size_t end = i + 1;
        while (end < n && p[end] != '}' && p[end] != '{')
            end++;
        if (end >= n || p[end] != '}')
            jinja_rt_fail(rt, TANDEM_EFORMAT, "expected '}' before end of string");
        const char *f = p + i + 1;
        size_t fl = end - i - 1, nl = 0;
        while (nl < fl && f[nl] != '!' && f[nl] != ':')
            nl++;
        jinja_val v;
        if (memchr(f, '.', nl) || memchr(f, '[', nl))
            jinja_rt_fail(rt, TANDEM_EUNSUPPORTED, "str.format field '%.*s' is not supported yet", (int)nl, f);
        if (nl == 0 || (f[0] >= '0' && f[0] <= '9')) {
            int idx = 0;
            if (nl == 0) {
                idx = auto_idx++;
            } else {
                for (size_t k = 0; k < nl && idx < 100000; k++)
                    idx = idx * 10 + (f[k] - '0');
            }
            if (idx >= a->n)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "Replacement index %d out of range for positional args tuple", idx);
            v = a->v[idx];
        } else {
            int k;
            for (k = 0; k < a->nkw; k++)
                if (strlen(a->kwn[k]) == nl && !memcmp(a->kwn[k], f, nl))
                    break;
            if (k == a->nkw)
                jinja_rt_fail(rt, TANDEM_EFORMAT, "KeyError: '%.*s'", (int)nl, f);
            v = a->kwv[k];
        }
        size_t j = nl;
        if (j < fl && f[j] == '!') {
            if (j + 1 >= fl || (f[j + 1] != 'r' && f[j + 1] != 's' && f[j + 1] != 'a'))
                jinja_rt_fail(rt, TANDEM_EFORMAT, "unknown conversion specifier in a format string");
            if (f[j + 1] != 's') {
                jinja_buf t;
                jinja_buf_init(&t, rt->a);
                jinja_repr_of(&t, v);
                v = jinja_buf_val(&t);
            } else {
                v = jinja_to_str(rt, v);
            }
            j += 2;
        }
        if (j < fl && f[j] == ':')
            j++;
        else if (j < fl)
            jinja_rt_fail(rt, TANDEM_EFORMAT, "expected ':' after conversion specifier");
        format_spec(rt, &b, v, f + j, fl - j);
        i = end + 1;
    }
    return jinja_buf_val(&b);
}
