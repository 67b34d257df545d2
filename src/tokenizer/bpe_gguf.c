/*
 * bpe_gguf.c - a tokenizer from GGUF metadata (tokenizer.ggml.*) -> struct bpe, tokenizing as
 * llama.cpp does (llama-vocab.cpp: llama_vocab::impl::load and tokenize with parse_special).
 *
 * Two vocabulary kinds, as tokenizer.ggml.model names them:
 *   gpt2   byte-level BPE: tokens in GPT-2's byte-to-unicode alphabet, tokenizer.ggml.merges "a b"
 *          (the rank is the index; a pair listed twice keeps its first rank), the split regexes of
 *          tokenizer.ggml.pre applied one after the other (each splits the pieces of the previous
 *          one, matches and the text between them both kept, as llama.cpp's unicode_regex_split
 *          does), then the merge loop; the whole-word shortcut (ignore_merges) for the pre types
 *          llama.cpp sets it for. Merges whose sides or result are not tokens are skipped: llama.cpp
 *          could apply them but then emits the result's bytes one by one, which no converted file
 *          relies on.
 *   llama  SentencePiece-style (llama.cpp's SPM): " " becomes U+2581, U+2581 is put in front of the
 *          text (add_space_prefix, default on) and after every special token, and adjacent pieces
 *          merge when their concatenation is a token, the highest tokenizer.ggml.scores first (the
 *          leftmost on a tie). That is the BPE merge loop with a merge (a, b) -> a+b for every split
 *          of every token into two tokens, ranked by the token's score (equal scores share a rank,
 *          so position breaks the tie as in llama.cpp); characters that end up as no token are
 *          spelled with the <0xXX> byte tokens.
 * Tokens typed CONTROL (3), USER_DEFINED (4) or UNKNOWN (2) in tokenizer.ggml.token_type are
 * matched in the raw text before anything else (llama.cpp's tokenizer_st_partition with
 * parse_special); CONTROL and UNKNOWN ones are special (skipped by skip_special decoding). Tokens
 * whose text marks an end of turn or fill-in-the-middle role ("<|im_end|>", "<|eot_id|>", ...) count
 * as CONTROL whatever their type, as llama.cpp overrides them. add_special adds BOS / EOS where
 * tokenizer.ggml.add_bos_token / add_eos_token (or the vocabulary kind's default) say so.
 *
 * Known differences from llama.cpp, none of which converted files exercise: special tokens are
 * matched leftmost-longest (llama.cpp: longest token first over the whole text, which differs only
 * when two special tokens overlap in the text); invalid UTF-8 is repaired with one U+FFFD per
 * maximal ill-formed subpart before tokenizing (llama.cpp: one per byte, and SPM keeps the raw
 * bytes); regexes run on PCRE2 with Unicode properties, llama.cpp on its own tables. And one
 * deliberate one: for "kimi-k2" the split is Moonshot's own pattern (bpe_kimi_pattern), which
 * llama.cpp's hand-written splitter departs from for marks and case changes.
 *
 * Decoding is that of the equivalent tokenizer.json (ByteLevel; or Replace U+2581, ByteFallback,
 * Fuse, Strip one leading space), which gives llama.cpp's llama_detokenize text except that
 * llama.cpp undoes " 's"-style spacing for some pre types (clean_spaces) and, for SentencePiece
 * vocabularies, keeps the leading space when it drops a BOS with remove_special.
 */
#include <stdio.h>

#include "core/err.h"
#include "core/log.h"
#include "io/gguf.h"
#include "tokenizer/bpe_impl.h"

#define GG_MAX_IDS (1 << 24) /* as bpe_load.c: ids index dense arrays */

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };

/* ---- pre-tokenizers (llama-vocab.cpp's llm_tokenizer_bpe) ------------------------------------- */

#define RE_CONTRACT "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RE_LLAMA3(digits) RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" digits \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_UPPER "((?=[\\p{L}])([^a-z]))"
#define RE_LOWER "((?=[\\p{L}])([^A-Z]))"
#define RE_CJK "[\xe4\xb8\x80-\xe9\xbe\xa5\xe0\xa0\x80-\xe4\xb8\x80\xea\xb0\x80-\xed\x9f\xbf]+" /* [一-龥ࠀ-一가-퟿]+ */

/* deepseek-llm's Latin/Greek/Cyrillic/... letter ranges, as llama.cpp lists them */
#define RE_DS_LETTERS \
    "\\s?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}\\x{1C4}-\\x{293}" \
    "\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}\\x{388}-\\x{38A}" \
    "\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}\\x{48A}-\\x{52F}\\x{531}-\\x{556}" \
    "\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}" \
    "\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}" \
    "\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}" \
    "\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}" \
    "\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}" \
    "\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-\\x{212D}" \
    "\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}\\x{2184}" \
    "\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}\\x{2CF3}\\x{A640}-\\x{A66D}" \
    "\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}" \
    "\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}" \
    "\\x{104B0}-\\x{104D3}\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}\\x{118A0}-\\x{118DF}" \
    "\\x{1E900}-\\x{1E943}]+"

typedef struct {
    const char *names;     /* '|'-separated tokenizer.ggml.pre values */
    const char *re[6];     /* split regexes in order, NULL-terminated; re[0] NULL = Kimi's */
    int ignore_merges, add_bos, kimi;
} pre_type;

static const pre_type PRE[] = {
    {"default", {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}, 0, 0, 0},
    {"llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|midm-2.0|lfm2|dbrx|smaug-bpe",
     {RE_LLAMA3("\\p{N}{1,3}")}, 1, 1, 0},
    {"deepseek-llm", {"[\\r\\n]", RE_DS_LETTERS,
                      "\\s?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}\\x{3000}-\\x{3002}]+",
                      "\\s+$", RE_CJK, "\\p{N}+"}, 0, 0, 0},
    {"deepseek-v3|hunyuan-dense",
     {"\\p{N}{1,3}", "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+", /* [一-龥぀-ゟ゠-ヿ]+ */
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
      "| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, 0, 0, 0},
    {"deepseek-coder", {"[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RE_CJK, "\\p{N}"}, 0, 0, 0},
    {"falcon", {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}, 0, 0, 0},
    {"starcoder|refact|command-r|smollm|codeshell|exaone|minerva-7b", {"\\p{N}", RE_GPT2}, 0, 0, 0},
    {"gpt-2|phi-2|jina-es|jina-de|gigachat|jina-v2-es|jina-v2-de|a.x-4.0|mellum|jina-v1-en|jina-v2-code|"
     "roberta-bpe|mpt|olmo|jais|exaone4|trillion|granite-docling", {RE_GPT2}, 0, 0, 0},
    {"qwen2|deepseek-r1-qwen|kormo|stablelm2|megrez|hunyuan|grok-2", {RE_LLAMA3("\\p{N}")}, 0, 0, 0},
    {"poro-chat|bloom|gpt3-finnish", {" ?[^(\\s|.,!?\xe2\x80\xa6\xe3\x80\x82\xef\xbc\x8c\xe3\x80\x81\xe0\xa5\xa4\xdb\x94\xd8\x8c)]+"},
     0, 0, 0},
    {"viking", {" ?[^(\\s|.,!?\xe2\x80\xa6\xe3\x80\x82\xef\xbc\x8c\xe3\x80\x81\xe0\xa5\xa4\xdb\x94\xd8\x8c)]+", "\\p{N}"},
     0, 0, 0},
    {"glm4|chatglm-bpe", {RE_LLAMA3("\\p{N}{1,3}")}, 0, 0, 0},
    {"tekken", {"[^\\r\\n\\p{L}\\p{N}]?" RE_UPPER "*" RE_LOWER "+|[^\\r\\n\\p{L}\\p{N}]?" RE_UPPER "+" RE_LOWER
                "*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, 1, 1, 0},
    {"chameleon", {"<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\\t\\n]|    |  )", "\\p{N}",
                   "[\\p{P}!-/:-@\\[-`{-~]", RE_GPT2}, 0, 1, 0},
    {"gpt-4o|llama4|minimax-m2",
     {"[^\\r\\n\\p{L}\\p{N}]?" RE_UPPER "*" RE_LOWER "+" RE_CONTRACT "?|[^\\r\\n\\p{L}\\p{N}]?" RE_UPPER "+" RE_LOWER
      "*" RE_CONTRACT "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, 0, 0, 0},
    {"bailingmoe|bailingmoe2|llada-moe",
     {"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
      "|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"}, 0, 0, 0},
    {"seed-coder", {RE_CONTRACT "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+"
                    "|\\s+(?!\\S)|\\s+"}, 0, 0, 0},
    {"kimi-k2", {NULL}, 0, 0, 1},
};

/* The names llama.cpp knows but whose split is custom code this loader does not reproduce. */
static const char *const PRE_REFUSED[] = {"superbpe", "afmoe"};

static int name_in(const char *list, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, '|');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !memcmp(p, name, n))
            return 1;
        if (!e)
            break;
        p = e + 1;
    }
    return 0;
}

/* Texts llama.cpp treats as control tokens whatever their stored type (end of turn, FIM). */
static int control_looking(const char *s)
{
    static const char *const T[] = {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
        "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
        "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
        "<PRE>", "<SUF>", "<MID>", "<|code_prefix|>", "<|code_suffix|>", "<|code_middle|>",
    };
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++)
        if (!strcmp(s, T[i]))
            return 1;
    return 0;
}

/* ---- building ------------------------------------------------------------------------------------ */

typedef struct {
    bpe *t;
    const gguf_file *g;
    const char *file;
    char *err;
    size_t errlen;
} gl;

#define GFAIL(code, ...) td_err(L->err, L->errlen, code, __VA_ARGS__)

static int add_pretok_re(gl *L, const char *re)
{
    bpe *t = L->t;
    bpe_pretok *p = realloc(t->pretok, (size_t)(t->n_pretok + 1) * sizeof *p);
    if (!p)
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    t->pretok = p;
    bpe_pretok *q = &t->pretok[t->n_pretok++];
    memset(q, 0, sizeof *q);
    if (!re) {
        q->kind = BPE_PT_BYTELEVEL;
        return 0;
    }
    q->kind = BPE_PT_SPLIT;
    q->behavior = BPE_ISOLATED;
    return bpe_compile_regex(t, re, strlen(re), "tokenizer.ggml.pre", &q->pat.re, L->err, L->errlen);
}

static int add_dec(gl *L, int kind)
{
    bpe *t = L->t;
    bpe_dec *p = realloc(t->dec, (size_t)(t->n_dec + 1) * sizeof *p);
    if (!p)
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    t->dec = p;
    bpe_dec *d = &t->dec[t->n_dec++];
    memset(d, 0, sizeof *d);
    d->kind = kind;
    t->has_decoder = 1;
    return 0;
}

static int add_norm(gl *L, int kind, const char *str)
{
    bpe *t = L->t;
    bpe_norm *p = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *p);
    if (!p)
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    t->norm = p;
    bpe_norm *n = &t->norm[t->n_norm++];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->str_len = strlen(str);
    if (!(n->str = strdup(str)))
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    return 0;
}

/* gpt2: tokenizer.ggml.merges, rank = index; the first of a repeated pair wins (std::map::emplace). */
static int load_merges(gl *L)
{
    bpe *t = L->t;
    const gguf_kv *kv;
    int rc = gguf_get_arr(L->g, "tokenizer.ggml.merges", GGUF_V_STR, &kv, L->err, L->errlen);
    if (rc)
        return rc;
    if (kv->arr_n > (uint64_t)GG_MAX_IDS * 4)
        return GFAIL(TANDEM_EFORMAT, "%s: tokenizer.ggml.merges has %llu entries", L->file,
                     (unsigned long long)kv->arr_n);
    bpe_buf tmp = {0};
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        size_t len;
        const char *s = gguf_arr_str(kv, i, &len);
        const char *sp = s && len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        if (!sp)
            continue; /* llama.cpp files it as ("", ""), which never matches */
        size_t na = (size_t)(sp - s), nb = len - na - 1;
        int32_t ia = bpe_strmap_get(&t->vocab, s, na), ib = bpe_strmap_get(&t->vocab, sp + 1, nb), r, m;
        tmp.n = 0;
        if (bpe_buf_put(&tmp, s, na) || bpe_buf_put(&tmp, sp + 1, nb)) {
            bpe_buf_free(&tmp);
            return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
        }
        int32_t im = bpe_strmap_get(&t->vocab, tmp.p, tmp.n);
        if (ia < 0 || ib < 0 || im < 0 || bpe_pairmap_get(&t->merges, ia, ib, &r, &m))
            continue;
        if (bpe_pairmap_put(&t->merges, ia, ib, (int32_t)i, im)) {
            bpe_buf_free(&tmp);
            return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
        }
    }
    bpe_buf_free(&tmp);
    return 0;
}

typedef struct {
    float score;
    int32_t id;
} scored;

static int cmp_score_desc(const void *a, const void *b)
{
    float x = ((const scored *)a)->score, y = ((const scored *)b)->score;
    return x > y ? -1 : x < y;
}

/* llama (SPM): every split of a token into two tokens at a character boundary is a merge, ranked
 * by the token's score (higher first; equal scores share a rank). */
static int spm_merges(gl *L, const gguf_kv *scores)
{
    bpe *t = L->t;
    size_t n = t->vocab.n;
    scored *v = malloc((n ? n : 1) * sizeof *v);
    int32_t *rank = malloc((size_t)(t->n_vocab > 0 ? t->n_vocab : 1) * sizeof *rank);
    if (!v || !rank) {
        free(v);
        free(rank);
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    }
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->vocab.ent[i].val;
        v[i].id = id;
        v[i].score = scores ? (float)gguf_arr_f64(scores, (uint64_t)id) : 0.0f;
        if (v[i].score != v[i].score)
            v[i].score = -3.4e38f; /* a NaN score never wins a merge */
    }
    qsort(v, n, sizeof *v, cmp_score_desc);
    int32_t r = 0;
    for (size_t i = 0; i < n; i++) {
        if (i && v[i].score != v[i - 1].score)
            r++;
        rank[v[i].id] = r;
    }
    free(v);
    for (size_t i = 0; i < n; i++) {
        const char *k = bpe_strmap_key(&t->vocab, i);
        size_t kl = t->vocab.ent[i].len, b = 0;
        int32_t id = t->vocab.ent[i].val;
        for (;;) {
            size_t adv = 1;
            while (b + adv < kl && ((unsigned char)k[b + adv] & 0xC0) == 0x80)
                adv++;
            b += adv;
            if (b >= kl)
                break;
            int32_t ia = bpe_strmap_get(&t->vocab, k, b), ib = bpe_strmap_get(&t->vocab, k + b, kl - b);
            if (ia >= 0 && ib >= 0 && bpe_pairmap_put(&t->merges, ia, ib, rank[id], id)) {
                free(rank);
                return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
            }
        }
    }
    free(rank);
    return 0;
}

/* A special id key: absent keeps the default; out of range keeps it too (llama.cpp warns). */
static int special_id(gl *L, const char *key, int32_t *id)
{
    uint32_t v;
    int rc = gguf_get_u32_opt(L->g, key, &v, L->err, L->errlen);
    if (rc < 0)
        return rc;
    if (rc == 0 && v < (uint32_t)L->t->n_vocab)
        *id = (int32_t)v;
    return 0;
}

static int load_tokens(gl *L, int spm, const gguf_kv **scores_out)
{
    bpe *t = L->t;
    const gguf_kv *tok, *tt = NULL, *sc = NULL;
    int rc;
    if ((rc = gguf_get_arr(L->g, "tokenizer.ggml.tokens", GGUF_V_STR, &tok, L->err, L->errlen)))
        return rc;
    if (tok->arr_n == 0 || tok->arr_n > GG_MAX_IDS)
        return GFAIL(TANDEM_EFORMAT, "%s: tokenizer.ggml.tokens has %llu entries (1..%d accepted)", L->file,
                     (unsigned long long)tok->arr_n, GG_MAX_IDS);
    uint64_t n = tok->arr_n;
    if ((rc = gguf_get_arr_opt(L->g, "tokenizer.ggml.token_type", -1, &tt, L->err, L->errlen)) < 0 ||
        (rc = gguf_get_arr_opt(L->g, "tokenizer.ggml.scores", -1, &sc, L->err, L->errlen)) < 0)
        return rc;
    if (tt && (tt->arr_n != n || tt->arr_type == GGUF_V_STR))
        return GFAIL(TANDEM_EFORMAT, "%s: tokenizer.ggml.token_type must be %llu integers", L->file,
                     (unsigned long long)n);
    if (sc && (sc->arr_n != n || sc->arr_type == GGUF_V_STR))
        return GFAIL(TANDEM_EFORMAT, "%s: tokenizer.ggml.scores must be %llu numbers", L->file, (unsigned long long)n);
    *scores_out = sc;
    t->n_vocab = (int32_t)n;
    /* the added-token table holds the control / user-defined / unknown ones only: count them first
     * (control-looking texts included) so a large vocabulary costs no table of its size */
    uint64_t n_special = 0;
    for (uint64_t i = 0; i < n; i++) {
        int type = tt ? (int)gguf_arr_i64(tt, i) : TT_NORMAL;
        const char *s = gguf_arr_str(tok, i, NULL);
        n_special += type == TT_CONTROL || type == TT_USER || type == TT_UNKNOWN || (s && control_looking(s));
    }
    if (!(t->added = calloc((size_t)(n_special ? n_special : 1), sizeof *t->added)))
        return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
    char empty[32];
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        const char *s = gguf_arr_str(tok, i, &len);
        if (!s || !len) { /* llama.cpp renames empty tokens so that every id has a text */
            len = (size_t)snprintf(empty, sizeof empty, "[EMPTY_%llu]", (unsigned long long)i);
            s = empty;
        }
        if (memchr(s, 0, len))
            return GFAIL(TANDEM_EFORMAT, "%s: tokenizer.ggml.tokens[%llu] holds a NUL byte", L->file,
                         (unsigned long long)i);
        int type = tt ? (int)gguf_arr_i64(tt, i) : TT_NORMAL;
        if (type != TT_CONTROL && control_looking(s))
            type = TT_CONTROL;
        if (bpe_strmap_put(&t->vocab, s, len, (int32_t)i))
            return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
        if (spm && type == TT_BYTE && len == 6 && !memcmp(s, "<0x", 3) && s[5] == '>') {
            unsigned v;
            if (sscanf(s + 3, "%2x", &v) == 1)
                t->byte_tok[v & 0xFF] = (int32_t)i;
        }
        if (type == TT_CONTROL || type == TT_USER || type == TT_UNKNOWN) {
            bpe_added *x = &t->added[t->n_added];
            if (!(x->content = malloc(len + 1)))
                return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
            memcpy(x->content, s, len);
            x->content[len] = 0;
            x->len = len;
            x->id = (int32_t)i;
            x->special = type != TT_USER;
            if (bpe_strmap_put(&t->added_map, s, len, t->n_added))
                return GFAIL(TANDEM_ENOMEM, "%s: out of memory", L->file);
            t->n_added++;
        }
    }
    return 0;
}

int32_t bpe_bos_id(const bpe *t) { return t->bos_id; }
int32_t bpe_eos_id(const bpe *t) { return t->eos_id; }

int bpe_load_gguf(bpe **out, const gguf_file *g, char *err, size_t errlen)
{
    *out = NULL;
    const char *file = gguf_path(g);
    bpe *t = calloc(1, sizeof *t);
    if (!t || !(t->name = strdup(file))) {
        free(t);
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
    }
    gl L0 = {t, g, file, err, errlen}, *L = &L0;
    const char *model = NULL, *pre = NULL;
    const gguf_kv *scores = NULL;
    int rc, spm;
    t->unk_id = t->bos_id = t->eos_id = -1;
    for (int i = 0; i < 256; i++)
        t->byte_tok[i] = -1;
    if ((rc = gguf_get_str(g, "tokenizer.ggml.model", &model, err, errlen)))
        goto fail;
    if (!strcmp(model, "gpt2")) {
        spm = 0;
    } else if (!strcmp(model, "llama")) {
        spm = 1;
    } else {
        rc = td_err(err, errlen, TANDEM_EUNSUPPORTED,
                    "%s: tokenizer.ggml.model '%s' is not supported (gpt2 and llama are)", file, model);
        goto fail;
    }
    if ((rc = load_tokens(L, spm, &scores)))
        goto fail;

    /* defaults of llama.cpp's vocabulary kinds, then the file's keys */
    int32_t bos = spm ? 1 : 11, eos = spm ? 2 : 11, unk = spm ? 0 : -1;
    int add_bos = spm, add_eos = 0, add_space = spm;
    const pre_type *pt = NULL;
    if (!spm) {
        if ((rc = gguf_get_str_opt(g, "tokenizer.ggml.pre", &pre, err, errlen)) < 0)
            goto fail;
        for (size_t i = 0; pre && i < sizeof PRE_REFUSED / sizeof PRE_REFUSED[0]; i++) {
            if (!strcmp(pre, PRE_REFUSED[i])) {
                rc = td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: tokenizer.ggml.pre '%s' is not supported yet",
                            file, pre);
                goto fail;
            }
        }
        for (size_t i = 0; pre && !pt && i < sizeof PRE / sizeof PRE[0]; i++)
            if (name_in(PRE[i].names, pre))
                pt = &PRE[i];
        if (!pt) { /* as llama.cpp: a missing or unknown name splits like GPT-2's "default" */
            if (pre)
                td_log(TD_LOG_WARN, "%s: tokenizer.ggml.pre '%s' is unknown; splitting as 'default' (as llama.cpp does)",
                       file, pre);
            pt = &PRE[0];
        }
        add_bos = pt->add_bos;
        t->ignore_merges = pt->ignore_merges;
        if (name_in("glm4|chatglm-bpe", pre ? pre : ""))
            bos = -1;
    }
    if (bos >= t->n_vocab)
        bos = -1;
    if (eos >= t->n_vocab)
        eos = -1;
    if (unk >= t->n_vocab)
        unk = -1;
    if ((rc = special_id(L, "tokenizer.ggml.bos_token_id", &bos)) ||
        (rc = special_id(L, "tokenizer.ggml.eos_token_id", &eos)) ||
        (rc = special_id(L, "tokenizer.ggml.unknown_token_id", &unk)))
        goto fail;
    if ((rc = gguf_get_bool_opt(g, "tokenizer.ggml.add_bos_token", &add_bos, err, errlen)) < 0 ||
        (rc = gguf_get_bool_opt(g, "tokenizer.ggml.add_eos_token", &add_eos, err, errlen)) < 0 ||
        (rc = gguf_get_bool_opt(g, "tokenizer.ggml.add_space_prefix", &add_space, err, errlen)) < 0)
        goto fail;

    if (spm) {
        t->byte_fallback = 1;
        t->unk_id = unk;
        if ((rc = spm_merges(L, scores)))
            goto fail;
        if ((add_space && (rc = add_norm(L, BPE_NORM_PREPEND, "\xe2\x96\x81"))) ||
            (rc = add_norm(L, BPE_NORM_REPLACE, "\xe2\x96\x81")))
            goto fail;
        /* the Replace normalizer's pattern: a literal space */
        bpe_norm *rn = &t->norm[t->n_norm - 1];
        if (!(rn->pat.lit = strdup(" "))) {
            rc = td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
            goto fail;
        }
        rn->pat.lit_len = 1;
        if ((rc = add_dec(L, BPE_DEC_REPLACE)))
            goto fail;
        bpe_dec *rd = &t->dec[t->n_dec - 1];
        if (!(rd->pat.lit = strdup("\xe2\x96\x81")) || !(rd->str = strdup(" "))) {
            rc = td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
            goto fail;
        }
        rd->pat.lit_len = 3;
        rd->str_len = 1;
        if ((rc = add_dec(L, BPE_DEC_BYTEFALLBACK)) || (rc = add_dec(L, BPE_DEC_FUSE)))
            goto fail;
        t->dec_bytefallback = 1;
        if (add_space) { /* the prefix space comes off again when decoding, as llama.cpp does */
            if ((rc = add_dec(L, BPE_DEC_STRIP)))
                goto fail;
            t->dec[t->n_dec - 1].cp = ' ';
            t->dec[t->n_dec - 1].start = 1;
        }
    } else {
        if ((rc = load_merges(L)))
            goto fail;
        if (pt->kimi) {
            if ((rc = add_pretok_re(L, bpe_kimi_pattern())))
                goto fail;
        } else {
            for (int i = 0; i < 6 && pt->re[i]; i++)
                if ((rc = add_pretok_re(L, pt->re[i])))
                    goto fail;
        }
        if ((rc = add_pretok_re(L, NULL)) || (rc = add_dec(L, BPE_DEC_BYTELEVEL)))
            goto fail;
        t->dec_bytelevel = 1;
    }
    if ((add_bos && bos >= 0 && !(t->post_prefix = malloc(sizeof *t->post_prefix))) ||
        (add_eos && eos >= 0 && !(t->post_suffix = malloc(sizeof *t->post_suffix)))) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
        goto fail;
    }
    t->bos_id = bos;
    t->eos_id = eos;
    if (add_bos && bos >= 0)
        t->post_prefix[t->n_post_prefix++] = bos;
    if (add_eos && eos >= 0)
        t->post_suffix[t->n_post_suffix++] = eos;
    if ((rc = bpe_index_tokens(t, err, errlen)))
        goto fail;
    *out = t;
    return 0;
fail:
    bpe_free(t);
    return rc;
}
