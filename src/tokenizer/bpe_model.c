/*
 * bpe_model.c - the data structures under the tokenizer and the BPE merge loop.
 *
 * Hash maps are open addressing with linear probing over power-of-two tables kept at most half
 * full. The merge loop is the one of `tokenizers` (models/bpe/word.rs): a binary heap of
 * candidate merges ordered by (rank, position), stale entries skipped when popped. Following it
 * exactly (not just "lowest rank first") is what makes the ids identical on every input, and it
 * keeps a word of n symbols at O(n log n), so a 1 MB word without pre-tokenization is fine.
 */
#include "tokenizer/bpe_impl.h"

#include "tandem.h"
#include "tokenizer/utf8.h"

/* ---- growable buffers ---------------------------------------------------- */

int bpe_buf_reserve(bpe_buf *b, size_t extra)
{
    if (b->cap - b->n >= extra + 1)
        return 0;
    size_t need = b->n + extra + 1, cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int bpe_buf_put(bpe_buf *b, const void *s, size_t n)
{
    if (bpe_buf_reserve(b, n))
        return -1;
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

int bpe_ids_push(int32_t **ids, size_t *n, size_t *cap, int32_t v)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        int32_t *p = realloc(*ids, c * sizeof *p);
        if (!p)
            return -1;
        *ids = p;
        *cap = c;
    }
    (*ids)[(*n)++] = v;
    return 0;
}

/* ---- string map ---------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, folded */
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= 0x100000001b3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static int strmap_grow(bpe_strmap *m)
{
    size_t cap = m->cap ? m->cap * 2 : 1024;
    uint32_t *slot = calloc(cap, sizeof *slot);
    if (!slot)
        return -1;
    for (size_t i = 0; i < m->n; i++) {
        size_t j = m->ent[i].hash & (cap - 1);
        while (slot[j])
            j = (j + 1) & (cap - 1);
        slot[j] = (uint32_t)(i + 1);
    }
    free(m->slot);
    m->slot = slot;
    m->cap = cap;
    return 0;
}

int32_t bpe_strmap_get(const bpe_strmap *m, const char *s, size_t len)
{
    if (!m->cap)
        return -1;
    uint32_t h = hash_bytes(s, len);
    for (size_t j = h & (m->cap - 1);; j = (j + 1) & (m->cap - 1)) {
        uint32_t e = m->slot[j];
        if (!e)
            return -1;
        const bpe_sment *x = &m->ent[e - 1];
        if (x->hash == h && x->len == len && !memcmp(m->keys.p + x->off, s, len))
            return x->val;
    }
}

int bpe_strmap_put(bpe_strmap *m, const char *s, size_t len, int32_t val)
{
    if (len > UINT32_MAX / 2)
        return -1;
    if ((m->n + 1) * 2 > m->cap && strmap_grow(m))
        return -1;
    uint32_t h = hash_bytes(s, len);
    size_t j = h & (m->cap - 1);
    for (;; j = (j + 1) & (m->cap - 1)) {
        uint32_t e = m->slot[j];
        if (!e)
            break;
        bpe_sment *x = &m->ent[e - 1];
        if (x->hash == h && x->len == len && !memcmp(m->keys.p + x->off, s, len)) {
            x->val = val;
            return 0;
        }
    }
    if (m->n == m->ent_cap) {
        size_t c = m->ent_cap ? m->ent_cap * 2 : 512;
        bpe_sment *p = realloc(m->ent, c * sizeof *p);
        if (!p)
            return -1;
        m->ent = p;
        m->ent_cap = c;
    }
    size_t off = m->keys.n;
    if (bpe_buf_put(&m->keys, s, len) || bpe_buf_put(&m->keys, "", 1))
        return -1;
    if (off > UINT32_MAX)
        return -1;
    m->ent[m->n] = (bpe_sment){(uint32_t)off, (uint32_t)len, h, val};
    m->slot[j] = (uint32_t)(++m->n);
    return 0;
}

void bpe_strmap_free(bpe_strmap *m)
{
    free(m->slot);
    free(m->ent);
    bpe_buf_free(&m->keys);
    memset(m, 0, sizeof *m);
}

/* ---- pair map ------------------------------------------------------------ */

static size_t pair_hash(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (size_t)k;
}

static int pairmap_grow(bpe_pairmap *m)
{
    size_t cap = m->cap ? m->cap * 2 : 1024;
    uint64_t *key = calloc(cap, sizeof *key);
    int32_t *rank = malloc(cap * sizeof *rank), *merged = malloc(cap * sizeof *merged);
    if (!key || !rank || !merged) {
        free(key);
        free(rank);
        free(merged);
        return -1;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->key[i])
            continue;
        size_t j = pair_hash(m->key[i]) & (cap - 1);
        while (key[j])
            j = (j + 1) & (cap - 1);
        key[j] = m->key[i];
        rank[j] = m->rank[i];
        merged[j] = m->merged[i];
    }
    free(m->key);
    free(m->rank);
    free(m->merged);
    m->key = key;
    m->rank = rank;
    m->merged = merged;
    m->cap = cap;
    return 0;
}

int bpe_pairmap_put(bpe_pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
    if ((m->n + 1) * 2 > m->cap && pairmap_grow(m))
        return -1;
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t j = pair_hash(k) & (m->cap - 1);
    while (m->key[j] && m->key[j] != k)
        j = (j + 1) & (m->cap - 1);
    if (!m->key[j])
        m->n++;
    m->key[j] = k;
    m->rank[j] = rank;
    m->merged[j] = merged;
    return 0;
}

int bpe_pairmap_get(const bpe_pairmap *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged)
{
    if (!m->cap)
        return 0;
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    for (size_t j = pair_hash(k) & (m->cap - 1); m->key[j]; j = (j + 1) & (m->cap - 1)) {
        if (m->key[j] == k) {
            *rank = m->rank[j];
            *merged = m->merged[j];
            return 1;
        }
    }
    return 0;
}

void bpe_pairmap_free(bpe_pairmap *m)
{
    free(m->key);
    free(m->rank);
    free(m->merged);
    memset(m, 0, sizeof *m);
}

/* ---- added-token trie ---------------------------------------------------- */

static int trie_node(bpe_trie *t, uint8_t byte)
{
    if (t->n == t->cap) {
        int c = t->cap ? t->cap * 2 : 64;
        bpe_trie_node *p = realloc(t->node, (size_t)c * sizeof *p);
        if (!p)
            return -1;
        t->node = p;
        t->cap = c;
    }
    t->node[t->n] = (bpe_trie_node){-1, -1, -1, byte};
    return t->n++;
}

int bpe_trie_add(bpe_trie *t, const char *s, size_t len, int32_t term)
{
    if (!len)
        return 0; /* empty contents never match (tokenizers skips them too) */
    if (!t->n && trie_node(t, 0) < 0)
        return -1;
    int cur = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        int k = t->node[cur].child;
        while (k >= 0 && t->node[k].byte != c)
            k = t->node[k].next;
        if (k < 0) {
            if ((k = trie_node(t, c)) < 0)
                return -1;
            t->node[k].next = t->node[cur].child;
            t->node[cur].child = k;
        }
        cur = k;
    }
    t->node[cur].term = term;
    t->first[(uint8_t)s[0] >> 3] |= (uint8_t)(1u << ((uint8_t)s[0] & 7));
    t->n_tokens++;
    return 0;
}

int32_t bpe_trie_longest(const bpe_trie *t, const char *s, size_t len, size_t *mlen)
{
    if (!t->n_tokens || !len)
        return -1;
    uint8_t c0 = (uint8_t)s[0];
    if (!(t->first[c0 >> 3] & (1u << (c0 & 7))))
        return -1;
    int cur = 0;
    int32_t best = -1;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        int k = t->node[cur].child;
        while (k >= 0 && t->node[k].byte != c)
            k = t->node[k].next;
        if (k < 0)
            break;
        cur = k;
        if (t->node[cur].term >= 0) {
            best = t->node[cur].term;
            *mlen = i + 1;
        }
    }
    return best;
}

void bpe_trie_free(bpe_trie *t)
{
    free(t->node);
    memset(t, 0, sizeof *t);
}

/* ---- tokens -------------------------------------------------------------- */

const char *bpe_token_str(const bpe *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab)
        return NULL;
    int32_t a = t->added_of_id[id];
    if (a >= 0) {
        *len = t->added[a].len;
        return t->added[a].content;
    }
    int32_t e = t->model_ent[id];
    if (e < 0)
        return NULL;
    *len = t->vocab.ent[e].len;
    return bpe_strmap_key(&t->vocab, (size_t)e);
}

/* ---- the merge loop ------------------------------------------------------ */

typedef struct {
    int32_t id;
    int32_t prev, next;  /* linked list over live symbols, -1 at the ends */
    uint32_t len;        /* bytes of the word it covers; 0 = merged away */
} bpe_sym;

typedef struct {
    int32_t rank, pos, merged;
} bpe_cand;

/* Words repeat (" the", "\n\n"), so one call remembers the ids of the short words it has
 * seen: a hash lookup instead of the merge loop. Per call, so a const bpe stays shareable. */
#define CACHE_WORD_MAX 48        /* bytes; longer words are rare and are not cached */
#define CACHE_ENTRIES (1 << 16)  /* bound on the cache's memory per call */

struct bpe_work {
    bpe_sym *sym;
    size_t n_sym, cap_sym;
    bpe_cand *heap;
    size_t n_heap, cap_heap;
    bpe_buf key;
    bpe_strmap cache;    /* word -> index into span */
    struct { uint32_t off, n; } *span;  /* [cache.n] ids of each cached word in cids */
    int32_t *cids;
    size_t n_cids, cap_cids;
};

bpe_work *bpe_work_new(void) { return calloc(1, sizeof(bpe_work)); }

void bpe_work_free(bpe_work *w)
{
    if (!w)
        return;
    free(w->sym);
    free(w->heap);
    bpe_buf_free(&w->key);
    bpe_strmap_free(&w->cache);
    free(w->span);
    free(w->cids);
    free(w);
}

static int sym_add(bpe_work *w, int32_t id, uint32_t len)
{
    if (w->n_sym == w->cap_sym) {
        size_t c = w->cap_sym ? w->cap_sym * 2 : 64;
        bpe_sym *p = realloc(w->sym, c * sizeof *p);
        if (!p)
            return -1;
        w->sym = p;
        w->cap_sym = c;
    }
    int32_t i = (int32_t)w->n_sym++;
    w->sym[i] = (bpe_sym){id, i - 1, -1, len};
    if (i > 0)
        w->sym[i - 1].next = i;
    return 0;
}

/* min-heap on (rank, pos): BinaryHeap<Merge> in tokenizers pops the lowest rank, then the
 * leftmost position */
static int cand_less(const bpe_cand *a, const bpe_cand *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int heap_push(bpe_work *w, bpe_cand c)
{
    if (w->n_heap == w->cap_heap) {
        size_t cap = w->cap_heap ? w->cap_heap * 2 : 64;
        bpe_cand *p = realloc(w->heap, cap * sizeof *p);
        if (!p)
            return -1;
        w->heap = p;
        w->cap_heap = cap;
    }
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!cand_less(&c, &w->heap[up]))
            break;
        w->heap[i] = w->heap[up];
        i = up;
    }
    w->heap[i] = c;
    return 0;
}

static bpe_cand heap_pop(bpe_work *w)
{
    bpe_cand top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const bpe_cand *best = &last;
        if (l < n && cand_less(&w->heap[l], best)) {
            m = l;
            best = &w->heap[l];
        }
        if (l + 1 < n && cand_less(&w->heap[l + 1], best))
            m = l + 1;
        if (m == i)
            break;
        w->heap[i] = w->heap[m];
        i = m;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

static int push_pair(const bpe *t, bpe_work *w, int32_t pos)
{
    int32_t nx = w->sym[pos].next, rank, merged;
    if (nx < 0 || !bpe_pairmap_get(&t->merges, w->sym[pos].id, w->sym[nx].id, &rank, &merged))
        return 0;
    return heap_push(w, (bpe_cand){rank, pos, merged});
}

static int merge_all(const bpe *t, bpe_work *w)
{
    w->n_heap = 0;
    for (size_t i = 0; i + 1 < w->n_sym; i++)
        if (push_pair(t, w, (int32_t)i))
            return -1;
    while (w->n_heap) {
        bpe_cand top = heap_pop(w);
        bpe_sym *s = &w->sym[top.pos];
        if (s->len == 0 || s->next < 0)
            continue;
        int32_t nx = s->next, rank, merged;
        /* stale entry: the pair at pos is no longer the one this candidate merges */
        if (!bpe_pairmap_get(&t->merges, s->id, w->sym[nx].id, &rank, &merged) ||
            merged != top.merged)
            continue;
        bpe_sym right = w->sym[nx];
        s->id = top.merged;
        s->len += right.len;
        s->next = right.next;
        w->sym[nx].len = 0;
        if (right.next >= 0)
            w->sym[right.next].prev = top.pos;
        if (s->prev >= 0 && push_pair(t, w, s->prev))
            return -1;
        if (push_pair(t, w, top.pos))
            return -1;
    }
    return 0;
}

/* The symbol string of the character s[i..i+clen): prefix for non-first characters, suffix for
 * the last one, as tokenizers' BPE::merge_word builds it. */
static const char *sym_key(const bpe *t, bpe_work *w, const char *s, size_t i, size_t clen,
                           int last, size_t *klen)
{
    int pre = i > 0 && t->cont_prefix, suf = last && t->eow_suffix;
    if (!pre && !suf) {
        *klen = clen;
        return s + i;
    }
    w->key.n = 0;
    if ((pre && bpe_buf_put(&w->key, t->cont_prefix, t->cont_prefix_len)) ||
        bpe_buf_put(&w->key, s + i, clen) ||
        (suf && bpe_buf_put(&w->key, t->eow_suffix, t->eow_suffix_len)))
        return NULL;
    *klen = w->key.n;
    return w->key.p;
}

static int cache_put(bpe_work *w, const char *s, size_t len, const int32_t *ids, size_t n)
{
    if (w->cache.n >= CACHE_ENTRIES)
        return 0;
    if ((w->cache.n & (w->cache.n - 1)) == 0) { /* grow span at powers of two */
        size_t c = w->cache.n ? w->cache.n * 2 : 256;
        void *p = realloc(w->span, c * sizeof *w->span);
        if (!p)
            return -1;
        w->span = p;
    }
    for (size_t i = 0; i < n; i++)
        if (bpe_ids_push(&w->cids, &w->n_cids, &w->cap_cids, ids[i]))
            return -1;
    w->span[w->cache.n].off = (uint32_t)(w->n_cids - n);
    w->span[w->cache.n].n = (uint32_t)n;
    return bpe_strmap_put(&w->cache, s, len, (int32_t)w->cache.n);
}

static int merge_word(const bpe *t, bpe_work *w, const char *s, size_t len, int32_t **ids,
                      size_t *n, size_t *cap);

int bpe_model_word(const bpe *t, bpe_work *w, const char *s, size_t len, int32_t **ids, size_t *n,
                   size_t *cap)
{
    if (!len)
        return 0;
    if (t->ignore_merges) {
        int32_t id = bpe_strmap_get(&t->vocab, s, len);
        if (id >= 0)
            return bpe_ids_push(ids, n, cap, id) ? TANDEM_ENOMEM : 0;
    }
    if (len > CACHE_WORD_MAX)
        return merge_word(t, w, s, len, ids, n, cap);
    int32_t k = bpe_strmap_get(&w->cache, s, len);
    if (k >= 0) {
        for (uint32_t i = 0; i < w->span[k].n; i++)
            if (bpe_ids_push(ids, n, cap, w->cids[w->span[k].off + i]))
                return TANDEM_ENOMEM;
        return 0;
    }
    size_t n0 = *n;
    int rc = merge_word(t, w, s, len, ids, n, cap);
    /* a word of unknown characters without an unk token adds no ids: *ids may still be NULL */
    if (!rc && w->n_cids < UINT32_MAX / 2 && cache_put(w, s, len, *ids ? *ids + n0 : NULL, *n - n0))
        rc = TANDEM_ENOMEM;
    return rc;
}

/* tokenizers' BPE::merge_word + Word::merge_all */
static int merge_word(const bpe *t, bpe_work *w, const char *s, size_t len, int32_t **ids,
                      size_t *n, size_t *cap)
{
    w->n_sym = 0;
    int32_t unk = -1;       /* pending unknown symbol (fused with the next unknowns) */
    uint32_t unk_len = 0;
    for (size_t i = 0; i < len;) {
        size_t clen = 1;
        utf8_decode(s + i, len - i, &clen); /* input is valid UTF-8 */
        size_t klen;
        const char *key = sym_key(t, w, s, i, clen, i + clen == len, &klen);
        if (!key)
            return TANDEM_ENOMEM;
        int32_t id = bpe_strmap_get(&t->vocab, key, klen);
        if (id >= 0) {
            if (unk >= 0 && sym_add(w, unk, unk_len))
                return TANDEM_ENOMEM;
            unk = -1;
            if (sym_add(w, id, (uint32_t)clen))
                return TANDEM_ENOMEM;
        } else {
            int done = 0;
            if (t->byte_fallback) {
                size_t k = 0;
                while (k < klen && t->byte_tok[(uint8_t)key[k]] >= 0)
                    k++;
                if (k == klen) {
                    for (k = 0; k < klen; k++)
                        if (sym_add(w, t->byte_tok[(uint8_t)key[k]], 1))
                            return TANDEM_ENOMEM;
                    done = 1;
                }
            }
            if (!done && t->unk_id >= 0) {
                if (unk >= 0 && t->fuse_unk) {
                    unk_len += (uint32_t)clen;
                } else {
                    if (unk >= 0 && sym_add(w, unk, unk_len))
                        return TANDEM_ENOMEM;
                    unk = t->unk_id;
                    unk_len = (uint32_t)clen;
                }
            }
            /* no byte fallback and no unk token: the character is dropped, as in tokenizers */
        }
        i += clen;
    }
    if (unk >= 0 && sym_add(w, unk, unk_len))
        return TANDEM_ENOMEM;
    if (merge_all(t, w))
        return TANDEM_ENOMEM;
    for (size_t i = 0; i < w->n_sym; i++)
        if (w->sym[i].len && bpe_ids_push(ids, n, cap, w->sym[i].id))
            return TANDEM_ENOMEM;
    return 0;
}

/* ---- patterns ------------------------------------------------------------ */

static int span_push(bpe_span **v, size_t *n, size_t *cap, size_t a, size_t b)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        bpe_span *p = realloc(*v, c * sizeof *p);
        if (!p)
            return -1;
        *v = p;
        *cap = c;
    }
    (*v)[(*n)++] = (bpe_span){a, b};
    return 0;
}

static int regex_find(pcre2_code *re, const char *s, size_t len, bpe_span **out, size_t *n,
                      size_t *cap)
{
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    pcre2_match_context *mc = NULL;
    int rc = 0;
    if (!md)
        return TANDEM_ENOMEM;
    uint32_t opts = PCRE2_NO_UTF_CHECK;
    size_t start = 0;
    while (start <= len) {
        int r = pcre2_match(re, (PCRE2_SPTR)s, len, start, opts, md, mc);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r == PCRE2_ERROR_JIT_STACKLIMIT || r == PCRE2_ERROR_HEAPLIMIT ||
            r == PCRE2_ERROR_MATCHLIMIT || r == PCRE2_ERROR_DEPTHLIMIT) {
            /* a run too deep for JIT's small default stack: redo it in the
             * interpreter, whose backtracking lives on the heap. Its work stays
             * bounded (the text may come from a client): PCRE2's default match
             * limit, and a heap of 64 MiB; past them the text is refused. */
            if (!mc) {
                mc = pcre2_match_context_create(NULL);
                if (!mc) {
                    rc = TANDEM_ENOMEM;
                    break;
                }
                pcre2_set_heap_limit(mc, 64u << 10);       /* KiB */
                pcre2_set_match_limit(mc, 10000000u);
                opts |= PCRE2_NO_JIT;
                continue;
            }
            rc = TANDEM_EFORMAT;
            break;
        }
        if (r < 0) {
            rc = TANDEM_EFORMAT;
            break;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t a = ov[0], b = ov[1];
        if (b < a) { /* \K tricks; not in any tokenizer */
            rc = TANDEM_EFORMAT;
            break;
        }
        if (span_push(out, n, cap, a, b)) {
            rc = TANDEM_ENOMEM;
            break;
        }
        if (b > a) {
            start = b;
        } else { /* empty match: step over one character */
            if (a >= len)
                break;
            size_t adv = 1;
            utf8_decode(s + a, len - a, &adv);
            start = a + adv;
        }
    }
    pcre2_match_context_free(mc);
    pcre2_match_data_free(md);
    return rc;
}

int bpe_pattern_find(const bpe_pattern *p, const char *s, size_t len, bpe_span **out, size_t *n,
                     size_t *cap)
{
    if (p->re)
        return regex_find(p->re, s, len, out, n, cap);
    if (!p->lit_len)
        return 0;
    for (size_t i = 0; i + p->lit_len <= len;) {
        const char *f = memmem(s + i, len - i, p->lit, p->lit_len);
        if (!f)
            break;
        size_t a = (size_t)(f - s);
        if (span_push(out, n, cap, a, a + p->lit_len))
            return TANDEM_ENOMEM;
        i = a + p->lit_len;
    }
    return 0;
}
