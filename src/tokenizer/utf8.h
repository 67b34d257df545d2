/*
 * utf8.h - UTF-8 decoding, lossy repair and the character classes the tokenizer needs.
 *
 * Validity follows Rust's str / Python's strict decoder: no overlongs, no surrogates, nothing
 * above U+10FFFF. Invalid input is repaired the way Rust's String::from_utf8_lossy (and Python's
 * errors="replace") does it: each maximal subpart of an ill-formed sequence becomes one U+FFFD,
 * so a repaired string is byte-identical to what `tokenizers` produces from the same bytes.
 *
 * Character classes are the Rust / Oniguruma ones `tokenizers` uses (White_Space, Unicode
 * general categories via utf8proc), not C's locale-dependent <ctype.h>.
 */
#ifndef TD_TOKENIZER_UTF8_H
#define TD_TOKENIZER_UTF8_H

#include <stddef.h>
#include <stdint.h>

#define UTF8_REPLACEMENT 0xFFFDu

/* Decode one character at s[0..len). Returns the code point and sets *adv to its length; for an
 * ill-formed sequence returns -1 and sets *adv to the length of its maximal subpart (>= 1), which
 * is what one U+FFFD replaces. len must be > 0. */
int32_t utf8_decode(const char *s, size_t len, size_t *adv);

/* Encode cp (<= 0x10FFFF) into out[0..4); returns the byte count. */
int utf8_encode(uint32_t cp, char *out);

/* Length of the valid UTF-8 prefix of s[0..len) (len when all of it is valid). */
size_t utf8_valid_prefix(const char *s, size_t len);

/* Lossy repair: write s[0..len) to out with each maximal ill-formed subpart replaced by U+FFFD.
 * out needs room for 3 * len bytes. Returns the bytes written. */
size_t utf8_repair(const char *s, size_t len, char *out);

/* Bytes at the end of s[0..len) that form a proper prefix of a valid sequence (a character
 * that more bytes could still complete), 0 when there is none. */
size_t utf8_incomplete_tail(const char *s, size_t len);

/* Character classes (the definitions `tokenizers` uses). */
int utf8_is_whitespace(uint32_t cp);  /* Unicode White_Space = Rust char::is_whitespace */
int utf8_is_numeric(uint32_t cp);     /* general category N* = Rust char::is_numeric */
int utf8_is_punct(uint32_t cp);       /* ASCII punctuation or category P* (HF is_punc) */
int utf8_is_mark(uint32_t cp);        /* category M* */
int utf8_is_word(uint32_t cp);        /* Rust regex \w: alphabetic, M, Nd, Pc, join controls */

#endif
