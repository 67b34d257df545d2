/*
 * textout.c - what the server does with generated text before a client sees
 * it: buffers (srv_buf, srv_out), the reasoning / content split and stop
 * strings (srv_text), and UTF-8 cleaning.
 *
 * srv_text is a small state machine over the detokenized stream:
 *   DETECT  at the start of a reasoning model's reply: "<think>" after
 *           optional whitespace enters INSIDE, anything else is content;
 *   INSIDE  text goes to reasoning until "</think>"; whitespace right after
 *           it is dropped;
 *   OFF     text is content, cut at the first stop string.
 * Invariant: `pend` holds only text that could still be the start of the tag
 * or stop string being looked for; everything before it has been emitted.
 * Because a held suffix always equals the beginning of a valid UTF-8 pattern,
 * emitted pieces never split a character.
 */
#include "server.h"

#include <stdlib.h>
#include <string.h>

/* ---- buffers -------------------------------------------------------------- */

int srv_buf_put(srv_buf *b, const void *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

int srv_buf_puts(srv_buf *b, const char *s) { return srv_buf_put(b, s, strlen(s)); }

void srv_buf_free(srv_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

static int grow(void **p, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return 0;
    int c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = c;
    return 0;
}

int srv_out_move(srv_out *dst, srv_out *src)
{
    uint32_t base = (uint32_t)dst->lptext.n;
    int top_base = dst->n_top;
    if (srv_buf_put(&dst->content, src->content.p, src->content.n) ||
        srv_buf_put(&dst->reasoning, src->reasoning.p, src->reasoning.n) ||
        srv_buf_put(&dst->lptext, src->lptext.p, src->lptext.n) ||
        grow((void **)&dst->lp, &dst->cap_lp, dst->n_lp + src->n_lp, sizeof *dst->lp) ||
        grow((void **)&dst->top, &dst->cap_top, dst->n_top + src->n_top, sizeof *dst->top))
        return -1;
    for (int i = 0; i < src->n_lp; i++) {
        srv_lp l = src->lp[i];
        l.off += base;
        l.top0 += top_base;
        dst->lp[dst->n_lp++] = l;
    }
    for (int i = 0; i < src->n_top; i++) {
        srv_tlp t = src->top[i];
        t.off += base;
        dst->top[dst->n_top++] = t;
    }
    srv_out_clear(src);
    return 0;
}

void srv_out_clear(srv_out *o)
{
    o->content.n = o->reasoning.n = o->lptext.n = 0;
    o->n_lp = o->n_top = 0;
}

void srv_out_free(srv_out *o)
{
    srv_buf_free(&o->content);
    srv_buf_free(&o->reasoning);
    srv_buf_free(&o->lptext);
    free(o->lp);
    free(o->top);
    memset(o, 0, sizeof *o);
}

/* ---- reasoning / content / stop strings ----------------------------------- */

static const char THINK_OPEN[] = "<think>", THINK_CLOSE[] = "</think>";

void srv_text_init(srv_text *t, int think, const char *const *stops, int n_stops)
{
    memset(t, 0, sizeof *t);
    t->think = think;
    t->stops = stops;
    t->n_stops = n_stops;
}

void srv_text_free(srv_text *t) { srv_buf_free(&t->pend); }

/* Longest k < strlen(pat) such that the last k bytes of p[0..n) are the
 * first k bytes of pat: how much must be held back. */
static size_t held_suffix(const char *p, size_t n, const char *pat)
{
    size_t m = strlen(pat);
    for (size_t k = m - 1 < n ? m - 1 : n; k > 0; k--)
        if (!memcmp(p + n - k, pat, k))
            return k;
    return 0;
}

static void consume(srv_buf *b, size_t k)
{
    memmove(b->p, b->p + k, b->n - k);
    b->n -= k;
    b->p[b->n] = 0;
}

static int is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

/* Emit what can be decided; final: nothing more will come. */
static int drain(srv_text *t, srv_buf *content, srv_buf *reasoning, int final)
{
    for (;;) {
        const char *p = t->pend.p;
        size_t n = t->pend.n;
        if (n == 0)
            return 0;
        if (t->think == SRV_THINK_DETECT) {
            size_t i = 0, L = sizeof THINK_OPEN - 1;
            while (i < n && is_space(p[i]))
                i++;
            if (n - i >= L && !memcmp(p + i, THINK_OPEN, L)) {
                consume(&t->pend, i + L);
                t->think = SRV_THINK_INSIDE;
                continue;
            }
            if (!final && n - i < L && !memcmp(p + i, THINK_OPEN, n - i))
                return 0; /* still could be "<think>" */
            t->think = SRV_THINK_OFF;
            continue;
        }
        if (t->think == SRV_THINK_INSIDE) {
            const char *e = memmem(p, n, THINK_CLOSE, sizeof THINK_CLOSE - 1);
            if (e) {
                if (srv_buf_put(reasoning, p, (size_t)(e - p)))
                    return -1;
                consume(&t->pend, (size_t)(e - p) + sizeof THINK_CLOSE - 1);
                t->think = SRV_THINK_OFF;
                t->strip_lead = 1;
                continue;
            }
            size_t keep = final ? 0 : held_suffix(p, n, THINK_CLOSE);
            if (srv_buf_put(reasoning, p, n - keep))
                return -1;
            consume(&t->pend, n - keep);
            return 0;
        }
        if (t->strip_lead) {
            size_t i = 0;
            while (i < n && is_space(p[i]))
                i++;
            consume(&t->pend, i);
            if (t->pend.n == 0)
                return 0;
            t->strip_lead = 0;
            continue;
        }
        /* content: the earliest stop string wins */
        const char *hit = NULL;
        for (int s = 0; s < t->n_stops; s++) {
            const char *h = memmem(p, n, t->stops[s], strlen(t->stops[s]));
            if (h && (!hit || h < hit))
                hit = h;
        }
        if (hit) {
            if (srv_buf_put(content, p, (size_t)(hit - p)))
                return -1;
            t->pend.n = 0;
            t->stops = NULL;
            t->n_stops = -1; /* stopped */
            return 1;
        }
        size_t keep = 0;
        for (int s = 0; !final && s < t->n_stops; s++) {
            size_t k = held_suffix(p, n, t->stops[s]);
            keep = k > keep ? k : keep;
        }
        if (srv_buf_put(content, p, n - keep))
            return -1;
        consume(&t->pend, n - keep);
        return 0;
    }
}

int srv_text_push(srv_text *t, const char *s, size_t n, srv_buf *content, srv_buf *reasoning)
{
    if (t->n_stops < 0)
        return 1;
    if (srv_buf_put(&t->pend, s, n))
        return -1;
    return drain(t, content, reasoning, 0);
}

int srv_text_finish(srv_text *t, srv_buf *content, srv_buf *reasoning)
{
    if (t->n_stops < 0)
        return 1;
    return drain(t, content, reasoning, 1);
}

/* ---- UTF-8 ---------------------------------------------------------------- */

/* Length of the valid UTF-8 character at s[0..n), or 0 when invalid
 * (overlong forms, surrogates and values past U+10FFFF are invalid). */
static size_t utf8_char(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0)
        len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        len = 4, cp = c & 0x07, min = 0x10000;
    else
        return 0;
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

int srv_utf8_clean(const char *s, size_t n, srv_buf *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_char(u + i, n - i);
        if (k && u[i] != 0) {
            if (srv_buf_put(out, s + i, k))
                return -1;
            i += k;
        } else {
            if (srv_buf_put(out, "\xEF\xBF\xBD", 3))
                return -1;
            i++;
        }
    }
    return 0;
}
