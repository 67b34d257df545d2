/*
 * bpe.h - BPE tokenizer loaded from a Hugging Face tokenizer.json, exact against `tokenizers`; also
 * built from Kimi-K2's tiktoken.model (exact against `tiktoken`) or from a GGUF file's tokenizer
 * metadata (exact against llama.cpp) by the loaders declared further down.
 *
 * Covers byte-level BPE (Qwen2/2.5/3, DeepSeek-V3, GLM-4.5, GPT-2 style) and sentencepiece-style
 * BPE with byte fallback (Mixtral / Llama), built from the general tokenizer.json blocks:
 *   normalizer     NFC NFD NFKC NFKD Lowercase Prepend Replace Strip StripAccents ByteLevel Sequence
 *   pre_tokenizer  Split (Regex|String, all behaviors, invert) ByteLevel Digits Metaspace Whitespace
 *                  WhitespaceSplit Punctuation BertPreTokenizer Sequence
 *   model          BPE: merges "a b" or ["a","b"], ignore_merges, byte_fallback, unk_token/fuse_unk,
 *                  continuing_subword_prefix, end_of_word_suffix (dropout must be null/0)
 *   added_tokens   special or not; single_word / lstrip / rstrip / normalized, matched before
 *                  pre-tokenization exactly like tokenizers' AddedVocabulary
 *   post_processor TemplateProcessing (single) BertProcessing RobertaProcessing ByteLevel Sequence
 *   decoder        ByteLevel Replace ByteFallback Fuse Strip Metaspace BPEDecoder Sequence
 * Anything else is refused at load with an error naming the file and the type.
 *
 * Regexes run on PCRE2 (UTF + UCP, JIT when available). `tokenizers` uses Oniguruma; the
 * differences that matter are translated at load: \s and \S are exactly Unicode White_Space
 * (PCRE2's \s lacks U+0085 and has U+180E), \w is Oniguruma's [\p{L}\p{M}\p{Nd}\p{Pc}], \h is a
 * hex digit, ^ and $ are line anchors. (\S \W \H inside a [...] class keep PCRE2's meaning.)
 *
 * Invalid UTF-8 input: `tokenizers` only takes valid strings, so bpe_encode() first repairs the
 * bytes like String::from_utf8_lossy (each maximal ill-formed subpart becomes U+FFFD) and
 * tokenizes the repaired text; it never fails or crashes on bad bytes.
 *
 * Ownership: a bpe is immutable after load and may be shared by threads (encode/decode keep
 * their scratch on the caller's stack/heap). A bpe_stream belongs to one thread.
 */
#ifndef TD_TOKENIZER_BPE_H
#define TD_TOKENIZER_BPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct bpe bpe;

/* Load tokenizer.json from a file / from memory (name_for_errors prefixes every message). */
int bpe_load(bpe **out, const char *tokenizer_json_path, char *err, size_t errlen);
int bpe_load_from_string(bpe **out, const char *json, size_t len, const char *name_for_errors,
                         char *err, size_t errlen);
void bpe_free(bpe *t);

/* Kimi-K2 / K2.5's tiktoken tokenizer (bpe_tiktoken.c): tiktoken.model ("<base64 bytes> <rank>" per
 * line, rank = id) with the split pattern of moonshotai's tokenization_kimi.py, and the 256 special
 * ids after the base vocabulary named by tokenizer_config.json's added_tokens_decoder (config may be
 * NULL: all reserved names). Encodes like tiktoken's encode(text, allowed_special="all"). */
int bpe_load_tiktoken(bpe **out, const char *model_path, const char *config_path, char *err,
                      size_t errlen);
int bpe_load_tiktoken_from_string(bpe **out, const char *model, size_t model_len,
                                  const char *config_json, size_t config_len,
                                  const char *name_for_errors, char *err, size_t errlen);
/* A tokenizer from GGUF metadata (bpe_gguf.c): tokenizer.ggml.model "gpt2" (byte-level BPE with
 * merges and the split regexes of tokenizer.ggml.pre) or "llama" (SentencePiece-style, by scores),
 * tokens, token types, bos/eos/unk ids, add_bos/add_eos/add_space_prefix; tokenizes as llama.cpp
 * does with parse_special (add_special adds what add_bos_token / add_eos_token say). The file may
 * be closed after this returns. */
struct gguf_file;
int bpe_load_gguf(bpe **out, const struct gguf_file *g, char *err, size_t errlen);
/* BOS / EOS ids of a GGUF tokenizer (its keys, else its vocabulary kind's defaults), -1 when it has
 * none; always -1 for tokenizer.json and tiktoken tokenizers (tokenizer_config.json names theirs). */
int32_t bpe_bos_id(const bpe *t);
int32_t bpe_eos_id(const bpe *t);

/* Kimi's split pattern as bpe_* compiles it (PCRE2 syntax, \s meaning Unicode White_Space). */
const char *bpe_kimi_pattern(void);

/* Ids in use, added tokens included: max id + 1. */
int bpe_n_vocab(const bpe *t);

/* Encode text[0..len) like tokenizer.encode(text, add_special_tokens=add_special).ids.
 * Writes min(count, cap) ids; *n_out gets the full count (call again with a bigger buffer when
 * *n_out > cap). Returns 0, TANDEM_ENOMEM, or TANDEM_EINVAL / TANDEM_EFORMAT with a message. */
int bpe_encode(const bpe *t, const char *text, size_t len, int add_special, int32_t *ids, int cap,
               int *n_out, char *err, size_t errlen);

/* Exact vocabulary or added-token string -> id; -1 when none. */
int bpe_token_to_id(const bpe *t, const char *token_text);
/* Id -> raw token string (added token content, else model vocabulary); NULL if unknown. */
const char *bpe_id_to_token(const bpe *t, int32_t id);
/* Nonzero when id is a special token (skipped by skip_special decoding). */
int bpe_is_special(const bpe *t, int32_t id);
/* Id of the added token whose content is exactly `content` (e.g. "<|im_end|>"), -1 if none. */
int bpe_find_special(const bpe *t, const char *content);

/* Decode like tokenizer.decode(ids, skip_special_tokens=skip_special). Unknown ids are skipped
 * (as tokenizers does). Writes min(len, cap - 1) bytes plus a NUL when cap > 0; *n_out gets the
 * full length (retry with cap > *n_out when it did not fit). Returns 0 or TANDEM_ENOMEM. */
int bpe_decode(const bpe *t, const int32_t *ids, int n, int skip_special, char *out, size_t cap,
               size_t *n_out);

/* Streaming decoder: fed one id at a time, it hands out only complete UTF-8 text, and the
 * concatenation of everything it hands out equals bpe_decode() of all the ids fed. Bytes of a
 * character split across tokens are held back until the character completes (emitted as U+FFFD
 * only once it can no longer complete, or at flush); with a ByteFallback decoder a run of
 * <0xXX> tokens is held until the run ends, because the whole run decides its text. */
typedef struct bpe_stream bpe_stream;
int bpe_stream_create(const bpe *t, int skip_special, bpe_stream **out);
void bpe_stream_free(bpe_stream *s);
/* Feed one id; copies ready text into out[0..cap) (not NUL-terminated, never a partial
 * character) and returns the bytes written, or a negative TANDEM_E* code. Text that did not fit
 * stays queued for the next push or flush. */
int bpe_stream_push(bpe_stream *s, int32_t id, char *out, size_t cap);
/* End of sequence: hand out everything still held (call until it returns 0). The next push
 * starts a new sequence. */
int bpe_stream_flush(bpe_stream *s, char *out, size_t cap);

#endif
