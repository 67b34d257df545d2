/*
 * utf8.c - UTF-8 decoding, lossy repair and character classes (see utf8.h).
 *
 * The decoder mirrors Rust's core::str validation table: the second byte of a sequence is
 * range-checked per lead byte (E0 needs A0..BF, ED needs 80..9F, F0 needs 90..BF, F4 needs
 * 80..8F), which is what makes "maximal subpart" lengths agree with from_utf8_lossy.
 */
#include "tokenizer/utf8.h"

#include <string.h>
#include <utf8proc.h>

/* Width of the sequence a lead byte starts (0 = never valid as a lead). */
static int lead_width(uint8_t b)
{
    if (b < 0x80)
        return 1;
    if (b < 0xC2)
        return 0;
    if (b < 0xE0)
        return 2;
    if (b < 0xF0)
        return 3;
    if (b < 0xF5)
        return 4;
    return 0;
}

/* Is c a valid second byte after lead byte b? */
static int second_ok(uint8_t b, uint8_t c)
{
    switch (b) {
    case 0xE0: return c >= 0xA0 && c <= 0xBF;
    case 0xED: return c >= 0x80 && c <= 0x9F;
    case 0xF0: return c >= 0x90 && c <= 0xBF;
    case 0xF4: return c >= 0x80 && c <= 0x8F;
    default: return c >= 0x80 && c <= 0xBF;
    }
}

static int is_cont(uint8_t c) { return c >= 0x80 && c <= 0xBF; }

int32_t utf8_decode(const char *s, size_t len, size_t *adv)
{
    const uint8_t *u = (const uint8_t *)s;
    uint8_t b = u[0];
    int w = lead_width(b);
    if (w == 1) {
        *adv = 1;
        return b;
    }
    if (w == 0) {
        *adv = 1;
        return -1;
    }
    if (len < 2 || !second_ok(b, u[1])) {
        *adv = 1;
        return -1;
    }
    if (w == 2) {
        *adv = 2;
        return ((b & 0x1F) << 6) | (u[1] & 0x3F);
    }
    if (len < 3 || !is_cont(u[2])) {
        *adv = 2;
        return -1;
    }
    if (w == 3) {
        *adv = 3;
        return ((b & 0x0F) << 12) | ((u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    }
    if (len < 4 || !is_cont(u[3])) {
        *adv = 3;
        return -1;
    }
    *adv = 4;
    return ((b & 0x07) << 18) | ((u[1] & 0x3F) << 12) | ((u[2] & 0x3F) << 6) | (u[3] & 0x3F);
}

int utf8_encode(uint32_t cp, char *out)
{
    uint8_t *o = (uint8_t *)out;
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xC0 | (cp >> 6));
        o[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | (cp >> 12));
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (cp >> 18));
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

size_t utf8_valid_prefix(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if ((uint8_t)s[i] < 0x80) { /* ASCII fast path */
            i++;
            continue;
        }
        size_t adv;
        if (utf8_decode(s + i, len - i, &adv) < 0)
            return i;
        i += adv;
    }
    return len;
}

size_t utf8_repair(const char *s, size_t len, char *out)
{
    size_t i = 0, o = 0;
    while (i < len) {
        size_t adv;
        if ((uint8_t)s[i] < 0x80) {
            out[o++] = s[i++];
            continue;
        }
        if (utf8_decode(s + i, len - i, &adv) < 0) {
            o += (size_t)utf8_encode(UTF8_REPLACEMENT, out + o);
        } else {
            memcpy(out + o, s + i, adv);
            o += adv;
        }
        i += adv;
    }
    return o;
}

size_t utf8_incomplete_tail(const char *s, size_t len)
{
    const uint8_t *u = (const uint8_t *)s;
    /* the lead byte of an incomplete character is at most 3 bytes from the end */
    for (size_t k = 1; k <= 3 && k <= len; k++) {
        uint8_t b = u[len - k];
        if (is_cont(b))
            continue;
        int w = lead_width(b);
        if (w <= (int)k) /* ASCII, invalid lead, or already long enough to be complete */
            return 0;
        if (k >= 2 && !second_ok(b, u[len - k + 1]))
            return 0;
        for (size_t j = 2; j < k; j++)
            if (!is_cont(u[len - k + j]))
                return 0;
        return k;
    }
    return 0;
}

int utf8_is_whitespace(uint32_t c)
{
    if (c >= 0x09 && c <= 0x0D)
        return 1;
    switch (c) {
    case 0x20: case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
        return 1;
    default:
        return c >= 0x2000 && c <= 0x200A;
    }
}

static utf8proc_propval_t cat(uint32_t c)
{
    return c > 0x10FFFF ? UTF8PROC_CATEGORY_CN : utf8proc_category((utf8proc_int32_t)c);
}

int utf8_is_numeric(uint32_t c)
{
    utf8proc_propval_t k = cat(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

int utf8_is_punct(uint32_t c)
{
    if (c < 0x80)
        return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
               (c >= 0x7B && c <= 0x7E);
    utf8proc_propval_t k = cat(c);
    return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

int utf8_is_mark(uint32_t c)
{
    utf8proc_propval_t k = cat(c);
    return k == UTF8PROC_CATEGORY_MN || k == UTF8PROC_CATEGORY_MC || k == UTF8PROC_CATEGORY_ME;
}

int utf8_is_word(uint32_t c)
{
    if (c == 0x200C || c == 0x200D)
        return 1;
    /* letters with Other_Alphabetic outside L/M: circled and squared Latin letters */
    if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) ||
        (c >= 0x1F150 && c <= 0x1F169) || (c >= 0x1F170 && c <= 0x1F189))
        return 1;
    utf8proc_propval_t k = cat(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) || k == UTF8PROC_CATEGORY_MN ||
           k == UTF8PROC_CATEGORY_MC || k == UTF8PROC_CATEGORY_ME || k == UTF8PROC_CATEGORY_ND ||
           k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_PC;
}
