/*
 * bpe_load.c - tokenizer.json -> struct bpe.
 *
 * Every field read is checked: a missing or mistyped field is an error naming the file and the
 * JSON path ("tokenizer.json: model.merges[12]: token 'xy' is not in the vocabulary"), a type
 * this code does not implement is an error saying so. Sequences (normalizer, pre_tokenizer,
 * decoder, post_processor) are flattened into plain step lists at load.
 *
 * Regexes come from Oniguruma (Ruby syntax) in `tokenizers`; translate_regex() rewrites the few
 * escapes whose meaning differs in PCRE2 before compiling (see bpe.h).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>

#include "core/err.h"
#include "tokenizer/bpe_impl.h"
#include "tokenizer/utf8.h"

#define MAX_IDS (1 << 24) /* largest vocabulary accepted: ids index dense arrays */

typedef struct {
    bpe *t;
    char *err;
    size_t errlen;
} ld;

#define FAIL(code, ...) td_err(L->err, L->errlen, code, __VA_ARGS__)

/* ---- small JSON accessors ------------------------------------------------ */

static int get_bool(ld *L, json_t *o, const char *key, const char *path, int dflt, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v))
        return FAIL(TANDEM_EFORMAT, "%s: %s.%s must be true or false", L->t->name, path, key);
    *out = json_is_true(v);
    return 0;
}

static int get_int(ld *L, json_t *o, const char *key, const char *path, int dflt, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 1000000)
        return FAIL(TANDEM_EFORMAT, "%s: %s.%s must be a small non-negative integer", L->t->name,
                    path, key);
    *out = (int)json_integer_value(v);
    return 0;
}

/* A string field; NULL (and 0) when absent or null and !required. */
static int get_str(ld *L, json_t *o, const char *key, const char *path, int required,
                   const char **out, size_t *len)
{
    json_t *v = json_object_get(o, key);
    *out = NULL;
    *len = 0;
    if (!v || json_is_null(v)) {
        if (required)
            return FAIL(TANDEM_EFORMAT, "%s: %s.%s is missing", L->t->name, path, key);
        return 0;
    }
    if (!json_is_string(v))
        return FAIL(TANDEM_EFORMAT, "%s: %s.%s must be a string", L->t->name, path, key);
    *out = json_string_value(v);
    *len = json_string_length(v);
    return 0;
}

static char *dup_n(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

/* A single character field (Strip content, Metaspace replacement). */
static int get_char(ld *L, json_t *o, const char *key, const char *path, const char *dflt,
                    uint32_t *cp, char *utf8, int *utf8_len)
{
    const char *s;
    size_t n, adv = 0;
    int rc = get_str(L, o, key, path, 0, &s, &n);
    if (rc)
        return rc;
    if (!s) {
        s = dflt;
        n = strlen(dflt);
    }
    int32_t c = n ? utf8_decode(s, n, &adv) : -1;
    if (c < 0 || adv != n)
        return FAIL(TANDEM_EFORMAT, "%s: %s.%s must be exactly one character", L->t->name, path,
                    key);
    *cp = (uint32_t)c;
    if (utf8) {
        memcpy(utf8, s, n);
        *utf8_len = (int)n;
    }
    return 0;
}

/* ---- regexes ------------------------------------------------------------- */

/* Rewrite an Oniguruma pattern into PCRE2 syntax with the same meaning for the escapes that
 * differ: \s \S (Oniguruma: the White_Space property), \w \W (Oniguruma: L, M, Nd, Pc),
 * \h \H (Oniguruma: hex digit). \S \W \H inside a character class keep PCRE2's meaning. */
static char *translate_regex(const char *src, size_t len, size_t *out_len)
{
    /* Unicode White_Space exactly: PCRE2's \s misses U+0085 and adds U+180E */
    static const char *WS = "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}"
                            "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
    static const char *WORD = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}", *HEX = "0-9a-fA-F";
    bpe_buf b = {0};
    int in_class = 0;
    size_t class_start = 0;
    for (size_t i = 0; i < len; i++) {
        char c = src[i];
        int ok = 0;
        if (c == '\\' && i + 1 < len) {
            char e = src[++i];
            const char *set = e == 's' || e == 'S' ? WS : e == 'w' || e == 'W' ? WORD
                            : e == 'h' || e == 'H' ? HEX : NULL;
            int neg = e == 'S' || e == 'W' || e == 'H';
            if (set && !in_class) {
                ok = !bpe_buf_put(&b, neg ? "[^" : "[", neg ? 2 : 1) &&
                     !bpe_buf_put(&b, set, strlen(set)) && !bpe_buf_put(&b, "]", 1);
            } else if (set && !neg) {
                ok = !bpe_buf_put(&b, set, strlen(set));
            } else {
                char two[2] = {'\\', e};
                ok = !bpe_buf_put(&b, two, 2);
            }
        } else {
            if (!in_class && c == '[') {
                in_class = 1;
                class_start = i + 1;
                if (class_start < len && src[class_start] == '^')
                    class_start++;
            } else if (in_class && c == ']' && i > class_start) {
                in_class = 0;
            }
            ok = !bpe_buf_put(&b, &c, 1);
        }
        if (!ok) {
            bpe_buf_free(&b);
            return NULL;
        }
    }
    if (bpe_buf_put(&b, "", 0)) {
        bpe_buf_free(&b);
        return NULL;
    }
    *out_len = b.n;
    return b.p;
}

static int compile_regex(ld *L, const char *src, size_t len, const char *path, pcre2_code **out)
{
    size_t n;
    char *pat = translate_regex(src, len, &n);
    if (!pat)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", L->t->name);
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, n, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE,
                                   &ec, &eo, NULL);
    free(pat);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return FAIL(TANDEM_EFORMAT, "%s: %s: regex /%.*s/ does not compile: %s (offset %zu)",
                    L->t->name, path, (int)(len > 200 ? 200 : len), src, (const char *)msg,
                    (size_t)eo);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: the interpreter is the fallback */
    *out = re;
    return 0;
}

/* {"Regex": "..."} or {"String": "..."} */
static int get_pattern(ld *L, json_t *o, const char *path, bpe_pattern *p)
{
    json_t *v = json_object_get(o, "pattern");
    json_t *re = json_object_get(v, "Regex"), *lit = json_object_get(v, "String");
    if (json_is_string(re))
        return compile_regex(L, json_string_value(re), json_string_length(re), path, &p->re);
    if (json_is_string(lit)) {
        p->lit_len = json_string_length(lit);
        if (!(p->lit = dup_n(json_string_value(lit), p->lit_len)))
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", L->t->name);
        return 0;
    }
    return FAIL(TANDEM_EFORMAT, "%s: %s.pattern must be {\"Regex\": ...} or {\"String\": ...}",
                L->t->name, path);
}

static void pattern_free(bpe_pattern *p)
{
    pcre2_code_free(p->re);
    free(p->lit);
}

static const char *type_of(json_t *o)
{
    const char *s = json_string_value(json_object_get(o, "type"));
    return s ? s : "";
}

/* ---- normalizers --------------------------------------------------------- */

static int add_norm(ld *L, json_t *o, const char *path)
{
    bpe *t = L->t;
    if (!json_is_object(o))
        return FAIL(TANDEM_EFORMAT, "%s: %s must be an object", t->name, path);
    const char *ty = type_of(o);
    char sub[160];
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "normalizers");
        if (!json_is_array(a))
            return FAIL(TANDEM_EFORMAT, "%s: %s.normalizers must be an array", t->name, path);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(sub, sizeof sub, "%s.normalizers[%zu]", path, i);
            int rc = add_norm(L, json_array_get(a, i), sub);
            if (rc)
                return rc;
        }
        return 0;
    }
    bpe_norm *p = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *p);
    if (!p)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    t->norm = p;
    bpe_norm *n = &t->norm[t->n_norm];
    memset(n, 0, sizeof *n);
    static const struct { const char *name; int kind; } simple[] = {
        {"NFC", BPE_NORM_NFC}, {"NFD", BPE_NORM_NFD}, {"NFKC", BPE_NORM_NFKC},
        {"NFKD", BPE_NORM_NFKD}, {"Lowercase", BPE_NORM_LOWERCASE},
        {"StripAccents", BPE_NORM_STRIP_ACCENTS}, {"ByteLevel", BPE_NORM_BYTELEVEL},
    };
    for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++) {
        if (!strcmp(ty, simple[i].name)) {
            n->kind = simple[i].kind;
            t->n_norm++;
            return 0;
        }
    }
    const char *s;
    size_t len;
    int rc;
    if (!strcmp(ty, "Prepend")) {
        n->kind = BPE_NORM_PREPEND;
        if ((rc = get_str(L, o, "prepend", path, 1, &s, &len)))
            return rc;
    } else if (!strcmp(ty, "Replace")) {
        n->kind = BPE_NORM_REPLACE;
        t->n_norm++; /* owned from here on, so bpe_free releases the pattern */
        if ((rc = get_pattern(L, o, path, &n->pat)) || (rc = get_str(L, o, "content", path, 1, &s, &len)))
            return rc;
        t->n_norm--;
    } else if (!strcmp(ty, "Strip")) {
        n->kind = BPE_NORM_STRIP;
        if ((rc = get_bool(L, o, "strip_left", path, 1, &n->left)) ||
            (rc = get_bool(L, o, "strip_right", path, 1, &n->right)))
            return rc;
        t->n_norm++;
        return 0;
    } else {
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s type '%s' is not supported yet", t->name, path, ty);
    }
    t->n_norm++;
    n->str_len = len;
    if (!(n->str = dup_n(s, len)))
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    return 0;
}

/* ---- pre-tokenizers ------------------------------------------------------ */

static int get_behavior(ld *L, json_t *o, const char *path, int *out)
{
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    const char *s;
    size_t len;
    int rc = get_str(L, o, "behavior", path, 0, &s, &len);
    if (rc)
        return rc;
    if (!s) {
        *out = BPE_ISOLATED;
        return 0;
    }
    for (int i = 0; i < 5; i++) {
        if (!strcmp(s, names[i])) {
            *out = i; /* same order as BPE_REMOVED.. */
            return 0;
        }
    }
    return FAIL(TANDEM_EUNSUPPORTED, "%s: %s.behavior '%s' is not supported yet", L->t->name,
                path, s);
}

static int get_prepend_scheme(ld *L, json_t *o, const char *path, int *out)
{
    const char *s;
    size_t len;
    int rc = get_str(L, o, "prepend_scheme", path, 0, &s, &len);
    if (rc)
        return rc;
    if (!s) { /* files written before prepend_scheme existed */
        int aps;
        if ((rc = get_bool(L, o, "add_prefix_space", path, 1, &aps)))
            return rc;
        *out = aps ? BPE_PREPEND_ALWAYS : BPE_PREPEND_NEVER;
        return 0;
    }
    if (!strcmp(s, "always"))
        *out = BPE_PREPEND_ALWAYS;
    else if (!strcmp(s, "first"))
        *out = BPE_PREPEND_FIRST;
    else if (!strcmp(s, "never"))
        *out = BPE_PREPEND_NEVER;
    else
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s.prepend_scheme '%s' is not supported yet",
                    L->t->name, path, s);
    return 0;
}

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char WORD_RE[] = "\\w+|[^\\w\\s]+";

static int add_pretok(ld *L, json_t *o, const char *path)
{
    bpe *t = L->t;
    if (!json_is_object(o))
        return FAIL(TANDEM_EFORMAT, "%s: %s must be an object", t->name, path);
    const char *ty = type_of(o);
    char sub[160];
    int rc;
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "pretokenizers");
        if (!json_is_array(a))
            return FAIL(TANDEM_EFORMAT, "%s: %s.pretokenizers must be an array", t->name, path);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(sub, sizeof sub, "%s.pretokenizers[%zu]", path, i);
            if ((rc = add_pretok(L, json_array_get(a, i), sub)))
                return rc;
        }
        return 0;
    }
    bpe_pretok *p = realloc(t->pretok, (size_t)(t->n_pretok + 1) * sizeof *p);
    if (!p)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    t->pretok = p;
    bpe_pretok *q = &t->pretok[t->n_pretok];
    memset(q, 0, sizeof *q);
    t->n_pretok++; /* owned from here on */
    if (!strcmp(ty, "Split")) {
        q->kind = BPE_PT_SPLIT;
        if ((rc = get_pattern(L, o, path, &q->pat)) || (rc = get_behavior(L, o, path, &q->behavior)) ||
            (rc = get_bool(L, o, "invert", path, 0, &q->invert)))
            return rc;
    } else if (!strcmp(ty, "ByteLevel")) {
        q->kind = BPE_PT_BYTELEVEL;
        if ((rc = get_bool(L, o, "add_prefix_space", path, 1, &q->add_prefix_space)) ||
            (rc = get_bool(L, o, "use_regex", path, 1, &q->use_regex)))
            return rc;
        if (q->use_regex && !t->re_gpt2 &&
            (rc = compile_regex(L, GPT2_RE, sizeof GPT2_RE - 1, path, &t->re_gpt2)))
            return rc;
    } else if (!strcmp(ty, "Digits")) {
        q->kind = BPE_PT_DIGITS;
        if ((rc = get_bool(L, o, "individual_digits", path, 0, &q->individual)))
            return rc;
    } else if (!strcmp(ty, "Metaspace")) {
        q->kind = BPE_PT_METASPACE;
        uint32_t cp;
        if ((rc = get_char(L, o, "replacement", path, "\xe2\x96\x81", &cp, q->repl, &q->repl_len)) ||
            (rc = get_prepend_scheme(L, o, path, &q->prepend)) ||
            (rc = get_bool(L, o, "split", path, 1, &q->split)))
            return rc;
    } else if (!strcmp(ty, "Whitespace")) {
        q->kind = BPE_PT_WHITESPACE;
        if (!t->re_word && (rc = compile_regex(L, WORD_RE, sizeof WORD_RE - 1, path, &t->re_word)))
            return rc;
    } else if (!strcmp(ty, "WhitespaceSplit")) {
        q->kind = BPE_PT_WHITESPACE_SPLIT;
    } else if (!strcmp(ty, "Punctuation")) {
        q->kind = BPE_PT_PUNCT;
        if ((rc = get_behavior(L, o, path, &q->behavior)))
            return rc;
    } else if (!strcmp(ty, "BertPreTokenizer")) {
        q->kind = BPE_PT_BERT;
    } else {
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s type '%s' is not supported yet", t->name, path, ty);
    }
    return 0;
}

/* ---- decoders ------------------------------------------------------------ */

static int add_dec(ld *L, json_t *o, const char *path)
{
    bpe *t = L->t;
    if (!json_is_object(o))
        return FAIL(TANDEM_EFORMAT, "%s: %s must be an object", t->name, path);
    const char *ty = type_of(o);
    char sub[160];
    int rc;
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "decoders");
        if (!json_is_array(a))
            return FAIL(TANDEM_EFORMAT, "%s: %s.decoders must be an array", t->name, path);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(sub, sizeof sub, "%s.decoders[%zu]", path, i);
            if ((rc = add_dec(L, json_array_get(a, i), sub)))
                return rc;
        }
        return 0;
    }
    bpe_dec *p = realloc(t->dec, (size_t)(t->n_dec + 1) * sizeof *p);
    if (!p)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    t->dec = p;
    bpe_dec *d = &t->dec[t->n_dec];
    memset(d, 0, sizeof *d);
    t->n_dec++;
    const char *s = NULL;
    size_t len = 0;
    if (!strcmp(ty, "ByteLevel")) {
        d->kind = BPE_DEC_BYTELEVEL;
        t->dec_bytelevel = 1;
    } else if (!strcmp(ty, "ByteFallback")) {
        d->kind = BPE_DEC_BYTEFALLBACK;
        t->dec_bytefallback = 1;
    } else if (!strcmp(ty, "Fuse")) {
        d->kind = BPE_DEC_FUSE;
    } else if (!strcmp(ty, "Replace")) {
        d->kind = BPE_DEC_REPLACE;
        if ((rc = get_pattern(L, o, path, &d->pat)) || (rc = get_str(L, o, "content", path, 1, &s, &len)))
            return rc;
    } else if (!strcmp(ty, "Strip")) {
        d->kind = BPE_DEC_STRIP;
        if ((rc = get_char(L, o, "content", path, " ", &d->cp, NULL, NULL)) ||
            (rc = get_int(L, o, "start", path, 0, &d->start)) ||
            (rc = get_int(L, o, "stop", path, 0, &d->stop)))
            return rc;
    } else if (!strcmp(ty, "Metaspace")) {
        d->kind = BPE_DEC_METASPACE;
        if ((rc = get_char(L, o, "replacement", path, "\xe2\x96\x81", &d->cp, NULL, NULL)) ||
            (rc = get_prepend_scheme(L, o, path, &d->prepend)))
            return rc;
    } else if (!strcmp(ty, "BPEDecoder")) {
        d->kind = BPE_DEC_BPE;
        if ((rc = get_str(L, o, "suffix", path, 0, &s, &len)))
            return rc;
        if (!s) {
            s = "</w>";
            len = 4;
        }
    } else {
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s type '%s' is not supported yet", t->name, path, ty);
    }
    if (s) {
        d->str_len = len;
        if (!(d->str = dup_n(s, len)))
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    }
    return 0;
}

/* ---- post-processors ----------------------------------------------------- */

static int ids_append(ld *L, int32_t **v, int *n, const int32_t *src, int k, int front)
{
    int32_t *p = realloc(*v, (size_t)(*n + k + 1) * sizeof *p);
    if (!p)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", L->t->name);
    if (front) {
        memmove(p + k, p, (size_t)*n * sizeof *p);
        memcpy(p, src, (size_t)k * sizeof *p);
    } else {
        memcpy(p + *n, src, (size_t)k * sizeof *p);
    }
    *v = p;
    *n += k;
    return 0;
}

static int check_id(ld *L, json_t *v, const char *path, int32_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MAX_IDS)
        return FAIL(TANDEM_EFORMAT, "%s: %s must be a token id", L->t->name, path);
    *out = (int32_t)json_integer_value(v);
    return 0;
}

/* [prefix..., A, suffix...] of a TemplateProcessing "single" template */
static int post_template(ld *L, json_t *o, const char *path, int32_t *pre, int *npre, int32_t *suf,
                         int *nsuf, int cap)
{
    json_t *single = json_object_get(o, "single"), *sp = json_object_get(o, "special_tokens");
    if (!json_is_array(single))
        return FAIL(TANDEM_EFORMAT, "%s: %s.single must be an array of pieces", L->t->name, path);
    int seen_a = 0;
    for (size_t i = 0; i < json_array_size(single); i++) {
        json_t *piece = json_array_get(single, i);
        json_t *st = json_object_get(piece, "SpecialToken"), *sq = json_object_get(piece, "Sequence");
        if (sq) {
            const char *seq = json_string_value(json_object_get(sq, "id"));
            if (seen_a || !seq || strcmp(seq, "A"))
                return FAIL(TANDEM_EUNSUPPORTED, "%s: %s.single[%zu]: only one $A sequence is "
                            "supported", L->t->name, path, i);
            seen_a = 1;
            continue;
        }
        const char *name = json_string_value(json_object_get(st, "id"));
        json_t *ent = name ? json_object_get(sp, name) : NULL, *ids = json_object_get(ent, "ids");
        if (!name)
            return FAIL(TANDEM_EFORMAT, "%s: %s.single[%zu] must be a SpecialToken or Sequence",
                        L->t->name, path, i);
        if (!json_is_array(ids))
            return FAIL(TANDEM_EFORMAT, "%s: %s.special_tokens has no ids for '%s'", L->t->name,
                        path, name);
        for (size_t k = 0; k < json_array_size(ids); k++) {
            int32_t id;
            int rc = check_id(L, json_array_get(ids, k), path, &id);
            if (rc)
                return rc;
            int *n = seen_a ? nsuf : npre;
            if (*n >= cap)
                return FAIL(TANDEM_EUNSUPPORTED, "%s: %s: more than %d special tokens", L->t->name,
                            path, cap);
            (seen_a ? suf : pre)[(*n)++] = id;
        }
    }
    if (!seen_a)
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s.single has no $A sequence", L->t->name, path);
    return 0;
}

static int add_post(ld *L, json_t *o, const char *path)
{
    bpe *t = L->t;
    if (!json_is_object(o))
        return FAIL(TANDEM_EFORMAT, "%s: %s must be an object", t->name, path);
    const char *ty = type_of(o);
    char sub[160];
    int rc;
    enum { CAP = 64 };
    int32_t pre[CAP], suf[CAP];
    int npre = 0, nsuf = 0;
    if (!strcmp(ty, "Sequence")) {
        json_t *a = json_object_get(o, "processors");
        if (!json_is_array(a))
            return FAIL(TANDEM_EFORMAT, "%s: %s.processors must be an array", t->name, path);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(sub, sizeof sub, "%s.processors[%zu]", path, i);
            if ((rc = add_post(L, json_array_get(a, i), sub)))
                return rc;
        }
        return 0;
    } else if (!strcmp(ty, "ByteLevel")) {
        return 0; /* only trims offsets */
    } else if (!strcmp(ty, "TemplateProcessing")) {
        if ((rc = post_template(L, o, path, pre, &npre, suf, &nsuf, CAP)))
            return rc;
    } else if (!strcmp(ty, "BertProcessing") || !strcmp(ty, "RobertaProcessing")) {
        json_t *cls = json_object_get(o, "cls"), *sep = json_object_get(o, "sep");
        snprintf(sub, sizeof sub, "%s.cls[1]", path);
        if ((rc = check_id(L, json_array_get(cls, 1), sub, &pre[0])))
            return rc;
        snprintf(sub, sizeof sub, "%s.sep[1]", path);
        if ((rc = check_id(L, json_array_get(sep, 1), sub, &suf[0])))
            return rc;
        npre = nsuf = 1;
    } else {
        return FAIL(TANDEM_EUNSUPPORTED, "%s: %s type '%s' is not supported yet", t->name, path, ty);
    }
    /* a later processor wraps what the earlier ones produced */
    if ((rc = ids_append(L, &t->post_prefix, &t->n_post_prefix, pre, npre, 1)) ||
        (rc = ids_append(L, &t->post_suffix, &t->n_post_suffix, suf, nsuf, 0)))
        return rc;
    return 0;
}

/* ---- model --------------------------------------------------------------- */

static int load_model(ld *L, json_t *m)
{
    bpe *t = L->t;
    int rc;
    if (!json_is_object(m))
        return FAIL(TANDEM_EFORMAT, "%s: model is missing", t->name);
    const char *ty = json_string_value(json_object_get(m, "type"));
    if (ty && strcmp(ty, "BPE"))
        return FAIL(TANDEM_EUNSUPPORTED, "%s: model type '%s' is not supported yet", t->name, ty);
    json_t *drop = json_object_get(m, "dropout");
    if (drop && !json_is_null(drop) && json_number_value(drop) != 0.0)
        return FAIL(TANDEM_EUNSUPPORTED, "%s: model.dropout is not supported yet (must be null)",
                    t->name);
    json_t *vocab = json_object_get(m, "vocab");
    if (!json_is_object(vocab))
        return FAIL(TANDEM_EFORMAT, "%s: model.vocab must be an object", t->name);
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MAX_IDS)
            return FAIL(TANDEM_EFORMAT, "%s: model.vocab['%s'] must be an id in [0, %d)", t->name,
                        key, MAX_IDS);
        if (bpe_strmap_put(&t->vocab, key, strlen(key), (int32_t)json_integer_value(v)))
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    }
    if ((rc = get_bool(L, m, "fuse_unk", "model", 0, &t->fuse_unk)) ||
        (rc = get_bool(L, m, "byte_fallback", "model", 0, &t->byte_fallback)) ||
        (rc = get_bool(L, m, "ignore_merges", "model", 0, &t->ignore_merges)))
        return rc;
    const char *s;
    size_t len;
    t->unk_id = -1;
    if ((rc = get_str(L, m, "unk_token", "model", 0, &s, &len)))
        return rc;
    if (s && (t->unk_id = bpe_strmap_get(&t->vocab, s, len)) < 0)
        return FAIL(TANDEM_EFORMAT, "%s: model.unk_token '%s' is not in model.vocab", t->name, s);
    if ((rc = get_str(L, m, "continuing_subword_prefix", "model", 0, &s, &len)))
        return rc;
    if (s && len && !(t->cont_prefix = dup_n(s, t->cont_prefix_len = len)))
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    if ((rc = get_str(L, m, "end_of_word_suffix", "model", 0, &s, &len)))
        return rc;
    if (s && len && !(t->eow_suffix = dup_n(s, t->eow_suffix_len = len)))
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    for (int i = 0; i < 256; i++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", i);
        t->byte_tok[i] = bpe_strmap_get(&t->vocab, name, 6);
    }
    json_t *merges = json_object_get(m, "merges");
    if (!json_is_array(merges))
        return FAIL(TANDEM_EFORMAT, "%s: model.merges must be an array", t->name);
    bpe_buf tmp = {0};
    for (size_t i = 0; i < json_array_size(merges); i++) {
        json_t *e = json_array_get(merges, i);
        const char *a, *bb;
        size_t na, nb;
        if (json_is_string(e)) { /* "a b": split at the first space */
            a = json_string_value(e);
            const char *sp = memchr(a, ' ', json_string_length(e));
            if (!sp) {
                bpe_buf_free(&tmp);
                return FAIL(TANDEM_EFORMAT, "%s: model.merges[%zu] '%s' is not \"left right\"",
                            t->name, i, a);
            }
            na = (size_t)(sp - a);
            bb = sp + 1;
            nb = json_string_length(e) - na - 1;
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            na = json_string_length(json_array_get(e, 0));
            bb = json_string_value(json_array_get(e, 1));
            nb = json_string_length(json_array_get(e, 1));
        } else {
            bpe_buf_free(&tmp);
            return FAIL(TANDEM_EFORMAT, "%s: model.merges[%zu] must be \"a b\" or [\"a\", \"b\"]",
                        t->name, i);
        }
        int32_t ia = bpe_strmap_get(&t->vocab, a, na), ib = bpe_strmap_get(&t->vocab, bb, nb);
        if (ia < 0 || ib < 0) {
            bpe_buf_free(&tmp);
            return FAIL(TANDEM_EFORMAT, "%s: model.merges[%zu]: token '%.*s' is not in model.vocab",
                        t->name, i, (int)(ia < 0 ? na : nb), ia < 0 ? a : bb);
        }
        /* the merged token drops the right side's continuing_subword_prefix */
        size_t skip = t->cont_prefix && nb >= t->cont_prefix_len &&
                      !memcmp(bb, t->cont_prefix, t->cont_prefix_len) ? t->cont_prefix_len : 0;
        tmp.n = 0;
        if (bpe_buf_put(&tmp, a, na) || bpe_buf_put(&tmp, bb + skip, nb - skip)) {
            bpe_buf_free(&tmp);
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
        }
        int32_t im = bpe_strmap_get(&t->vocab, tmp.p, tmp.n);
        if (im < 0) {
            rc = FAIL(TANDEM_EFORMAT, "%s: model.merges[%zu]: merged token '%s' is not in "
                      "model.vocab", t->name, i, tmp.p);
            bpe_buf_free(&tmp);
            return rc;
        }
        if (bpe_pairmap_put(&t->merges, ia, ib, (int32_t)i, im)) {
            bpe_buf_free(&tmp);
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
        }
    }
    bpe_buf_free(&tmp);
    return 0;
}

/* ---- added tokens -------------------------------------------------------- */

static int load_added(ld *L, json_t *a)
{
    bpe *t = L->t;
    if (!a || json_is_null(a))
        return 0;
    if (!json_is_array(a))
        return FAIL(TANDEM_EFORMAT, "%s: added_tokens must be an array", t->name);
    size_t n = json_array_size(a);
    if (!(t->added = calloc(n ? n : 1, sizeof *t->added)))
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(a, i);
        char path[48];
        snprintf(path, sizeof path, "added_tokens[%zu]", i);
        bpe_added *x = &t->added[t->n_added];
        const char *s;
        size_t len;
        int rc, sp, sw, ls, rs, nz;
        if (!json_is_object(o))
            return FAIL(TANDEM_EFORMAT, "%s: %s must be an object", t->name, path);
        if ((rc = check_id(L, json_object_get(o, "id"), path, &x->id)) ||
            (rc = get_str(L, o, "content", path, 1, &s, &len)) ||
            (rc = get_bool(L, o, "special", path, 0, &sp)) ||
            (rc = get_bool(L, o, "single_word", path, 0, &sw)) ||
            (rc = get_bool(L, o, "lstrip", path, 0, &ls)) ||
            (rc = get_bool(L, o, "rstrip", path, 0, &rs)) ||
            (rc = get_bool(L, o, "normalized", path, !sp, &nz)))
            return rc;
        if (!(x->content = dup_n(s, len)))
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
        x->len = len;
        x->special = (uint8_t)sp;
        x->single_word = (uint8_t)sw;
        x->lstrip = (uint8_t)ls;
        x->rstrip = (uint8_t)rs;
        x->normalized = (uint8_t)nz;
        t->n_added++;
        if (bpe_strmap_put(&t->added_map, s, len, (int32_t)i))
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    }
    return 0;
}

/* Dense id tables and the two tries; needs the normalizer for normalized tokens. */
static int index_tokens(ld *L)
{
    bpe *t = L->t;
    int32_t max = -1;
    for (size_t i = 0; i < t->vocab.n; i++)
        if (t->vocab.ent[i].val > max)
            max = t->vocab.ent[i].val;
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].id > max)
            max = t->added[i].id;
    t->n_vocab = max + 1;
    size_t nv = (size_t)(max + 1 > 0 ? max + 1 : 1);
    t->model_ent = malloc(nv * sizeof *t->model_ent);
    t->added_of_id = malloc(nv * sizeof *t->added_of_id);
    t->norm_content = calloc((size_t)(t->n_added ? t->n_added : 1), sizeof *t->norm_content);
    if (!t->model_ent || !t->added_of_id || !t->norm_content)
        return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    for (size_t i = 0; i < nv; i++)
        t->model_ent[i] = t->added_of_id[i] = -1;
    for (size_t i = 0; i < t->vocab.n; i++)
        t->model_ent[t->vocab.ent[i].val] = (int32_t)i;
    for (int i = 0; i < t->n_added; i++) {
        bpe_added *x = &t->added[i];
        t->added_of_id[x->id] = i;
        int rc = 0;
        if (!x->normalized) {
            rc = bpe_trie_add(&t->trie_raw, x->content, x->len, i);
        } else {
            /* matched against normalized text, so its own content is normalized first */
            bpe_buf nb = {0};
            if (bpe_normalize(t, x->content, x->len, &nb) || bpe_buf_put(&nb, "", 0)) {
                bpe_buf_free(&nb);
                return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
            }
            t->norm_content[i] = nb.p;
            rc = bpe_trie_add(&t->trie_norm, nb.p, nb.n, i);
        }
        if (rc)
            return FAIL(TANDEM_ENOMEM, "%s: out of memory", t->name);
    }
    return 0;
}

/* ---- for the other loaders (bpe_tiktoken.c, bpe_gguf.c) ------------------ */

int bpe_compile_regex(bpe *t, const char *src, size_t len, const char *what, pcre2_code **out,
                      char *err, size_t errlen)
{
    ld L = {t, err, errlen};
    return compile_regex(&L, src, len, what, out);
}

int bpe_index_tokens(bpe *t, char *err, size_t errlen)
{
    ld L = {t, err, errlen};
    return index_tokens(&L);
}

/* ---- entry points -------------------------------------------------------- */

int bpe_load_from_string(bpe **out, const char *json, size_t len, const char *name, char *err,
                         size_t errlen)
{
    *out = NULL;
    if (!name)
        name = "tokenizer.json";
    bpe *t = calloc(1, sizeof *t);
    if (!t || !(t->name = dup_n(name, strlen(name)))) {
        free(t);
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", name);
    }
    t->bos_id = t->eos_id = -1;
    ld L0 = {t, err, errlen}, *L = &L0;
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_ALLOW_NUL, &je);
    int rc;
    if (!root) {
        rc = FAIL(TANDEM_EFORMAT, "%s: invalid JSON at line %d column %d: %s", name, je.line,
                  je.column, je.text);
        goto fail;
    }
    if (!json_is_object(root)) {
        rc = FAIL(TANDEM_EFORMAT, "%s: the top level must be a JSON object", name);
        goto fail;
    }
    json_t *x;
    if ((rc = load_model(L, json_object_get(root, "model"))) ||
        (rc = load_added(L, json_object_get(root, "added_tokens"))))
        goto fail;
    if ((x = json_object_get(root, "normalizer")) && !json_is_null(x) &&
        (rc = add_norm(L, x, "normalizer")))
        goto fail;
    if ((x = json_object_get(root, "pre_tokenizer")) && !json_is_null(x) &&
        (rc = add_pretok(L, x, "pre_tokenizer")))
        goto fail;
    if ((x = json_object_get(root, "post_processor")) && !json_is_null(x) &&
        (rc = add_post(L, x, "post_processor")))
        goto fail;
    if ((x = json_object_get(root, "decoder")) && !json_is_null(x)) {
        t->has_decoder = 1;
        if ((rc = add_dec(L, x, "decoder")))
            goto fail;
    }
    if ((rc = index_tokens(L)))
        goto fail;
    for (int i = 0; i < t->n_post_prefix + t->n_post_suffix; i++) {
        int32_t id = i < t->n_post_prefix ? t->post_prefix[i] : t->post_suffix[i - t->n_post_prefix];
        if (id >= t->n_vocab) {
            rc = FAIL(TANDEM_EFORMAT, "%s: post_processor adds id %d, beyond the vocabulary (%d)",
                      name, id, t->n_vocab);
            goto fail;
        }
    }
    json_decref(root);
    *out = t;
    return 0;
fail:
    json_decref(root);
    bpe_free(t);
    return rc;
}

int bpe_load(bpe **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
    bpe_buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (bpe_buf_put(&b, chunk, n)) {
            fclose(f);
            bpe_buf_free(&b);
            return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", path);
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        bpe_buf_free(&b);
        return td_err(err, errlen, TANDEM_EIO, "%s: read error", path);
    }
    int rc = bpe_load_from_string(out, b.p ? b.p : "", b.n, path, err, errlen);
    bpe_buf_free(&b);
    return rc;
}

void bpe_free(bpe *t)
{
    if (!t)
        return;
    free(t->name);
    bpe_strmap_free(&t->vocab);
    bpe_pairmap_free(&t->merges);
    free(t->model_ent);
    free(t->cont_prefix);
    free(t->eow_suffix);
    for (int i = 0; i < t->n_added; i++) {
        free(t->added[i].content);
        if (t->norm_content)
            free(t->norm_content[i]);
    }
    free(t->added);
    free(t->norm_content);
    free(t->added_of_id);
    bpe_strmap_free(&t->added_map);
    bpe_trie_free(&t->trie_raw);
    bpe_trie_free(&t->trie_norm);
    for (int i = 0; i < t->n_norm; i++) {
        pattern_free(&t->norm[i].pat);
        free(t->norm[i].str);
    }
    free(t->norm);
    for (int i = 0; i < t->n_pretok; i++)
        pattern_free(&t->pretok[i].pat);
    free(t->pretok);
    for (int i = 0; i < t->n_dec; i++) {
        pattern_free(&t->dec[i].pat);
        free(t->dec[i].str);
    }
    free(t->dec);
    free(t->post_prefix);
    free(t->post_suffix);
    pcre2_code_free(t->re_gpt2);
    pcre2_code_free(t->re_word);
    free(t);
}
