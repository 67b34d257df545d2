/*
 * bpe_decode.c - ids -> text (Tokenizer::decode of `tokenizers`) and the streaming decoder.
 *
 * Decoding filters the ids (unknown ids dropped, special tokens dropped when asked), turns them
 * into token strings, runs the decoder steps over the list of strings and joins the result. With
 * no decoder the strings are joined with " ", as tokenizers does.
 *
 * The streaming decoder keeps a small window of ids: the tokens it last emitted (context, so
 * decoders that treat the first token or a byte run specially see the same neighbours as in a
 * whole-sequence decode) plus the tokens not yet emitted. Each push decodes the window and emits
 * what goes beyond the decoded context, unless the text may still change: a character whose
 * bytes are incomplete (byte-level) or an open run of <0xXX> tokens (ByteFallback).
 */
#include <limits.h>

#include "tandem.h"
#include "tokenizer/bpe_impl.h"
#include "tokenizer/utf8.h"

/* ---- token lists --------------------------------------------------------- */

typedef struct {
    bpe_buf buf;     /* token bytes */
    size_t *off, *len;
    size_t n, cap;
} toks;

static int toks_add(toks *l, const char *s, size_t n)
{
    if (l->n == l->cap) {
        size_t c = l->cap ? l->cap * 2 : 32;
        size_t *o = realloc(l->off, c * sizeof *o);
        if (!o)
            return -1;
        l->off = o;
        size_t *m = realloc(l->len, c * sizeof *m);
        if (!m)
            return -1;
        l->len = m;
        l->cap = c;
    }
    l->off[l->n] = l->buf.n;
    l->len[l->n] = n;
    if (bpe_buf_put(&l->buf, s, n))
        return -1;
    l->n++;
    return 0;
}

/* append to the last token of l (which must exist) */
static int toks_extend(toks *l, const char *s, size_t n)
{
    l->len[l->n - 1] += n;
    return bpe_buf_put(&l->buf, s, n);
}

static void toks_clear(toks *l)
{
    l->n = 0;
    l->buf.n = 0;
}

static void toks_free(toks *l)
{
    bpe_buf_free(&l->buf);
    free(l->off);
    free(l->len);
}

#define TOK(l, i) ((l)->buf.p + (l)->off[i])

/* ---- decoder steps ------------------------------------------------------- */

static int is_byte_token(const char *s, size_t n, uint8_t *byte)
{
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>')
        return 0;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return 0;
        v = v * 16 + d;
    }
    *byte = (uint8_t)v;
    return 1;
}

/* Bytes a byte-level token stands for; a token with a character outside the alphabet (an added
 * token such as "<｜User｜>") stands for its own UTF-8 bytes. */
static int bytelevel_bytes(const char *s, size_t n, bpe_buf *out)
{
    size_t base = out->n, adv;
    for (size_t i = 0; i < n; i += adv) {
        int32_t c = utf8_decode(s + i, n - i, &adv);
        int b = c < 0 ? -1 : bpe_cp_to_byte((uint32_t)c);
        if (b < 0) {
            out->n = base;
            return bpe_buf_put(out, s, n);
        }
        uint8_t u = (uint8_t)b;
        if (bpe_buf_put(out, &u, 1))
            return -1;
    }
    return 0;
}

static int step_bytelevel(toks *in, toks *out, bpe_buf *tmp)
{
    tmp->n = 0;
    for (size_t i = 0; i < in->n; i++)
        if (bytelevel_bytes(TOK(in, i), in->len[i], tmp))
            return -1;
    if (bpe_buf_reserve(tmp, tmp->n * 3 + 1))
        return -1;
    /* from_utf8_lossy over the concatenation, written after the raw bytes */
    char *fixed = tmp->p + tmp->n;
    size_t n = utf8_repair(tmp->p, tmp->n, fixed);
    return toks_add(out, fixed, n);
}

static int step_bytefallback(toks *in, toks *out, bpe_buf *run)
{
    run->n = 0;
    for (size_t i = 0; i <= in->n; i++) {
        uint8_t b;
        if (i < in->n && is_byte_token(TOK(in, i), in->len[i], &b)) {
            if (bpe_buf_put(run, &b, 1))
                return -1;
            continue;
        }
        if (run->n) { /* a run ends: valid UTF-8 as one string, else one U+FFFD per byte */
            if (utf8_valid_prefix(run->p, run->n) == run->n) {
                if (toks_add(out, run->p, run->n))
                    return -1;
            } else {
                for (size_t k = 0; k < run->n; k++)
                    if (toks_add(out, "\xef\xbf\xbd", 3))
                        return -1;
            }
            run->n = 0;
        }
        if (i < in->n && toks_add(out, TOK(in, i), in->len[i]))
            return -1;
    }
    return 0;
}

static int step_replace(const bpe_dec *d, toks *in, toks *out)
{
    bpe_span *sp = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (size_t i = 0; i < in->n && !rc; i++) {
        const char *s = TOK(in, i);
        size_t len = in->len[i], prev = 0;
        n = 0;
        if ((rc = bpe_pattern_find(&d->pat, s, len, &sp, &n, &cap)))
            break;
        if (toks_add(out, "", 0)) {
            rc = -1;
            break;
        }
        for (size_t k = 0; k < n && !rc; k++) {
            s = TOK(in, i); /* stable: `in` is not written */
            if (toks_extend(out, s + prev, sp[k].start - prev) || toks_extend(out, d->str, d->str_len))
                rc = -1;
            prev = sp[k].end;
        }
        if (!rc && toks_extend(out, s + prev, len - prev))
            rc = -1;
    }
    free(sp);
    return rc;
}

static int step_strip(const bpe_dec *d, toks *in, toks *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = TOK(in, i);
        size_t len = in->len[i], a = 0, b = len, adv;
        for (int k = 0; k < d->start && a < len; k++) {
            if (utf8_decode(s + a, len - a, &adv) != (int32_t)d->cp)
                break;
            a += adv;
        }
        for (int k = 0; k < d->stop && b > 0; k++) {
            size_t j = b - 1;
            while (j > 0 && ((uint8_t)s[j] & 0xC0) == 0x80)
                j--;
            if (utf8_decode(s + j, b - j, &adv) != (int32_t)d->cp)
                break;
            b = j;
        }
        if (toks_add(out, s + a, b > a ? b - a : 0))
            return -1;
    }
    return 0;
}

static int step_metaspace(const bpe_dec *d, toks *in, toks *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = TOK(in, i);
        size_t len = in->len[i], adv;
        if (toks_add(out, "", 0))
            return -1;
        for (size_t k = 0; k < len; k += adv) {
            int32_t c = utf8_decode(s + k, len - k, &adv);
            int rc;
            if (c == (int32_t)d->cp) /* tokenizers drops every one in the first token */
                rc = i == 0 && d->prepend != BPE_PREPEND_NEVER ? 0 : toks_extend(out, " ", 1);
            else
                rc = toks_extend(out, s + k, adv);
            if (rc)
                return -1;
        }
    }
    return 0;
}

static int step_bpe_suffix(const bpe_dec *d, toks *in, toks *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = TOK(in, i);
        size_t len = in->len[i], prev = 0;
        const char *rep = i + 1 == in->n ? "" : " ";
        if (toks_add(out, "", 0))
            return -1;
        for (size_t k = 0; d->str_len && k + d->str_len <= len;) {
            if (memcmp(s + k, d->str, d->str_len)) {
                k++;
                continue;
            }
            if (toks_extend(out, s + prev, k - prev) || toks_extend(out, rep, strlen(rep)))
                return -1;
            k += d->str_len;
            prev = k;
        }
        if (toks_extend(out, s + prev, len - prev))
            return -1;
    }
    return 0;
}

/* Decode ids[0..n) into out (appended, NUL-terminated). */
static int decode_ids(const bpe *t, const int32_t *ids, size_t n, int skip, bpe_buf *out)
{
    toks a = {0}, b = {0};
    bpe_buf tmp = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        size_t len;
        const char *s = bpe_token_str(t, ids[i], &len);
        if (!s || (skip && bpe_is_special(t, ids[i])))
            continue;
        rc = toks_add(&a, s, len);
    }
    for (int k = 0; k < t->n_dec && !rc; k++) {
        const bpe_dec *d = &t->dec[k];
        toks_clear(&b);
        switch (d->kind) {
        case BPE_DEC_BYTELEVEL: rc = step_bytelevel(&a, &b, &tmp); break;
        case BPE_DEC_BYTEFALLBACK: rc = step_bytefallback(&a, &b, &tmp); break;
        case BPE_DEC_REPLACE: rc = step_replace(d, &a, &b); break;
        case BPE_DEC_STRIP: rc = step_strip(d, &a, &b); break;
        case BPE_DEC_METASPACE: rc = step_metaspace(d, &a, &b); break;
        case BPE_DEC_BPE: rc = step_bpe_suffix(d, &a, &b); break;
        case BPE_DEC_FUSE:
            rc = toks_add(&b, a.buf.p ? a.buf.p : "", a.buf.n); /* tokens are contiguous in buf */
            break;
        }
        toks tt = a;
        a = b;
        b = tt;
    }
    for (size_t i = 0; i < a.n && !rc; i++) {
        if (!t->has_decoder && i > 0 && bpe_buf_put(out, " ", 1))
            rc = -1;
        else if (bpe_buf_put(out, TOK(&a, i), a.len[i]))
            rc = -1;
    }
    if (!rc && bpe_buf_put(out, "", 0))
        rc = -1;
    toks_free(&a);
    toks_free(&b);
    bpe_buf_free(&tmp);
    return rc ? TANDEM_ENOMEM : 0;
}

/* ---- public lookups ------------------------------------------------------ */

int bpe_n_vocab(const bpe *t) { return t ? t->n_vocab : 0; }

int bpe_token_to_id(const bpe *t, const char *s)
{
    if (!t || !s)
        return -1;
    size_t n = strlen(s);
    int32_t a = bpe_strmap_get(&t->added_map, s, n);
    return a >= 0 ? t->added[a].id : bpe_strmap_get(&t->vocab, s, n);
}

const char *bpe_id_to_token(const bpe *t, int32_t id)
{
    size_t len;
    return t ? bpe_token_str(t, id, &len) : NULL;
}

int bpe_is_special(const bpe *t, int32_t id)
{
    size_t len;
    const char *s = t ? bpe_token_str(t, id, &len) : NULL;
    if (!s)
        return 0;
    /* by content, like tokenizers' special_tokens_set */
    int32_t a = bpe_strmap_get(&t->added_map, s, len);
    return a >= 0 && t->added[a].special;
}

int bpe_find_special(const bpe *t, const char *content)
{
    if (!t || !content)
        return -1;
    int32_t a = bpe_strmap_get(&t->added_map, content, strlen(content));
    return a >= 0 ? t->added[a].id : -1;
}

int bpe_decode(const bpe *t, const int32_t *ids, int n, int skip_special, char *out, size_t cap,
               size_t *n_out)
{
    if (n_out)
        *n_out = 0;
    if (!t || (n > 0 && !ids) || n < 0 || (cap && !out))
        return TANDEM_EINVAL;
    bpe_buf b = {0};
    int rc = decode_ids(t, ids, (size_t)n, skip_special, &b);
    if (!rc) {
        if (n_out)
            *n_out = b.n;
        if (cap) {
            size_t k = b.n < cap - 1 ? b.n : cap - 1;
            memcpy(out, b.p, k);
            out[k] = 0;
        }
    }
    bpe_buf_free(&b);
    return rc;
}

/* ---- streaming ----------------------------------------------------------- */

struct bpe_stream {
    const bpe *t;
    int skip;
    int32_t *win;        /* [n_win] context ids (n_ctx of them) then ids not yet emitted */
    size_t n_win, cap_win, n_ctx;
    bpe_buf prefix;      /* decode of the context ids */
    bpe_buf text;        /* scratch: decode of the window */
    bpe_buf ready;       /* emitted text not yet handed out, from ready_off */
    size_t ready_off;
};

int bpe_stream_create(const bpe *t, int skip_special, bpe_stream **out)
{
    *out = NULL;
    if (!t)
        return TANDEM_EINVAL;
    bpe_stream *s = calloc(1, sizeof *s);
    if (!s)
        return TANDEM_ENOMEM;
    s->t = t;
    s->skip = skip_special;
    *out = s;
    return 0;
}

void bpe_stream_free(bpe_stream *s)
{
    if (!s)
        return;
    free(s->win);
    bpe_buf_free(&s->prefix);
    bpe_buf_free(&s->text);
    bpe_buf_free(&s->ready);
    free(s);
}

/* Hand out queued text: as much as fits in cap without splitting a character. */
static int deliver(bpe_stream *s, char *out, size_t cap)
{
    size_t avail = s->ready.n - s->ready_off, k = avail < cap ? avail : cap;
    if (!avail) { /* nothing queued yet: ready.p may be NULL, and NULL + 0 is undefined */
        s->ready.n = s->ready_off = 0;
        return 0;
    }
    if (k > INT_MAX)
        k = INT_MAX;
    const char *p = s->ready.p + s->ready_off;
    while (k < avail && k > 0 && ((uint8_t)p[k] & 0xC0) == 0x80)
        k--;
    if (k)
        memcpy(out, p, k);
    s->ready_off += k;
    if (s->ready_off == s->ready.n)
        s->ready.n = s->ready_off = 0;
    return (int)k;
}

/* Is the window's last token an <0xXX> token of a ByteFallback decoder? The run it belongs to
 * decides as a whole whether it is text or one U+FFFD per byte, so nothing of the run can be
 * emitted before it ends (and the window need not be decoded until then). */
static int open_byte_run(const bpe_stream *s)
{
    size_t len;
    uint8_t byte;
    const char *last = bpe_token_str(s->t, s->win[s->n_win - 1], &len);
    return s->t->dec_bytefallback && is_byte_token(last, len, &byte);
}

/* Does the decoded window (s->text) end in a character that later bytes can still complete? */
static int pending(const bpe_stream *s)
{
    const bpe *t = s->t;
    size_t len;
    const bpe_buf *x = &s->text;
    if (!t->dec_bytelevel || x->n < 3 || memcmp(x->p + x->n - 3, "\xef\xbf\xbd", 3))
        return 0;
    /* the text ends in U+FFFD: is it an incomplete character that later bytes can finish? */
    bpe_buf raw = {0};
    int inc = 0;
    size_t i = s->n_win;
    while (i > s->n_ctx && raw.n < 4) {
        bpe_buf one = {0};
        const char *tok = bpe_token_str(t, s->win[--i], &len);
        if (bytelevel_bytes(tok, len, &one) || bpe_buf_put(&one, raw.p, raw.n)) {
            bpe_buf_free(&one);
            bpe_buf_free(&raw);
            return 0;
        }
        bpe_buf_free(&raw);
        raw = one;
    }
    inc = utf8_incomplete_tail(raw.p, raw.n) > 0;
    bpe_buf_free(&raw);
    return inc;
}

/* Move the window's decoded text past the context into `ready`; the new ids become context. */
static int emit(bpe_stream *s)
{
    const bpe_buf *x = &s->text, *p = &s->prefix;
    size_t from = 0;
    if (x->n >= p->n && (!p->n || !memcmp(x->p, p->p, p->n))) {
        from = p->n;
    } else { /* cannot happen with the supported decoders; never split a character anyway */
        while (from < x->n && from < p->n && x->p[from] == p->p[from])
            from++;
        while (from > 0 && ((uint8_t)x->p[from] & 0xC0) == 0x80)
            from--;
    }
    if (bpe_buf_put(&s->ready, x->p + from, x->n - from))
        return TANDEM_ENOMEM;
    memmove(s->win, s->win + s->n_ctx, (s->n_win - s->n_ctx) * sizeof *s->win);
    s->n_win -= s->n_ctx;
    s->n_ctx = s->n_win;
    s->prefix.n = 0;
    return decode_ids(s->t, s->win, s->n_win, s->skip, &s->prefix);
}

int bpe_stream_push(bpe_stream *s, int32_t id, char *out, size_t cap)
{
    if (!s || (cap && !out))
        return TANDEM_EINVAL;
    size_t len;
    /* ids a whole decode would drop never reach the decoders */
    if (!bpe_token_str(s->t, id, &len) || (s->skip && bpe_is_special(s->t, id)))
        return deliver(s, out, cap);
    if (s->n_win == s->cap_win) {
        size_t c = s->cap_win ? s->cap_win * 2 : 16;
        int32_t *w = realloc(s->win, c * sizeof *w);
        if (!w)
            return TANDEM_ENOMEM;
        s->win = w;
        s->cap_win = c;
    }
    s->win[s->n_win++] = id;
    if (open_byte_run(s))
        return deliver(s, out, cap);
    s->text.n = 0;
    int rc = decode_ids(s->t, s->win, s->n_win, s->skip, &s->text);
    if (rc)
        return rc;
    /* Emit only when the text grew: a token that adds nothing yet (a character a Strip step
     * drops at the end of the text, for one) must stay in the window, or it would become the
     * window's first token and be judged by the rules for the start of the text. */
    if (s->text.n > s->prefix.n && !pending(s) && (rc = emit(s)))
        return rc;
    return deliver(s, out, cap);
}

int bpe_stream_flush(bpe_stream *s, char *out, size_t cap)
{
    if (!s || (cap && !out))
        return TANDEM_EINVAL;
    if (s->n_win > s->n_ctx) {
        s->text.n = 0;
        int rc = decode_ids(s->t, s->win, s->n_win, s->skip, &s->text);
        if (rc || (rc = emit(s)))
            return rc;
    }
    s->n_win = s->n_ctx = 0;
    s->prefix.n = 0;
    return deliver(s, out, cap);
}
