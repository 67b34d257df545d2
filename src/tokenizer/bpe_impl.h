/*
 * bpe_impl.h - the inside of a loaded tokenizer, shared by the bpe_*.c files only.
 *
 *   bpe_load.c    tokenizer.json -> struct bpe (jansson), regex translation and compilation
 *   bpe_model.c   string/pair hash maps, the byte-level alphabet, the BPE merge loop
 *   bpe_encode.c  added-token matching, normalizers, pre-tokenizers, post-processor, bpe_encode
 *   bpe_decode.c  decoders, bpe_decode, the streaming decoder
 *   bpe_tiktoken.c  tiktoken.model + tokenizer_config.json (Kimi-K2) -> the same struct
 *   bpe_gguf.c    GGUF tokenizer.ggml.* metadata (llama.cpp's semantics) -> the same struct
 *
 * Invariants: every string stored here is valid UTF-8 (jansson checks JSON strings) and NUL
 * terminated; ids are in [0, n_vocab); a struct bpe is never written after bpe_load returns.
 */
#ifndef TD_TOKENIZER_BPE_IMPL_H
#define TD_TOKENIZER_BPE_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/bpe.h"

/* ---- growable byte buffer ------------------------------------------------ */
typedef struct {
    char *p;
    size_t n, cap;
} bpe_buf;

int bpe_buf_reserve(bpe_buf *b, size_t extra); /* 0 or -1 on OOM */
int bpe_buf_put(bpe_buf *b, const void *s, size_t n);
static inline void bpe_buf_free(bpe_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* ---- string -> int32 map (keys copied, NUL-terminated) ----------------- */
typedef struct {
    uint32_t off, len, hash;
    int32_t val;
} bpe_sment;

typedef struct {
    uint32_t *slot;  /* [cap] entry index + 1, 0 = empty; cap is a power of two */
    size_t cap;
    bpe_sment *ent;  /* [n] in insertion order */
    size_t n, ent_cap;
    bpe_buf keys;    /* key bytes, each followed by a NUL */
} bpe_strmap;

int bpe_strmap_put(bpe_strmap *m, const char *s, size_t len, int32_t val); /* replaces; -1 OOM */
int32_t bpe_strmap_get(const bpe_strmap *m, const char *s, size_t len);   /* -1 when absent */
static inline const char *bpe_strmap_key(const bpe_strmap *m, size_t i)
{
    return m->keys.p + m->ent[i].off;
}
void bpe_strmap_free(bpe_strmap *m);

/* ---- (left id, right id) -> (rank, merged id) map ---------------------- */
typedef struct {
    uint64_t *key;   /* [cap] (left << 32 | right) + 1, 0 = empty */
    int32_t *rank;   /* [cap] */
    int32_t *merged; /* [cap] */
    size_t cap, n;
} bpe_pairmap;

int bpe_pairmap_put(bpe_pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t merged);
int bpe_pairmap_get(const bpe_pairmap *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged);
void bpe_pairmap_free(bpe_pairmap *m);

/* ---- patterns (Split / Replace) ------------------------------------------ */
typedef struct {
    pcre2_code *re;  /* NULL for a literal string */
    char *lit;       /* literal text when re == NULL */
    size_t lit_len;
} bpe_pattern;

/* One match of a pattern inside a subject: [start, end). */
typedef struct {
    size_t start, end;
} bpe_span;

/* All non-overlapping matches of p in s[0..len) appended to *out (empty matches included, the
 * next search then starts one character later). Returns 0, TANDEM_ENOMEM or TANDEM_EFORMAT. */
int bpe_pattern_find(const bpe_pattern *p, const char *s, size_t len, bpe_span **out, size_t *n,
                     size_t *cap);

/* ---- pipeline steps ------------------------------------------------------ */
enum {
    BPE_NORM_NFC, BPE_NORM_NFD, BPE_NORM_NFKC, BPE_NORM_NFKD, BPE_NORM_LOWERCASE,
    BPE_NORM_PREPEND, BPE_NORM_REPLACE, BPE_NORM_STRIP, BPE_NORM_STRIP_ACCENTS,
    BPE_NORM_BYTELEVEL,
};

typedef struct {
    int kind;
    bpe_pattern pat;   /* REPLACE */
    char *str;         /* PREPEND text, REPLACE content */
    size_t str_len;
    int left, right;   /* STRIP */
} bpe_norm;

enum {
    BPE_PT_SPLIT, BPE_PT_BYTELEVEL, BPE_PT_DIGITS, BPE_PT_METASPACE, BPE_PT_WHITESPACE,
    BPE_PT_WHITESPACE_SPLIT, BPE_PT_PUNCT, BPE_PT_BERT,
};
enum { BPE_REMOVED, BPE_ISOLATED, BPE_MERGED_PREV, BPE_MERGED_NEXT, BPE_CONTIGUOUS };
enum { BPE_PREPEND_NEVER, BPE_PREPEND_FIRST, BPE_PREPEND_ALWAYS };

typedef struct {
    int kind;
    bpe_pattern pat;       /* SPLIT (WHITESPACE uses the shared word regex) */
    int behavior, invert;  /* SPLIT, PUNCT */
    int add_prefix_space;  /* BYTELEVEL */
    int use_regex;         /* BYTELEVEL */
    int individual;        /* DIGITS */
    char repl[8];          /* METASPACE replacement character, UTF-8 */
    int repl_len;
    int prepend;           /* METASPACE BPE_PREPEND_* */
    int split;             /* METASPACE */
} bpe_pretok;

enum {
    BPE_DEC_BYTELEVEL, BPE_DEC_REPLACE, BPE_DEC_BYTEFALLBACK, BPE_DEC_FUSE, BPE_DEC_STRIP,
    BPE_DEC_METASPACE, BPE_DEC_BPE,
};

typedef struct {
    int kind;
    bpe_pattern pat;       /* REPLACE */
    char *str;             /* REPLACE content, BPE suffix */
    size_t str_len;
    uint32_t cp;           /* STRIP content char, METASPACE replacement */
    int start, stop;       /* STRIP */
    int prepend;           /* METASPACE */
} bpe_dec;

typedef struct {
    int32_t id;
    char *content;
    size_t len;
    uint8_t special, single_word, lstrip, rstrip, normalized;
} bpe_added;

/* Byte trie over added-token contents, matched leftmost-longest like aho-corasick's
 * MatchKind::LeftmostLongest. */
typedef struct {
    int32_t child;   /* first child node, -1 none */
    int32_t next;    /* next sibling, -1 none */
    int32_t term;    /* index into bpe.added of the token ending here, -1 none */
    uint8_t byte;
} bpe_trie_node;

typedef struct {
    bpe_trie_node *node; /* node[0] is the root */
    int n, cap;
    uint8_t first[32];   /* bitmap of first bytes, to skip quickly */
    int n_tokens;
} bpe_trie;

/* ---- the tokenizer ------------------------------------------------------- */
struct bpe {
    char *name;                 /* for messages: the path or name given at load */

    /* model */
    bpe_strmap vocab;           /* model vocabulary: token -> id */
    bpe_pairmap merges;         /* (left, right) -> (rank, merged) */
    int32_t n_vocab;            /* max id + 1 over vocab and added tokens */
    int32_t *model_ent;         /* [n_vocab] vocab entry index of each id, -1 none */
    int32_t unk_id;             /* -1 none */
    int fuse_unk, byte_fallback, ignore_merges;
    char *cont_prefix;          /* continuing_subword_prefix or NULL */
    size_t cont_prefix_len;
    char *eow_suffix;           /* end_of_word_suffix or NULL */
    size_t eow_suffix_len;
    int32_t byte_tok[256];      /* ids of "<0xXX>" tokens, -1 missing */

    /* added tokens */
    bpe_added *added;
    int n_added;
    int32_t *added_of_id;       /* [n_vocab] index into added, -1 none */
    bpe_strmap added_map;       /* content -> index into added */
    bpe_trie trie_raw;          /* normalized == false: matched on the raw input */
    bpe_trie trie_norm;         /* normalized == true: matched on normalized text */
    char **norm_content;        /* [n_added] normalized content (for trie_norm), or NULL */

    /* pipeline */
    bpe_norm *norm;
    int n_norm;
    bpe_pretok *pretok;
    int n_pretok;
    bpe_dec *dec;
    int n_dec;
    int has_decoder;            /* 0: decode joins tokens with " " */
    int dec_bytelevel, dec_bytefallback;
    int32_t *post_prefix, *post_suffix;   /* ids added around the sequence by add_special */
    int n_post_prefix, n_post_suffix;

    int32_t bos_id, eos_id;     /* GGUF metadata's (defaults included); -1 elsewhere, where
                                 * tokenizer_config.json names them */
    pcre2_code *re_gpt2;        /* ByteLevel use_regex pattern, compiled when used */
    pcre2_code *re_word;        /* Whitespace pre-tokenizer pattern, compiled when used */
};

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand
 * for themselves; the other 68 bytes (0x00-0x20, 0x7F, 0x80-0xA0, 0xAD) take 256.. in order. */
static inline uint32_t bpe_byte_to_cp(uint8_t b)
{
    if (b <= 0x20)
        return 256u + b;
    if (b == 0x7F)
        return 289;
    if (b >= 0x80 && b <= 0xA0)
        return 290u + (b - 0x80u);
    if (b == 0xAD)
        return 323;
    return b;
}

/* inverse of bpe_byte_to_cp; -1 when cp is not in the alphabet */
static inline int bpe_cp_to_byte(uint32_t cp)
{
    if (cp >= 256 && cp <= 288)
        return (int)cp - 256;
    if (cp == 289)
        return 0x7F;
    if (cp >= 290 && cp <= 322)
        return 0x80 + (int)cp - 290;
    if (cp == 323)
        return 0xAD;
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    return -1;
}

/* Trie of added tokens (bpe_model.c). */
int bpe_trie_add(bpe_trie *t, const char *s, size_t len, int32_t term);
/* Longest token starting at s[0..len); returns its added index and sets *mlen, or -1. */
int32_t bpe_trie_longest(const bpe_trie *t, const char *s, size_t len, size_t *mlen);
void bpe_trie_free(bpe_trie *t);

/* Apply the normalizer chain to s[0..len), appending the result to out (bpe_encode.c). */
int bpe_normalize(const bpe *t, const char *s, size_t len, bpe_buf *out);

/* BPE on one pre-tokenized word (bpe_model.c). Appends ids to *ids (grown as needed). */
typedef struct bpe_work bpe_work;
bpe_work *bpe_work_new(void);
void bpe_work_free(bpe_work *w);
int bpe_model_word(const bpe *t, bpe_work *w, const char *s, size_t len, int32_t **ids, size_t *n,
                   size_t *cap);

/* Token string of id (added content first, then vocab) or NULL; *len gets its length. */
const char *bpe_token_str(const bpe *t, int32_t id, size_t *len);

/* Shared with the loaders that build a struct bpe without a tokenizer.json (bpe_load.c):
 * compile an Oniguruma-syntax regex as bpe_load does (what names it in messages), and build the
 * dense id tables and added-token tries once vocab, added and the normalizers are in place. */
int bpe_compile_regex(bpe *t, const char *src, size_t len, const char *what, pcre2_code **out,
                      char *err, size_t errlen);
int bpe_index_tokens(bpe *t, char *err, size_t errlen);

/* Push v to a growable int32 array. */
int bpe_ids_push(int32_t **ids, size_t *n, size_t *cap, int32_t v);

#endif
