/*
 * bpe_tiktoken.c - the tiktoken tokenizer of Kimi-K2 / K2.5 (tiktoken.model + tokenizer_config.json)
 * -> struct bpe, exact against the `tiktoken` package configured as moonshotai's
 * tokenization_kimi.py configures it.
 *
 * tiktoken.model holds one "<base64 token bytes> <rank>" line per token; the rank is the id. tiktoken
 * encodes a pre-token by repeatedly merging the adjacent pair whose concatenation has the lowest rank
 * (leftmost on ties), after first emitting the whole pre-token if it is itself a token. That is the
 * BPE loop of bpe_model.c exactly, given:
 *   - vocabulary keys in GPT-2's byte-to-unicode alphabet (so every key is valid UTF-8 and the
 *     ByteLevel pre-tokenizer / decoder steps do the byte mapping, as for Qwen or DeepSeek),
 *   - a merge (a, b) -> (rank of a+b, a+b) for every split of every token into two tokens (tiktoken
 *     merges any adjacent pair whose bytes form a token, so every such split is a merge),
 *   - ignore_merges (the whole-pre-token shortcut).
 * Pre-tokens are the matches of Kimi's pattern only (tiktoken's find_iter: text between matches is
 * dropped, hence Split with Removed + invert). Kimi's pattern is written for fancy-regex / Rust
 * regex, whose character classes intersect with &&; PCRE2 10.42 has no class intersection, so
 * KIMI_RE below spells "[X&&[^\p{Han}]]" as "(?:(?!\p{Han})[X])", which matches the same characters.
 *
 * Special tokens, as tokenization_kimi.py builds them: the 256 ids after the base vocabulary
 * (n_base = number of lines), each named by tokenizer_config.json's added_tokens_decoder or else
 * "<|reserved_token_{id}|>"; entries of added_tokens_decoder outside that block are ignored, as
 * Kimi's code ignores them. All are matched anywhere in the text (encode(..., allow_special=True),
 * what Kimi's encode does by default) and are special for skip_special decoding. Kimi's encode adds
 * no BOS, so add_special adds nothing.
 *
 * Not reproduced: Kimi's encode also cuts texts into 400,000-character slices and runs of more
 * than 25,000 whitespace / non-whitespace characters before tiktoken sees them (a work-around for
 * a tiktoken stack overflow); ids can differ from Kimi's at such a cut, never elsewhere.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>

#include "core/err.h"
#include "tokenizer/bpe_impl.h"

#define TK_MAX_IDS (1 << 24)   /* as bpe_load.c: ids index dense arrays */
#define TK_MAX_TOKEN 1024      /* bytes; Kimi's longest is far shorter, and splitting a token costs
                                * its length squared, so hostile files stay cheap */
#define TK_N_RESERVED 256      /* tokenization_kimi.py: num_reserved_special_tokens */

/* tokenization_kimi.py's pat_str, with && class intersections rewritten for PCRE2 (see above).
 * \s \S are translated to Unicode White_Space by bpe_compile_regex, which is what Rust's regex
 * means by them. */
#define KIMI_NOHAN(cls) "(?:(?!\\p{Han})[" cls "])"
static const char KIMI_RE[] =
    "[\\p{Han}]+"
    "|[^\\r\\n\\p{L}\\p{N}]?" KIMI_NOHAN("\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}") "*"
    KIMI_NOHAN("\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}") "+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?" KIMI_NOHAN("\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}") "+"
    KIMI_NOHAN("\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}") "*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)"
    "|\\s+";

const char *bpe_kimi_pattern(void) { return KIMI_RE; }

/* ---- tiktoken.model -------------------------------------------------------- */

static int b64_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Standard base64 with '=' padding (what tiktoken writes); out needs n / 4 * 3 bytes.
 * Returns the decoded length or -1. */
static long b64_decode(const char *s, size_t n, uint8_t *out)
{
    if (n == 0 || n % 4)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            unsigned char c = (unsigned char)s[i + k];
            if (c == '=' && i + 4 == n && k >= 2) {
                v[k] = 0;
                pad++;
            } else if (pad || (v[k] = b64_val(c)) < 0) {
                return -1;
            }
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        out[o++] = (uint8_t)(w >> 16);
        if (pad < 2)
            out[o++] = (uint8_t)(w >> 8);
        if (pad < 1)
            out[o++] = (uint8_t)w;
    }
    return (long)o;
}

/* bytes -> GPT-2 byte-level string (each byte one character of 1 or 2 UTF-8 bytes) */
static size_t bytes_to_key(const uint8_t *b, size_t n, char *key)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = bpe_byte_to_cp(b[i]);
        if (cp < 0x80) {
            key[k++] = (char)cp;
        } else {
            key[k++] = (char)(0xC0 | cp >> 6);
            key[k++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    return k;
}

static int load_ranks(bpe *t, const char *src, size_t len, const char *file, int32_t *n_base,
                      char *err, size_t errlen)
{
    uint8_t tok[TK_MAX_TOKEN + 3];
    char key[2 * TK_MAX_TOKEN];
    size_t line = 0;
    int32_t n = 0;
    for (size_t i = 0; i < len;) {
        size_t e = i;
        while (e < len && src[e] != '\n')
            e++;
        line++;
        size_t a = i, z = e;
        i = e + 1;
        while (a < z && (src[a] == ' ' || src[a] == '\t' || src[a] == '\r'))
            a++;
        while (z > a && (src[z - 1] == ' ' || src[z - 1] == '\t' || src[z - 1] == '\r'))
            z--;
        if (a == z)
            continue; /* tiktoken's load_tiktoken_bpe skips empty lines */
        size_t sp = a;
        while (sp < z && src[sp] != ' ' && src[sp] != '\t')
            sp++;
        size_t r0 = sp;
        while (r0 < z && (src[r0] == ' ' || src[r0] == '\t'))
            r0++;
        if (sp == z || r0 == z)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: expected \"<base64 token> <rank>\"",
                          file, line);
        long rank = 0;
        for (size_t k = r0; k < z; k++) {
            if (src[k] < '0' || src[k] > '9' || rank >= TK_MAX_IDS)
                return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: rank must be an integer in [0, %d)",
                              file, line, TK_MAX_IDS);
            rank = rank * 10 + (src[k] - '0');
        }
        if (rank >= TK_MAX_IDS)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: rank must be an integer in [0, %d)",
                          file, line, TK_MAX_IDS);
        if (sp - a > (TK_MAX_TOKEN + 2) / 3 * 4)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: token longer than %d bytes", file,
                          line, TK_MAX_TOKEN);
        long nb = b64_decode(src + a, sp - a, tok);
        if (nb <= 0 || nb > TK_MAX_TOKEN)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: token '%.*s' is not base64 of 1..%d bytes",
                          file, line, (int)(sp - a > 64 ? 64 : sp - a), src + a, TK_MAX_TOKEN);
        size_t kl = bytes_to_key(tok, (size_t)nb, key);
        if (bpe_strmap_get(&t->vocab, key, kl) >= 0)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: line %zu: token '%.*s' appears twice", file, line,
                          (int)(sp - a > 64 ? 64 : sp - a), src + a);
        if (bpe_strmap_put(&t->vocab, key, kl, (int32_t)rank))
            return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
        n++;
    }
    if (n == 0)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: no tokens", file);
    for (int b = 0; b < 256; b++) {
        uint8_t one = (uint8_t)b;
        size_t kl = bytes_to_key(&one, 1, key);
        if (bpe_strmap_get(&t->vocab, key, kl) < 0)
            return td_err(err, errlen, TANDEM_EFORMAT,
                          "%s: byte 0x%02X has no rank (tiktoken needs every single byte as a token)", file, b);
    }
    *n_base = n;
    return 0;
}

/* Two tokens with one rank would make the id ambiguous (tiktoken refuses such a file too). */
static int check_ranks(bpe *t, const char *file, char *err, size_t errlen)
{
    int32_t max = 0;
    for (size_t i = 0; i < t->vocab.n; i++)
        if (t->vocab.ent[i].val > max)
            max = t->vocab.ent[i].val;
    uint8_t *seen = calloc((size_t)max + 1, 1);
    if (!seen)
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
    for (size_t i = 0; i < t->vocab.n; i++) {
        int32_t r = t->vocab.ent[i].val;
        if (seen[r]++) {
            free(seen);
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: rank %d is given to two tokens", file, r);
        }
    }
    free(seen);
    return 0;
}

/* Every split of every token into two tokens is a merge whose rank is the token's id. */
static int build_merges(bpe *t, const char *file, char *err, size_t errlen)
{
    for (size_t i = 0; i < t->vocab.n; i++) {
        const char *k = bpe_strmap_key(&t->vocab, i);
        size_t kl = t->vocab.ent[i].len;
        int32_t id = t->vocab.ent[i].val;
        /* split only at character boundaries: each character is one byte of the token */
        for (size_t b = ((unsigned char)k[0] < 0x80 ? 1 : 2); b < kl; b += ((unsigned char)k[b] < 0x80 ? 1 : 2)) {
            int32_t ia = bpe_strmap_get(&t->vocab, k, b), ib = bpe_strmap_get(&t->vocab, k + b, kl - b);
            if (ia >= 0 && ib >= 0 && bpe_pairmap_put(&t->merges, ia, ib, id, id))
                return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
        }
    }
    return 0;
}

/* ---- special tokens (tokenizer_config.json) ---------------------------------- */

static int add_special(bpe *t, int32_t id, const char *s, size_t len, int special, const char *file,
                       char *err, size_t errlen)
{
    if (!len)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: added_tokens_decoder['%d'].content is empty", file, id);
    bpe_added *x = &t->added[t->n_added];
    memset(x, 0, sizeof *x);
    if (!(x->content = malloc(len + 1)))
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
    memcpy(x->content, s, len);
    x->content[len] = 0;
    x->len = len;
    x->id = id;
    x->special = (uint8_t)special;
    /* a later id with the same content wins, like the {content: id} dict Kimi hands tiktoken */
    if (bpe_strmap_put(&t->added_map, s, len, t->n_added))
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
    t->n_added++;
    return 0;
}

static int load_specials(bpe *t, json_t *cfg, int32_t n_base, const char *file, char *err, size_t errlen)
{
    if (!(t->added = calloc(TK_N_RESERVED, sizeof *t->added)))
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", file);
    json_t *atd = cfg ? json_object_get(cfg, "added_tokens_decoder") : NULL;
    if (atd && !json_is_null(atd) && !json_is_object(atd))
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: added_tokens_decoder must be an object", file);
    for (int i = 0; i < TK_N_RESERVED; i++) {
        int32_t id = n_base + i;
        char key[16], name[48];
        snprintf(key, sizeof key, "%d", id);
        json_t *o = atd ? json_object_get(atd, key) : NULL;
        int rc;
        if (o) {
            json_t *c = json_object_get(o, "content"), *sp = json_object_get(o, "special");
            if (!json_is_object(o) || !json_is_string(c))
                return td_err(err, errlen, TANDEM_EFORMAT,
                              "%s: added_tokens_decoder['%s'] must be an object with a string \"content\"", file,
                              key);
            if (sp && !json_is_boolean(sp))
                return td_err(err, errlen, TANDEM_EFORMAT,
                              "%s: added_tokens_decoder['%s'].special must be true or false", file, key);
            rc = add_special(t, id, json_string_value(c), json_string_length(c), !sp || json_is_true(sp), file,
                             err, errlen);
        } else {
            int n = snprintf(name, sizeof name, "<|reserved_token_%d|>", id);
            rc = add_special(t, id, name, (size_t)n, 1, file, err, errlen);
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- entry points ------------------------------------------------------------ */

int bpe_load_tiktoken_from_string(bpe **out, const char *model, size_t model_len, const char *config_json,
                                  size_t config_len, const char *name, char *err, size_t errlen)
{
    *out = NULL;
    if (!name)
        name = "tiktoken.model";
    bpe *t = calloc(1, sizeof *t);
    if (!t || !(t->name = strdup(name))) {
        free(t);
        return td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", name);
    }
    json_t *cfg = NULL;
    int32_t n_base = 0;
    int rc;
    if (config_json) {
        json_error_t je;
        if (!(cfg = json_loadb(config_json, config_len, 0, &je))) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tokenizer_config.json: invalid JSON at line %d column %d: %s",
                        name, je.line, je.column, je.text);
            goto fail;
        }
        if (!json_is_object(cfg)) {
            rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: tokenizer_config.json: the top level must be an object",
                        name);
            goto fail;
        }
    }
    if ((rc = load_ranks(t, model ? model : "", model ? model_len : 0, name, &n_base, err, errlen)) ||
        (rc = build_merges(t, name, err, errlen)))
        goto fail;
    if ((rc = check_ranks(t, name, err, errlen)))
        goto fail;
    for (size_t i = 0; i < t->vocab.n; i++) {
        if (t->vocab.ent[i].val >= n_base && t->vocab.ent[i].val < n_base + TK_N_RESERVED) {
            rc = td_err(err, errlen, TANDEM_EFORMAT,
                        "%s: rank %d falls in the %d special ids that follow the %d tokens", name,
                        t->vocab.ent[i].val, TK_N_RESERVED, n_base);
            goto fail;
        }
    }
    if (n_base > TK_MAX_IDS - TK_N_RESERVED) {
        rc = td_err(err, errlen, TANDEM_EFORMAT, "%s: too many tokens (%d)", name, n_base);
        goto fail;
    }
    if ((rc = load_specials(t, cfg, n_base, name, err, errlen)))
        goto fail;

    t->unk_id = t->bos_id = t->eos_id = -1;
    t->ignore_merges = 1;
    for (int i = 0; i < 256; i++)
        t->byte_tok[i] = -1;
    if (!(t->pretok = calloc(2, sizeof *t->pretok)) || !(t->dec = calloc(1, sizeof *t->dec))) {
        rc = td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    t->n_pretok = 2;
    t->pretok[0].kind = BPE_PT_SPLIT;
    t->pretok[0].behavior = BPE_REMOVED; /* keep the matches only, like tiktoken's find_iter */
    t->pretok[0].invert = 1;
    t->pretok[1].kind = BPE_PT_BYTELEVEL;
    t->n_dec = 1;
    t->dec[0].kind = BPE_DEC_BYTELEVEL;
    t->has_decoder = t->dec_bytelevel = 1;
    if ((rc = bpe_compile_regex(t, KIMI_RE, sizeof KIMI_RE - 1, "the Kimi split pattern", &t->pretok[0].pat.re,
                                err, errlen)) ||
        (rc = bpe_index_tokens(t, err, errlen)))
        goto fail;
    json_decref(cfg);
    *out = t;
    return 0;
fail:
    json_decref(cfg);
    bpe_free(t);
    return rc;
}

static char *slurp(const char *path, size_t *len, int *rc, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        *rc = td_err(err, errlen, TANDEM_EIO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    bpe_buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (bpe_buf_put(&b, chunk, n)) {
            fclose(f);
            bpe_buf_free(&b);
            *rc = td_err(err, errlen, TANDEM_ENOMEM, "%s: out of memory", path);
            return NULL;
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (bad || bpe_buf_put(&b, "", 1)) {
        bpe_buf_free(&b);
        *rc = td_err(err, errlen, bad ? TANDEM_EIO : TANDEM_ENOMEM, "%s: %s", path, bad ? "read error" : "out of memory");
        return NULL;
    }
    *len = b.n - 1;
    return b.p;
}

int bpe_load_tiktoken(bpe **out, const char *model_path, const char *config_path, char *err, size_t errlen)
{
    *out = NULL;
    int rc = 0;
    size_t ml = 0, cl = 0;
    char *m = slurp(model_path, &ml, &rc, err, errlen), *c = NULL;
    if (!m)
        return rc;
    if (config_path && !(c = slurp(config_path, &cl, &rc, err, errlen))) {
        free(m);
        return rc;
    }
    rc = bpe_load_tiktoken_from_string(out, m, ml, c, cl, model_path, err, errlen);
    free(m);
    free(c);
    return rc;
}
