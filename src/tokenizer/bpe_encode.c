/*
 * bpe_encode.c - text -> ids, step for step as `tokenizers` does it (Tokenizer::encode):
 *
 *   1. repair invalid UTF-8 (U+FFFD per maximal ill-formed subpart; see bpe.h)
 *   2. split out added tokens with normalized == false, matched on the raw text
 *   3. normalize each remaining piece, then split out added tokens with normalized == true
 *   4. pre-tokenize each remaining piece (the step list of bpe_load), dropping empty pieces
 *   5. BPE on each word (bpe_model.c)
 *   6. add_special: the post-processor's ids around the sequence
 *
 * All scratch lives in one struct enc per call, so a const bpe is safe to share between threads.
 * Pieces are (offset, length) into an arena that steps append to, never pointers, because the
 * arena moves when it grows. A piece's `first` flag says it starts at offset 0 of the original
 * text (Metaspace's prepend_scheme "first" looks at that).
 */
#include <utf8proc.h>

#include "core/err.h"
#include "tokenizer/bpe_impl.h"
#include "tokenizer/utf8.h"

typedef struct {
    size_t off, len;
    int first;
} piece;

typedef struct {
    size_t off, len;
    int32_t id; /* added token id, -1 for text */
} seg;

typedef struct {
    piece *v;
    size_t n, cap;
} piece_list;

typedef struct {
    const bpe *t;
    int32_t *ids;
    size_t n_ids, cap_ids;
    bpe_buf norm;          /* the normalized text of one added-token-free segment */
    bpe_buf arena;         /* pre-tokenizer strings of one normalized piece */
    piece_list cur, nxt;
    bpe_span *sp;          /* pattern matches of one piece */
    size_t n_sp, cap_sp;
    struct { size_t a, b; int m; } *parts; /* matches + gaps covering one piece */
    size_t n_parts, cap_parts;
    seg *segs[2];
    size_t n_segs[2], cap_segs[2];
    bpe_work *work;
} enc;

static int piece_push(piece_list *l, size_t off, size_t len, int first)
{
    if (!len)
        return 0; /* tokenizers drops empty splits */
    if (l->n == l->cap) {
        size_t c = l->cap ? l->cap * 2 : 64;
        piece *p = realloc(l->v, c * sizeof *p);
        if (!p)
            return -1;
        l->v = p;
        l->cap = c;
    }
    l->v[l->n++] = (piece){off, len, first};
    return 0;
}

static int seg_push(enc *e, int k, size_t off, size_t len, int32_t id)
{
    if (e->n_segs[k] == e->cap_segs[k]) {
        size_t c = e->cap_segs[k] ? e->cap_segs[k] * 2 : 32;
        seg *p = realloc(e->segs[k], c * sizeof *p);
        if (!p)
            return -1;
        e->segs[k] = p;
        e->cap_segs[k] = c;
    }
    e->segs[k][e->n_segs[k]++] = (seg){off, len, id};
    return 0;
}

static uint32_t cp_at(const char *s, size_t len, size_t *adv)
{
    int32_t c = utf8_decode(s, len, adv);
    return c < 0 ? UTF8_REPLACEMENT : (uint32_t)c;
}

/* code point of the last character of s[0..len), len > 0 */
static uint32_t last_cp(const char *s, size_t len)
{
    size_t i = len - 1, adv;
    while (i > 0 && ((uint8_t)s[i] & 0xC0) == 0x80 && len - i < 4)
        i--;
    return cp_at(s + i, len - i, &adv);
}

/* ---- normalizers --------------------------------------------------------- */

static int norm_utf8proc(const char *s, size_t len, int opts, bpe_buf *out)
{
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &dst,
                                      (utf8proc_option_t)(UTF8PROC_STABLE | opts));
    if (n < 0)
        return n == UTF8PROC_ERROR_NOMEM ? TANDEM_ENOMEM : TANDEM_EFORMAT;
    int rc = bpe_buf_put(out, dst, (size_t)n) ? TANDEM_ENOMEM : 0;
    free(dst);
    return rc;
}

static int norm_step(const bpe_norm *nm, const char *s, size_t len, bpe_buf *out)
{
    char u[8];
    size_t adv;
    switch (nm->kind) {
    case BPE_NORM_NFC: return norm_utf8proc(s, len, UTF8PROC_COMPOSE, out);
    case BPE_NORM_NFD: return norm_utf8proc(s, len, UTF8PROC_DECOMPOSE, out);
    case BPE_NORM_NFKC: return norm_utf8proc(s, len, UTF8PROC_COMPOSE | UTF8PROC_COMPAT, out);
    case BPE_NORM_NFKD: return norm_utf8proc(s, len, UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT, out);
    case BPE_NORM_LOWERCASE:
        for (size_t i = 0; i < len; i += adv) {
            uint32_t c = cp_at(s + i, len - i, &adv);
            int n;
            if (c == 0x130) { /* Rust's char::to_lowercase: the one multi-character mapping */
                memcpy(u, "i\xcc\x87", 3);
                n = 3;
            } else {
                n = utf8_encode((uint32_t)utf8proc_tolower((utf8proc_int32_t)c), u);
            }
            if (bpe_buf_put(out, u, (size_t)n))
                return TANDEM_ENOMEM;
        }
        return 0;
    case BPE_NORM_PREPEND:
        if (len && bpe_buf_put(out, nm->str, nm->str_len))
            return TANDEM_ENOMEM;
        return bpe_buf_put(out, s, len) ? TANDEM_ENOMEM : 0;
    case BPE_NORM_STRIP: {
        size_t a = 0, b = len;
        while (nm->left && a < b) {
            uint32_t c = cp_at(s + a, b - a, &adv);
            if (!utf8_is_whitespace(c))
                break;
            a += adv;
        }
        while (nm->right && b > a) {
            size_t i = b - 1;
            while (i > a && ((uint8_t)s[i] & 0xC0) == 0x80)
                i--;
            if (!utf8_is_whitespace(cp_at(s + i, b - i, &adv)))
                break;
            b = i;
        }
        return bpe_buf_put(out, s + a, b - a) ? TANDEM_ENOMEM : 0;
    }
    case BPE_NORM_STRIP_ACCENTS:
        for (size_t i = 0; i < len; i += adv) {
            uint32_t c = cp_at(s + i, len - i, &adv);
            if (!utf8_is_mark(c) && bpe_buf_put(out, s + i, adv))
                return TANDEM_ENOMEM;
        }
        return 0;
    case BPE_NORM_BYTELEVEL:
        for (size_t i = 0; i < len; i++) {
            int n = utf8_encode(bpe_byte_to_cp((uint8_t)s[i]), u);
            if (bpe_buf_put(out, u, (size_t)n))
                return TANDEM_ENOMEM;
        }
        return 0;
    case BPE_NORM_REPLACE: {
        bpe_span *sp = NULL;
        size_t n = 0, cap = 0, prev = 0;
        int rc = bpe_pattern_find(&nm->pat, s, len, &sp, &n, &cap);
        for (size_t k = 0; !rc && k < n; k++) {
            if (bpe_buf_put(out, s + prev, sp[k].start - prev) ||
                bpe_buf_put(out, nm->str, nm->str_len))
                rc = TANDEM_ENOMEM;
            prev = sp[k].end;
        }
        if (!rc && bpe_buf_put(out, s + prev, len - prev))
            rc = TANDEM_ENOMEM;
        free(sp);
        return rc;
    }
    }
    return TANDEM_EINVAL;
}

int bpe_normalize(const bpe *t, const char *s, size_t len, bpe_buf *out)
{
    if (!t->n_norm)
        return bpe_buf_put(out, s, len) ? TANDEM_ENOMEM : 0;
    bpe_buf a = {0}, b = {0};
    const char *src = s;
    size_t n = len;
    int rc = 0;
    for (int i = 0; i < t->n_norm && !rc; i++) {
        bpe_buf *dst = i == t->n_norm - 1 ? out : (i % 2 ? &b : &a);
        size_t base = dst == out ? out->n : 0;
        if (dst != out)
            dst->n = 0;
        if (bpe_buf_reserve(dst, n)) {
            rc = TANDEM_ENOMEM;
            break;
        }
        rc = norm_step(&t->norm[i], src, n, dst);
        src = dst->p ? dst->p + base : "";
        n = dst->n - base;
    }
    bpe_buf_free(&a);
    bpe_buf_free(&b);
    return rc;
}

/* ---- added tokens -------------------------------------------------------- */

/* Split s[0..len) into added tokens of trie tr and the text between, as tokenizers'
 * AddedVocabulary::find_matches does (single_word, lstrip, rstrip included). Appends to
 * e->segs[k]; offsets are into s. */
static int find_added(enc *e, int k, const bpe_trie *tr, const char *s, size_t len)
{
    const bpe *t = e->t;
    size_t start_offset = 0, adv;
    if (!tr->n_tokens)
        return len && seg_push(e, k, 0, len, -1) ? TANDEM_ENOMEM : 0;
    for (size_t i = 0; i < len;) {
        size_t ml = 0;
        int32_t a = bpe_trie_longest(tr, s + i, len - i, &ml);
        if (a < 0) {
            i++;
            continue;
        }
        const bpe_added *x = &t->added[a];
        size_t start = i, stop = i + ml;
        i = stop; /* the automaton resumes after the match, taken or not */
        if (x->single_word) {
            int start_space = start == 0 || !utf8_is_word(last_cp(s, start));
            int stop_space = stop == len || !utf8_is_word(cp_at(s + stop, len - stop, &adv));
            if (!start_space || !stop_space)
                continue;
        }
        if (x->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t j = ns - 1;
                while (j > 0 && ((uint8_t)s[j] & 0xC0) == 0x80)
                    j--;
                if (!utf8_is_whitespace(cp_at(s + j, ns - j, &adv)))
                    break;
                ns = j;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (x->rstrip) {
            while (stop < len) {
                uint32_t c = cp_at(s + stop, len - stop, &adv);
                if (!utf8_is_whitespace(c))
                    break;
                stop += adv;
            }
        }
        if (start_offset < start && seg_push(e, k, start_offset, start - start_offset, -1))
            return TANDEM_ENOMEM;
        if (seg_push(e, k, start, stop - start, x->id))
            return TANDEM_ENOMEM;
        start_offset = stop;
    }
    if (start_offset < len && seg_push(e, k, start_offset, len - start_offset, -1))
        return TANDEM_ENOMEM;
    return 0;
}

/* ---- pre-tokenizers ------------------------------------------------------ */

static int part_push(enc *e, size_t a, size_t b, int m)
{
    if (e->n_parts == e->cap_parts) {
        size_t c = e->cap_parts ? e->cap_parts * 2 : 64;
        void *p = realloc(e->parts, c * sizeof *e->parts);
        if (!p)
            return -1;
        e->parts = p;
        e->cap_parts = c;
    }
    e->parts[e->n_parts].a = a;
    e->parts[e->n_parts].b = b;
    e->parts[e->n_parts].m = m;
    e->n_parts++;
    return 0;
}

/* Turn the matches e->sp of piece p into sub-pieces of e->nxt by `behavior`
 * (NormalizedString::split in tokenizers). */
static int apply_split(enc *e, const piece *p, int behavior, int invert)
{
    e->n_parts = 0;
    size_t prev = 0;
    for (size_t k = 0; k < e->n_sp; k++) {
        if (prev != e->sp[k].start && part_push(e, prev, e->sp[k].start, 0))
            return TANDEM_ENOMEM;
        if (part_push(e, e->sp[k].start, e->sp[k].end, 1))
            return TANDEM_ENOMEM;
        prev = e->sp[k].end;
    }
    if (prev != p->len && part_push(e, prev, p->len, 0))
        return TANDEM_ENOMEM;
    if (invert)
        for (size_t k = 0; k < e->n_parts; k++)
            e->parts[k].m = !e->parts[k].m;
    size_t n = e->n_parts, w = 0;
    /* merge in place into parts[from..w), then emit */
    size_t from = 0;
    if (behavior == BPE_MERGED_NEXT) {
        /* right to left, written from the back: parts[from..n) in text order; the write index
         * never drops below the read index */
        int prev_m = 0;
        from = n;
        for (size_t k = n; k-- > 0;) {
            size_t a = e->parts[k].a, b = e->parts[k].b;
            int m = e->parts[k].m;
            if (m && !prev_m && from < n) {
                e->parts[from].a = a;
            } else {
                from--;
                e->parts[from].a = a, e->parts[from].b = b, e->parts[from].m = 0;
            }
            prev_m = m;
        }
        w = n;
    } else if (behavior == BPE_MERGED_PREV || behavior == BPE_CONTIGUOUS) {
        int prev_m = -1;
        for (size_t k = 0; k < n; k++) {
            size_t a = e->parts[k].a, b = e->parts[k].b;
            int m = e->parts[k].m;
            int join = behavior == BPE_CONTIGUOUS ? m == prev_m : (m && prev_m != 1);
            if (join && w)
                e->parts[w - 1].b = b;
            else
                e->parts[w].a = a, e->parts[w].b = b, e->parts[w].m = 0, w++;
            prev_m = m;
        }
    } else {
        w = n;
    }
    for (size_t k = from; k < w; k++) {
        if (behavior == BPE_REMOVED && e->parts[k].m)
            continue;
        size_t a = e->parts[k].a;
        if (piece_push(&e->nxt, p->off + a, e->parts[k].b - a, p->first && a == 0))
            return TANDEM_ENOMEM;
    }
    return 0;
}

/* Matches of a per-character predicate: every matching character is its own match. */
static int char_matches(enc *e, const piece *p, int (*pred)(uint32_t))
{
    const char *s = e->arena.p + p->off;
    size_t adv;
    e->n_sp = 0;
    for (size_t i = 0; i < p->len; i += adv) {
        uint32_t c = cp_at(s + i, p->len - i, &adv);
        if (!pred(c))
            continue;
        if (e->n_sp == e->cap_sp) {
            size_t cap = e->cap_sp ? e->cap_sp * 2 : 64;
            bpe_span *q = realloc(e->sp, cap * sizeof *q);
            if (!q)
                return TANDEM_ENOMEM;
            e->sp = q;
            e->cap_sp = cap;
        }
        e->sp[e->n_sp++] = (bpe_span){i, i + adv};
    }
    return 0;
}

static int regex_matches(enc *e, const piece *p, const bpe_pattern *pat)
{
    e->n_sp = 0;
    /* the subject is the piece alone: look-arounds must not see past its ends */
    return bpe_pattern_find(pat, e->arena.p + p->off, p->len, &e->sp, &e->n_sp, &e->cap_sp);
}

static int is_space_char(uint32_t c) { return utf8_is_whitespace(c); }

/* Append a transformed copy of piece p to the arena and return it as a new piece. */
static int bytelevel_map(enc *e, const piece *p)
{
    size_t off = e->arena.n;
    char u[4];
    if (bpe_buf_reserve(&e->arena, p->len * 2))
        return TANDEM_ENOMEM;
    for (size_t i = 0; i < p->len; i++) {
        int n = utf8_encode(bpe_byte_to_cp((uint8_t)e->arena.p[p->off + i]), u);
        if (bpe_buf_put(&e->arena, u, (size_t)n))
            return TANDEM_ENOMEM;
    }
    return piece_push(&e->nxt, off, e->arena.n - off, p->first) ? TANDEM_ENOMEM : 0;
}

/* Copy of piece p with `prefix` in front (if prefix) and every ' ' replaced by `rep` (if rep). */
static int rewrite(enc *e, const piece *p, const char *prefix, size_t plen, const char *rep,
                   size_t rlen, piece *out)
{
    size_t off = e->arena.n;
    if (bpe_buf_reserve(&e->arena, plen + p->len * (rlen ? rlen : 1)))
        return TANDEM_ENOMEM;
    if (plen && bpe_buf_put(&e->arena, prefix, plen))
        return TANDEM_ENOMEM;
    for (size_t i = 0; i < p->len; i++) {
        char c = e->arena.p[p->off + i];
        if (rep && c == ' ' ? bpe_buf_put(&e->arena, rep, rlen) : bpe_buf_put(&e->arena, &c, 1))
            return TANDEM_ENOMEM;
    }
    *out = (piece){off, e->arena.n - off, p->first};
    return 0;
}

static int pretok_step(enc *e, const bpe_pretok *pt)
{
    const bpe *t = e->t;
    int rc = 0;
    e->nxt.n = 0;
    for (size_t i = 0; i < e->cur.n && !rc; i++) {
        piece p = e->cur.v[i];
        switch (pt->kind) {
        case BPE_PT_SPLIT:
            if (!(rc = regex_matches(e, &p, &pt->pat)))
                rc = apply_split(e, &p, pt->behavior, pt->invert);
            break;
        case BPE_PT_BYTELEVEL: {
            if (pt->add_prefix_space && e->arena.p[p.off] != ' ' &&
                (rc = rewrite(e, &p, " ", 1, NULL, 0, &p)))
                break;
            if (!pt->use_regex) {
                rc = bytelevel_map(e, &p);
                break;
            }
            bpe_pattern gp = {t->re_gpt2, NULL, 0};
            size_t first = e->nxt.n;
            if ((rc = regex_matches(e, &p, &gp)) || (rc = apply_split(e, &p, BPE_ISOLATED, 0)))
                break;
            /* map the new sub-pieces in place */
            size_t last = e->nxt.n;
            for (size_t k = first; k < last && !rc; k++) {
                piece q = e->nxt.v[k];
                e->nxt.n = last;
                rc = bytelevel_map(e, &q);
                e->nxt.v[k] = e->nxt.v[last];
            }
            e->nxt.n = last;
            break;
        }
        case BPE_PT_DIGITS:
            if (!(rc = char_matches(e, &p, utf8_is_numeric)))
                rc = apply_split(e, &p, pt->individual ? BPE_ISOLATED : BPE_CONTIGUOUS, 0);
            break;
        case BPE_PT_METASPACE: {
            const char *s = e->arena.p + p.off;
            int starts = p.len >= (size_t)pt->repl_len && !memcmp(s, pt->repl, (size_t)pt->repl_len);
            int pre = !starts && (pt->prepend == BPE_PREPEND_ALWAYS ||
                                  (pt->prepend == BPE_PREPEND_FIRST && p.first));
            /* a leading ' ' becomes the replacement, so "starts with" is checked after replacing */
            if (!starts && p.len && s[0] == ' ')
                pre = 0;
            if ((rc = rewrite(e, &p, pt->repl, pre ? (size_t)pt->repl_len : 0, pt->repl,
                              (size_t)pt->repl_len, &p)))
                break;
            if (!pt->split) {
                rc = piece_push(&e->nxt, p.off, p.len, p.first) ? TANDEM_ENOMEM : 0;
                break;
            }
            bpe_pattern lit = {NULL, (char *)pt->repl, (size_t)pt->repl_len};
            if (!(rc = regex_matches(e, &p, &lit)))
                rc = apply_split(e, &p, BPE_MERGED_NEXT, 0);
            break;
        }
        case BPE_PT_WHITESPACE: {
            bpe_pattern wp = {t->re_word, NULL, 0};
            if (!(rc = regex_matches(e, &p, &wp)))
                rc = apply_split(e, &p, BPE_REMOVED, 1);
            break;
        }
        case BPE_PT_WHITESPACE_SPLIT:
            if (!(rc = char_matches(e, &p, is_space_char)))
                rc = apply_split(e, &p, BPE_REMOVED, 0);
            break;
        case BPE_PT_PUNCT:
            if (!(rc = char_matches(e, &p, utf8_is_punct)))
                rc = apply_split(e, &p, pt->behavior, 0);
            break;
        case BPE_PT_BERT: {
            size_t first = e->nxt.n;
            if ((rc = char_matches(e, &p, is_space_char)) || (rc = apply_split(e, &p, BPE_REMOVED, 0)))
                break;
            size_t last = e->nxt.n;
            for (size_t k = first; k < last && !rc; k++) {
                piece q = e->nxt.v[k];
                if (!(rc = char_matches(e, &q, utf8_is_punct)))
                    rc = apply_split(e, &q, BPE_ISOLATED, 0);
            }
            /* drop the whitespace-split pieces, keep their punctuation splits */
            memmove(e->nxt.v + first, e->nxt.v + last, (e->nxt.n - last) * sizeof(piece));
            e->nxt.n -= last - first;
            break;
        }
        }
    }
    piece_list tmp = e->cur;
    e->cur = e->nxt;
    e->nxt = tmp;
    return rc;
}

/* Pre-tokenize and BPE one normalized piece s[0..len). */
static int encode_piece(enc *e, const char *s, size_t len, int first)
{
    const bpe *t = e->t;
    e->arena.n = 0;
    e->cur.n = 0;
    if (bpe_buf_put(&e->arena, s, len) || piece_push(&e->cur, 0, len, first))
        return TANDEM_ENOMEM;
    for (int i = 0; i < t->n_pretok; i++) {
        int rc = pretok_step(e, &t->pretok[i]);
        if (rc)
            return rc;
    }
    for (size_t i = 0; i < e->cur.n; i++) {
        int rc = bpe_model_word(t, e->work, e->arena.p + e->cur.v[i].off, e->cur.v[i].len,
                                &e->ids, &e->n_ids, &e->cap_ids);
        if (rc)
            return rc;
    }
    return 0;
}

/* A text segment of the raw input (no raw added tokens inside): normalize, split out normalized
 * added tokens, encode the rest. */
static int encode_text(enc *e, const char *s, size_t len, int first)
{
    const bpe *t = e->t;
    e->norm.n = 0;
    int rc = bpe_normalize(t, s, len, &e->norm);
    if (rc)
        return rc;
    const char *ns = e->norm.p ? e->norm.p : "";
    e->n_segs[1] = 0;
    if ((rc = find_added(e, 1, &t->trie_norm, ns, e->norm.n)))
        return rc;
    for (size_t i = 0; i < e->n_segs[1]; i++) {
        seg g = e->segs[1][i];
        if (g.id >= 0)
            rc = bpe_ids_push(&e->ids, &e->n_ids, &e->cap_ids, g.id) ? TANDEM_ENOMEM : 0;
        else
            rc = encode_piece(e, e->norm.p + g.off, g.len, first && g.off == 0);
        if (rc)
            return rc;
    }
    return 0;
}

static void enc_free(enc *e)
{
    free(e->ids);
    bpe_buf_free(&e->norm);
    bpe_buf_free(&e->arena);
    free(e->cur.v);
    free(e->nxt.v);
    free(e->sp);
    free(e->parts);
    free(e->segs[0]);
    free(e->segs[1]);
    bpe_work_free(e->work);
}

int bpe_encode(const bpe *t, const char *text, size_t len, int add_special, int32_t *ids, int cap,
               int *n_out, char *err, size_t errlen)
{
    if (n_out)
        *n_out = 0;
    if (!t || !n_out || (!text && len) || cap < 0 || (cap > 0 && !ids))
        return td_err(err, errlen, TANDEM_EINVAL, "bpe_encode: bad arguments");
    enc e0 = {0}, *e = &e0;
    e->t = t;
    char *fixed = NULL;
    int rc = 0;
    if (!(e->work = bpe_work_new()))
        goto oom;
    if (len && utf8_valid_prefix(text, len) != len) {
        if (len > ((size_t)-1) / 3 || !(fixed = malloc(len * 3)))
            goto oom;
        len = utf8_repair(text, len, fixed);
        text = fixed;
    }
    if (!text)
        text = "";
    if (add_special)
        for (int i = 0; i < t->n_post_prefix; i++)
            if (bpe_ids_push(&e->ids, &e->n_ids, &e->cap_ids, t->post_prefix[i]))
                goto oom;
    if ((rc = find_added(e, 0, &t->trie_raw, text, len)))
        goto done;
    for (size_t i = 0; i < e->n_segs[0] && !rc; i++) {
        seg g = e->segs[0][i];
        if (g.id >= 0)
            rc = bpe_ids_push(&e->ids, &e->n_ids, &e->cap_ids, g.id) ? TANDEM_ENOMEM : 0;
        else
            rc = encode_text(e, text + g.off, g.len, g.off == 0);
    }
    if (rc)
        goto done;
    if (add_special)
        for (int i = 0; i < t->n_post_suffix; i++)
            if (bpe_ids_push(&e->ids, &e->n_ids, &e->cap_ids, t->post_suffix[i]))
                goto oom;
    if (e->n_ids > (size_t)INT32_MAX) {
        rc = td_err(err, errlen, TANDEM_EINVAL, "%s: text too long (%zu tokens)", t->name, e->n_ids);
        goto done;
    }
    *n_out = (int)e->n_ids;
    if (cap > 0 && e->n_ids)
        memcpy(ids, e->ids, (e->n_ids < (size_t)cap ? e->n_ids : (size_t)cap) * sizeof *ids);
    goto done;
oom:
    rc = TANDEM_ENOMEM;
done:
    if (rc == TANDEM_ENOMEM)
        td_err(err, errlen, rc, "%s: out of memory while encoding %zu bytes", t->name, len);
    else if (rc && rc != TANDEM_EINVAL)
        td_err(err, errlen, rc, "%s: a regex or normalizer step failed (resource limit?) "
               "while encoding %zu bytes", t->name, len);
    free(fixed);
    enc_free(e);
    return rc;
}
