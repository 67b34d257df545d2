/*
 * jinja_lex.c - the template lexer: source text to tokens.
 *
 * It reproduces jinja2's Lexer as transformers configures it (trim_blocks,
 * lstrip_blocks, default delimiters, keep_trailing_newline False):
 *   - newlines are normalised to "\n" and one trailing newline is dropped;
 *   - "{%-"/"{{-"/"{#-" strip all whitespace before the tag, "-%}"/"-}}"/"-#}"
 *     all whitespace after it;
 *   - lstrip_blocks removes spaces and tabs between a line start and "{%" or
 *     "{#" (not "{{"), unless the tag opens with "+";
 *   - trim_blocks removes the first newline after "%}" and "#}" (not after
 *     "-%}" which strips anyway, nor after "+%}");
 *   - "{% raw %}...{% endraw %}" is data, and a tag only ends when its
 *     brackets are balanced ("{{ {'a': {'b': 1}} }}").
 * Whitespace means Python's str.isspace(), as in jinja2's regular expressions.
 * String literals are decoded as Python's unicode_escape does.
 */
#include "tokenizer/jinja_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

typedef struct lexer {
    jinja_arena *a;
    const char *s;    /* normalised source */
    size_t n, pos;
    int line;
    int line_starting;
    jinja_tok *toks;
    size_t ntoks, cap;
    char bal[256];    /* open brackets inside the current tag */
    int nbal;
} lexer;

static _Noreturn void lex_fail(lexer *L, const char *fmt, const char *arg)
{
    jinja_fail(L->a->e, TANDEM_EFORMAT, L->line, fmt, arg);
}

static jinja_tok *push(lexer *L, int type, int line)
{
    if (L->ntoks == L->cap) {
        size_t cap = L->cap ? L->cap * 2 : 256;
        jinja_tok *t = jinja_alloc(L->a, cap * sizeof *t);
        if (L->ntoks)
            memcpy(t, L->toks, L->ntoks * sizeof *t);
        L->toks = t;
        L->cap = cap;
    }
    jinja_tok *t = &L->toks[L->ntoks++];
    memset(t, 0, sizeof *t);
    t->type = (uint8_t)type;
    t->line = line;
    return t;
}

static int count_nl(const char *p, size_t n)
{
    int c = 0;
    for (size_t i = 0; i < n; i++)
        c += p[i] == '\n';
    return c;
}

/* Length of the whitespace run at s[i..n). */
static size_t ws_run(const char *s, size_t n, size_t i)
{
    size_t j = i;
    while (j < n) {
        size_t k = j;
        uint32_t c = jinja_utf8_next(s, n, &k);
        if (!jinja_py_isspace(c))
            break;
        j = k;
    }
    return j - i;
}

/* Byte length of text[0..n) after Python's rstrip(). */
static size_t rstrip_len(const char *s, size_t n)
{
    size_t end = n;
    while (end > 0) {
        size_t start = end - 1;
        while (start > 0 && ((unsigned char)s[start] & 0xc0) == 0x80)
            start--;
        size_t k = start;
        uint32_t c = jinja_utf8_next(s, n, &k);
        if (!jinja_py_isspace(c))
            break;
        end = start;
    }
    return end;
}

/* Emit the data before a tag, applying "-" stripping or lstrip_blocks. */
static void emit_text(lexer *L, size_t from, size_t to, char sign, int lstrip_ok)
{
    const char *text = L->s + from;
    size_t len = to - from, keep = len;
    if (sign == '-') {
        keep = rstrip_len(text, len);
    } else if (sign != '+' && lstrip_ok) {
        size_t l_pos = len;
        while (l_pos > 0 && text[l_pos - 1] != '\n')
            l_pos--;
        if ((l_pos > 0 || L->line_starting) && l_pos < len && ws_run(text, len, l_pos) == len - l_pos)
            keep = l_pos;
    }
    if (keep) {
        jinja_tok *t = push(L, JT_DATA, L->line);
        t->p = text;
        t->n = keep;
    }
    L->line += count_nl(text, len);
}

/* After "-%}", "-}}" or "-#}": swallow whitespace. */
static void eat_ws_after(lexer *L)
{
    size_t w = ws_run(L->s, L->n, L->pos);
    L->line += count_nl(L->s + L->pos, w);
    L->pos += w;
    L->line_starting = w > 0 && L->s[L->pos - 1] == '\n';
}

static int at(const lexer *L, size_t i, const char *lit)
{
    size_t k = strlen(lit);
    return i + k <= L->n && memcmp(L->s + i, lit, k) == 0;
}

/* ---- literals ---------------------------------------------------------------- */

static int isdig(char c) { return c >= '0' && c <= '9'; }

/* (\d+_)*\d+ at i: end index, or 0 when no digit at i. */
static size_t digits(const lexer *L, size_t i)
{
    if (i >= L->n || !isdig(L->s[i]))
        return 0;
    size_t j = i;
    while (j < L->n && isdig(L->s[j]))
        j++;
    while (j + 1 < L->n && L->s[j] == '_' && isdig(L->s[j + 1])) {
        j++;
        while (j < L->n && isdig(L->s[j]))
            j++;
    }
    return j;
}

static size_t match_float(const lexer *L, size_t i)
{
    if (i > 0 && L->s[i - 1] == '.')
        return 0;
    size_t e = digits(L, i);
    if (!e)
        return 0;
    size_t frac = 0, ex = 0;
    if (e < L->n && L->s[e] == '.')
        frac = digits(L, e + 1);
    size_t after = frac ? frac : e;
    if (after < L->n && (L->s[after] == 'e' || L->s[after] == 'E')) {
        size_t k = after + 1;
        if (k < L->n && (L->s[k] == '+' || L->s[k] == '-'))
            k++;
        ex = digits(L, k);
    }
    if (ex)
        return ex;
    return frac;
}

static int digit_in_base(char c, int base)
{
    int v = isdig(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : 99;
    return v < base;
}

static size_t match_int(const lexer *L, size_t i, int *base)
{
    const char *s = L->s;
    if (i >= L->n || !isdig(s[i]))
        return 0;
    if (s[i] == '0' && i + 1 < L->n) {
        char c = s[i + 1] | 0x20;
        int b = c == 'b' ? 2 : c == 'o' ? 8 : c == 'x' ? 16 : 0;
        if (b) {
            size_t j = i + 2, last = 0;
            for (;;) {
                size_t k = j;
                if (k < L->n && s[k] == '_')
                    k++;
                if (k < L->n && digit_in_base(s[k], b)) {
                    j = k + 1;
                    last = j;
                } else {
                    break;
                }
            }
            if (last) {
                *base = b;
                return last;
            }
        }
    }
    *base = 10;
    size_t j = i + 1;
    int zero = s[i] == '0';
    for (;;) {
        size_t k = j;
        if (k < L->n && s[k] == '_')
            k++;
        if (k < L->n && (zero ? s[k] == '0' : isdig(s[k])))
            j = k + 1;
        else
            break;
    }
    return j;
}

static int ident_cp(uint32_t c, int first)
{
    if (c < 0x80)
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (!first && c >= '0' && c <= '9');
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
        return 1;
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
        return !first;
    default:
        return 0;
    }
}

static size_t match_name(const lexer *L, size_t i)
{
    size_t j = i;
    while (j < L->n) {
        size_t k = j;
        uint32_t c = jinja_utf8_next(L->s, L->n, &k);
        if (!ident_cp(c, j == i))
            break;
        j = k;
    }
    return j;
}

static int hexval(char c)
{
    return isdig(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
}

/* Decode the body of a string literal as Python's unicode_escape does. */
static void decode_string(lexer *L, jinja_tok *t, const char *p, size_t n)
{
    jinja_buf b;
    jinja_buf_init(&b, L->a);
    size_t i = 0;
    while (i < n) {
        char c = p[i];
        if (c != '\\' || i + 1 >= n) {
            size_t j = i;
            while (j < n && p[j] != '\\')
                j++;
            if (j == i)
                j = i + 1;
            jinja_buf_put(&b, p + i, j - i);
            i = j;
            continue;
        }
        char e = p[i + 1];
        i += 2;
        uint32_t cp = 0;
        int hex = 0;
        switch (e) {
        case '\n': continue;  /* line continuation */
        case '\\': jinja_buf_putc(&b, '\\'); continue;
        case '\'': jinja_buf_putc(&b, '\''); continue;
        case '"': jinja_buf_putc(&b, '"'); continue;
        case 'a': jinja_buf_putc(&b, '\a'); continue;
        case 'b': jinja_buf_putc(&b, '\b'); continue;
        case 'f': jinja_buf_putc(&b, '\f'); continue;
        case 'n': jinja_buf_putc(&b, '\n'); continue;
        case 'r': jinja_buf_putc(&b, '\r'); continue;
        case 't': jinja_buf_putc(&b, '\t'); continue;
        case 'v': jinja_buf_putc(&b, '\v'); continue;
        case 'x': hex = 2; break;
        case 'u': hex = 4; break;
        case 'U': hex = 8; break;
        case 'N': lex_fail(L, "string escape \\N{...} is not supported yet%s", "");
        default:
            if (e >= '0' && e <= '7') {
                cp = (uint32_t)(e - '0');
                for (int k = 0; k < 2 && i < n && p[i] >= '0' && p[i] <= '7'; k++)
                    cp = cp * 8 + (uint32_t)(p[i++] - '0');
                jinja_utf8_put(&b, cp);
                continue;
            }
            /* unknown escape: kept as written */
            jinja_buf_putc(&b, '\\');
            i--;
            continue;
        }
        for (int k = 0; k < hex; k++) {
            int v = i < n ? hexval(p[i]) : -1;
            if (v < 0)
                lex_fail(L, "truncated \\%s escape in a string literal", e == 'x' ? "xXX" : e == 'u' ? "uXXXX" : "UXXXXXXXX");
            cp = cp * 16 + (uint32_t)v;
            i++;
        }
        if (cp > 0x10ffff)
            lex_fail(L, "illegal Unicode character in a string literal%s", "");
        if (cp >= 0xd800 && cp <= 0xdfff)
            lex_fail(L, "surrogate escapes in string literals are not supported yet%s", "");
        jinja_utf8_put(&b, cp);
    }
    jinja_buf_putc(&b, 0);
    t->p = b.p;
    t->n = b.n - 1;
}

static const struct { const char *s; int op; } OPS[] = {
    {"//", JP_FLOORDIV}, {"**", JP_POW}, {"==", JP_EQ}, {"!=", JP_NE}, {">=", JP_GTEQ}, {"<=", JP_LTEQ},
    {"+", JP_ADD}, {"-", JP_SUB}, {"/", JP_DIV}, {"*", JP_MUL}, {"%", JP_MOD}, {"~", JP_TILDE},
    {"[", JP_LBRACKET}, {"]", JP_RBRACKET}, {"(", JP_LPAREN}, {")", JP_RPAREN}, {"{", JP_LBRACE},
    {"}", JP_RBRACE}, {">", JP_GT}, {"<", JP_LT}, {"=", JP_ASSIGN}, {".", JP_DOT}, {":", JP_COLON},
    {"|", JP_PIPE}, {",", JP_COMMA}, {";", JP_SEMICOLON},
};

/* Tokens inside a tag until its end ("}}" or "%}" at bracket balance 0). */
static void lex_tag(lexer *L, int block, int open_line)
{
    L->nbal = 0;
    for (;;) {
        if (L->pos >= L->n) {
            L->line = open_line;
            lex_fail(L, "unexpected end of template: the tag is never closed with '%s'", block ? "%}" : "}}");
        }
        const char *s = L->s;
        size_t i = L->pos;
        if (L->nbal == 0) {
            if (block) {
                if (at(L, i, "+%}")) {
                    push(L, JT_BLOCK_END, L->line);
                    L->pos = i + 3;
                    L->line_starting = 0;
                    return;
                }
                if (at(L, i, "-%}")) {
                    push(L, JT_BLOCK_END, L->line);
                    L->pos = i + 3;
                    eat_ws_after(L);
                    return;
                }
                if (at(L, i, "%}")) {
                    push(L, JT_BLOCK_END, L->line);
                    L->pos = i + 2;
                    L->line_starting = 0;
                    if (L->pos < L->n && s[L->pos] == '\n') {  /* trim_blocks */
                        L->pos++;
                        L->line++;
                        L->line_starting = 1;
                    }
                    return;
                }
            } else {
                if (at(L, i, "-}}")) {
                    push(L, JT_VAR_END, L->line);
                    L->pos = i + 3;
                    eat_ws_after(L);
                    return;
                }
                if (at(L, i, "}}")) {
                    push(L, JT_VAR_END, L->line);
                    L->pos = i + 2;
                    L->line_starting = 0;
                    return;
                }
            }
        }
        size_t w = ws_run(s, L->n, i);
        if (w) {
            L->line += count_nl(s + i, w);
            L->pos = i + w;
            continue;
        }
        size_t e;
        int base;
        if ((e = match_float(L, i)) != 0) {
            char tmp[128];
            size_t k = 0;
            for (size_t j = i; j < e && k < sizeof tmp - 1; j++)
                if (s[j] != '_')
                    tmp[k++] = s[j];
            tmp[k] = 0;
            jinja_tok *t = push(L, JT_FLOAT, L->line);
            t->f = strtod(tmp, NULL);
            L->pos = e;
            continue;
        }
        if ((e = match_int(L, i, &base)) != 0) {
            char tmp[128];
            size_t k = 0, j = i + (base != 10 ? 2 : 0);
            for (; j < e && k < sizeof tmp - 1; j++)
                if (s[j] != '_')
                    tmp[k++] = s[j];
            tmp[k] = 0;
            errno = 0;
            unsigned long long v = strtoull(tmp, NULL, base);
            if (errno || v > (unsigned long long)INT64_MAX || e - i > 100)
                lex_fail(L, "integer literal %s is too large", "");
            jinja_tok *t = push(L, JT_INT, L->line);
            t->i = (int64_t)v;
            L->pos = e;
            continue;
        }
        if ((e = match_name(L, i)) != i) {
            jinja_tok *t = push(L, JT_NAME, L->line);
            t->p = jinja_strndup(L->a, s + i, e - i);
            t->n = e - i;
            L->pos = e;
            continue;
        }
        if (s[i] == '\'' || s[i] == '"') {
            char q = s[i];
            size_t j = i + 1;
            while (j < L->n && s[j] != q)
                j += s[j] == '\\' ? 2 : 1;
            if (j >= L->n)
                lex_fail(L, "unterminated string literal%s", "");
            jinja_tok *t = push(L, JT_STRING, L->line);
            decode_string(L, t, s + i + 1, j - i - 1);
            L->line += count_nl(s + i, j - i);
            L->pos = j + 1;
            continue;
        }
        int found = -1;
        size_t oplen = 0;
        for (size_t k = 0; k < sizeof OPS / sizeof OPS[0]; k++) {
            if (at(L, i, OPS[k].s)) {
                found = OPS[k].op;
                oplen = strlen(OPS[k].s);
                break;
            }
        }
        if (found < 0) {
            char c[8] = {0};
            size_t k = i;
            jinja_utf8_next(s, L->n, &k);
            memcpy(c, s + i, k - i < 7 ? k - i : 7);
            lex_fail(L, "unexpected character '%s'", c);
        }
        if (found == JP_LBRACE || found == JP_LPAREN || found == JP_LBRACKET) {
            if (L->nbal == (int)sizeof L->bal)
                lex_fail(L, "brackets nested too deeply%s", "");
            L->bal[L->nbal++] = found == JP_LBRACE ? '}' : found == JP_LPAREN ? ')' : ']';
        } else if (found == JP_RBRACE || found == JP_RPAREN || found == JP_RBRACKET) {
            char c = s[i];
            if (L->nbal == 0) {
                char m[4] = {c, 0};
                lex_fail(L, "unexpected '%s'", m);
            }
            char want = L->bal[--L->nbal];
            if (want != c) {
                char m[32];
                snprintf(m, sizeof m, "'%c', expected '%c'", c, want);
                lex_fail(L, "unexpected %s", m);
            }
        }
        jinja_tok *t = push(L, JT_OP, L->line);
        t->op = (uint8_t)found;
        L->pos = i + oplen;
    }
}

/* "{%(-|+|)\s*raw\s*(-%}\s*|%})" at i: end of the match or 0. */
static size_t match_raw(const lexer *L, size_t i, const char *word, char *sign)
{
    size_t j = i + 2;
    *sign = 0;
    if (j < L->n && (L->s[j] == '-' || L->s[j] == '+'))
        *sign = L->s[j++];
    j += ws_run(L->s, L->n, j);
    size_t wl = strlen(word);
    if (!at(L, j, word))
        return 0;
    j += wl;
    j += ws_run(L->s, L->n, j);
    if (at(L, j, "-%}"))
        return j + 3;
    if (at(L, j, "+%}") && strcmp(word, "endraw") == 0)
        return j + 3;
    if (at(L, j, "%}"))
        return j + 2;
    return 0;
}

static void lex_raw(lexer *L, size_t end_of_begin)
{
    int open_line = L->line;
    L->line += count_nl(L->s + L->pos, end_of_begin - L->pos);
    L->pos = end_of_begin;
    if (L->s[end_of_begin - 3] == '-')
        eat_ws_after(L);
    else
        L->line_starting = 0;
    for (size_t i = L->pos; i + 1 < L->n; i++) {
        if (L->s[i] != '{' || L->s[i + 1] != '%')
            continue;
        char sign;
        size_t e = match_raw(L, i, "endraw", &sign);
        if (!e)
            continue;
        emit_text(L, L->pos, i, sign, 1);
        L->line += count_nl(L->s + i, e - i);
        L->pos = e;
        L->line_starting = 0;
        if (L->s[e - 3] == '-' && L->s[e - 1] == '}' && L->s[e - 2] == '%') {
            eat_ws_after(L);
        } else if (L->s[e - 3] != '+' && L->pos < L->n && L->s[L->pos] == '\n') {
            L->pos++;
            L->line++;
            L->line_starting = 1;
        }
        return;
    }
    L->line = open_line;
    lex_fail(L, "missing end of raw directive%s", "");
}

void jinja_lex(jinja_arena *a, const char *src, size_t len, jinja_tok **toks, size_t *ntoks)
{
    lexer L;
    memset(&L, 0, sizeof L);
    L.a = a;
    L.line = 1;
    L.line_starting = 1;
    if (!jinja_utf8_valid(src, len))
        jinja_fail(a->e, TANDEM_EFORMAT, 0, "the template is not valid UTF-8");

    /* Normalise newlines; drop one trailing newline (keep_trailing_newline). */
    char *s = jinja_alloc(a, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n && s[n - 1] == '\n')
        n--;
    s[n] = 0;
    L.s = s;
    L.n = n;

    for (;;) {
        size_t i = L.pos;
        size_t tag = n;
        while (i + 1 < n) {
            const char *q = memchr(s + i, '{', n - 1 - i);
            if (!q)
                break;
            size_t k = (size_t)(q - s);
            if (s[k + 1] == '{' || s[k + 1] == '%' || s[k + 1] == '#') {
                tag = k;
                break;
            }
            i = k + 1;
        }
        if (tag >= n) {
            if (L.pos < n) {
                jinja_tok *t = push(&L, JT_DATA, L.line);
                t->p = s + L.pos;
                t->n = n - L.pos;
            }
            break;
        }
        char kind = s[tag + 1];
        char sign = 0;
        if (tag + 2 < n && (s[tag + 2] == '-' || s[tag + 2] == '+'))
            sign = s[tag + 2];
        if (kind == '%') {
            char rsign;
            size_t e = match_raw(&L, tag, "raw", &rsign);
            if (e) {
                emit_text(&L, L.pos, tag, rsign, 1);
                L.pos = tag;
                lex_raw(&L, e);
                continue;
            }
        }
        emit_text(&L, L.pos, tag, sign, kind != '{');
        L.pos = tag + 2 + (sign ? 1 : 0);
        int open_line = L.line;
        if (kind == '#') {
            size_t j = L.pos;
            const char *end = NULL;
            while (j + 1 < n) {
                const char *q = memchr(s + j, '#', n - 1 - j);
                if (!q)
                    break;
                if (q[1] == '}') {
                    end = q;
                    break;
                }
                j = (size_t)(q - s) + 1;
            }
            if (!end) {
                L.line = open_line;
                lex_fail(&L, "missing end of comment tag%s", "");
            }
            size_t e = (size_t)(end - s);
            char csign = e > L.pos ? s[e - 1] : 0;
            L.line += count_nl(s + L.pos, e + 2 - L.pos);
            L.pos = e + 2;
            L.line_starting = 0;
            if (csign == '-') {
                eat_ws_after(&L);
            } else if (csign != '+' && L.pos < n && s[L.pos] == '\n') {
                L.pos++;
                L.line++;
                L.line_starting = 1;
            }
            continue;
        }
        push(&L, kind == '{' ? JT_VAR_BEGIN : JT_BLOCK_BEGIN, L.line);
        lex_tag(&L, kind == '%', open_line);
    }
    push(&L, JT_EOF, L.line);
    *toks = L.toks;
    *ntoks = L.ntoks;
}
