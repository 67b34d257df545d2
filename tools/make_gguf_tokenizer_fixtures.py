#!/usr/bin/env python3
"""Build the GGUF tokenizer fixtures under tests/fixtures/gguf_tokenizers/ (the truth for bpe_load_gguf).

Role: llama.cpp tokenizes a GGUF from its tokenizer.ggml.* metadata; tandem must give the same ids.
Each fixture is a small GGUF holding only metadata (a vocab-only llama.cpp load needs no tensors),
with a vocabulary taken from the tokenizer fixtures this repository already has, and an expect file
with llama.cpp's ids for the hard strings of make_tokenizer_fixtures.py (and the Kimi ones):

  NAME.gguf          general.architecture "llama" with tiny hyper-parameters, tokenizer.ggml.model /
                     pre / tokens / token_type / merges or scores / bos / eos / add_bos /
                     chat_template
  NAME.expect.json   {"gguf": "NAME.gguf", "reference": "llama.cpp ...", "n_vocab": N,
                      "cases": [{"text", "ids", "ids_special"}], "chat": {...} (some)}
       ids          = Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)
       ids_special  = the same with add_bos=True (llama.cpp's add_special: BOS/EOS as the file says)

Fixtures (vocabulary source -> what it exercises):
  qwen2        qwen2.tokenizer.json, pre "qwen2"; control and user-defined added tokens, no BOS
  llama_bpe    the same vocabulary, pre "llama-bpe": ignore_merges, digits in threes, add_bos
  glm4         glm45.tokenizer.json, pre "glm4" (no BOS)
  deepseek_v3  deepseek_v3.tokenizer.json, pre "deepseek-v3": three regexes in sequence, BOS added,
               <｜User｜>/<｜Assistant｜> user-defined
  deepseek_llm the same vocabulary, pre "deepseek-llm": six regexes incl. the long letter class
  default      the same vocabulary, no tokenizer.ggml.pre at all (llama.cpp's "default" split)
  kimi_k2      kimi_k2/tiktoken.model turned into tokens + merges the way convert_hf_to_gguf.py does
               for tiktoken vocabularies (each token's merge is the last step of BPE restricted to
               lower ranks), the 256 specials as control tokens, pre "kimi-k2". llama.cpp splits
               kimi-k2 with hand-written code that departs from Moonshot's pattern (marks, case
               changes); where its ids differ from the pattern's, the case also holds
               "moonshot_ids", which tandem follows (see moonshot_where_llama_differs)
  gpt4o        the same vocabulary, pre "gpt-4o"
  tekken       the same vocabulary, pre "tekken" (lookahead classes, ignore_merges)
  llama_spm    llama_sp.tokenizer.json as a SentencePiece vocabulary: model "llama", scores (a merged
               token scores minus its merge index, characters lower still), byte tokens <0xXX>,
               <unk>/<s>/</s> typed unknown/control, add_space_prefix, add_bos

Invalid UTF-8 is left out: llama.cpp repairs it per byte, tokenizers (and tandem) per maximal
subpart, and a GGUF tokenizer has no other truth to follow there.

Run:  python3 tools/make_gguf_tokenizer_fixtures.py [--reference llama|hf]
Needs gguf, tokenizers, tiktoken and, for the real reference, llama-cpp-python. With --reference hf
(only where llama.cpp is not installed) the ids come from the equivalent `tokenizers` / `tiktoken`
tokenizer, for the fixtures that have one, and the expect file says so.
"""
import argparse
import base64
import json
import os
import sys

import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tokenizer_fixtures as mtf  # noqa: E402
import make_tiktoken_fixtures as mtk  # noqa: E402

TOKDIR = "tests/fixtures/tokenizers"
OUT = "tests/fixtures/gguf_tokenizers"
NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def template_of(name):
    jinja = os.path.join("tests/fixtures/templates", name, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    path = os.path.join("tests/fixtures/templates", name, "tokenizer_config.json")
    with open(path) as f:
        t = json.load(f)["chat_template"]
    return t if isinstance(t, str) else next(x["template"] for x in t if x["name"] == "default")


def from_tokenizer_json(src):
    """tokens, types, merges from a byte-level tokenizer.json fixture"""
    with open(os.path.join(TOKDIR, src + ".tokenizer.json")) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    n = max(list(vocab.values()) + [a["id"] for a in tj["added_tokens"]]) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for a in tj["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a["special"] else USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, types, merges, tj


def bpe_parts(ranks, token, max_rank):
    """tiktoken's merge loop on `token` with merges below max_rank (convert_hf_to_gguf's QwenModel.bpe)"""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def kimi_vocab():
    ranks = {}
    with open(os.path.join(TOKDIR, "kimi_k2", "tiktoken.model")) as f:
        for line in f:
            if line.strip():
                b, r = line.split()
                ranks[base64.b64decode(b)] = int(r)
    with open(os.path.join(TOKDIR, "kimi_k2", "tokenizer_config.json")) as f:
        cfg = json.load(f)
    b2u = mtf_bytes_to_unicode()

    def s(b):
        return "".join(b2u[x] for x in b)
    n_base = len(ranks)
    tokens, types, merges = [None] * (n_base + 256), [NORMAL] * (n_base + 256), []
    for t, r in ranks.items():
        tokens[r] = s(t)
        if len(t) > 1:
            p = bpe_parts(ranks, t, r)
            if len(p) == 2:
                merges.append((r, s(p[0]) + " " + s(p[1])))
    merges = [m for _, m in sorted(merges)]
    named = {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}
    for i in range(n_base, n_base + 256):
        tokens[i] = named.get(i, f"<|reserved_token_{i}|>")
        types[i] = CONTROL
    return tokens, types, merges, n_base


def mtf_bytes_to_unicode():
    return {b: chr(mtk.mtf_byte_to_cp(b)) for b in range(256)}


def spm_vocab():
    tokens, types, merges, tj = from_tokenizer_json("llama_sp")
    n = len(tokens)
    scores = [0.0] * n
    first_merge = {}
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1)
        first_merge.setdefault(a + b, i)
    for i, t in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        if t.startswith("<0x") and t.endswith(">") and len(t) == 6:
            types[i] = BYTE
        elif t in first_merge:
            scores[i] = -float(first_merge[t])
        else:
            scores[i] = -1e6 - i
    types[0] = UNKNOWN
    return tokens, types, scores


FIXTURES = {
    # name: (source, pre, extra)
    "qwen2": ("qwen2", "qwen2", {"eos": "<|im_end|>", "template": "qwen3-30b-a3b"}),
    "llama_bpe": ("qwen2", "llama-bpe", {"bos": "<|endoftext|>", "eos": "<|im_end|>"}),
    "glm4": ("glm45", "glm4", {"eos": "<|endoftext|>"}),
    "deepseek_v3": ("deepseek_v3", "deepseek-v3", {"bos": 0, "eos": 1, "add_bos": True, "template": "deepseek-v3"}),
    "deepseek_llm": ("deepseek_v3", "deepseek-llm", {"bos": 0, "eos": 1, "add_bos": True}),
    "default": ("deepseek_v3", None, {"bos": 0, "eos": 1}),
    "kimi_k2": ("kimi", "kimi-k2", {"eos": "[EOS]", "template": "kimi-k2-instruct"}),
    "gpt4o": ("kimi", "gpt-4o", {"eos": "[EOS]"}),
    "tekken": ("kimi", "tekken", {"bos": "[BOS]", "eos": "[EOS]"}),
    "llama_spm": ("spm", None, {"template": "mixtral-8x7b-instruct"}),
}


def write_gguf(path, name, src, pre, extra):
    w = gguf.GGUFWriter(path, "llama")
    # the smallest hyper-parameters a vocab-only llama.cpp load accepts
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    scores = None
    if src == "spm":
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        merges = None
    else:
        if src == "kimi":
            tokens, types, merges, _ = kimi_vocab()
        else:
            tokens, types, merges, _ = from_tokenizer_json(src)
        w.add_tokenizer_model("gpt2")
        if pre:
            w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)

    def tid(x):
        return x if isinstance(x, int) else tokens.index(x)
    if "bos" in extra:
        w.add_bos_token_id(tid(extra["bos"]))
    if "eos" in extra:
        w.add_eos_token_id(tid(extra["eos"]))
    if "add_bos" in extra:
        w.add_add_bos_token(extra["add_bos"])
    if "template" in extra:
        w.add_chat_template(template_of(extra["template"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def texts():
    return [h for h in mtf.HARD + mtk.KIMI_HARD]


def reference_llama(path):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def enc(text, add_bos):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    return enc, "llama.cpp (llama-cpp-python %s)" % llama_cpp.__version__


def reference_hf(name, src):
    """ids of the equivalent tokenizer where one exists (not exact for llama.cpp: see the docstring)"""
    if src == "kimi" and name == "kimi_k2":
        import tiktoken
        ranks = {}
        with open(os.path.join(TOKDIR, "kimi_k2", "tiktoken.model")) as f:
            for line in f:
                b, r = line.split()
                ranks[base64.b64decode(b)] = int(r)
        n = len(ranks)
        tokens, _, _, _ = kimi_vocab()
        enc = tiktoken.Encoding("k", pat_str=mtk.KIMI_PAT, mergeable_ranks=ranks,
                                special_tokens={tokens[i]: i for i in range(n, n + 256)})
        return (lambda text, add_bos: enc.encode(text, allowed_special="all")), "tiktoken"
    if src in ("qwen2", "glm45", "deepseek_v3") and name in ("qwen2", "glm4", "deepseek_v3"):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(TOKDIR, src + ".tokenizer.json"))
        return (lambda text, add_bos: tok.encode(text, add_special_tokens=add_bos).ids), "tokenizers"
    return None, None


def moonshot_where_llama_differs(path, cases):
    """llama.cpp splits "kimi-k2" with hand-written code (unicode_regex_split_custom_kimi_k2) that
    departs from Moonshot's pattern: marks (\p{M}) do not continue a word and case changes do not
    split one. tandem splits with the pattern itself, as the model was trained. Where the two
    disagree, the case also records "moonshot_ids": the same vocabulary and merges split by
    Moonshot's pattern (tokenizers, Oniguruma understands its && classes), which tandem must give."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    r = gguf.GGUFReader(path)
    f = r.fields

    def strs(key):
        fl = f[key]
        return [bytes(fl.parts[i]).decode("utf-8") for i in fl.data]
    tokens, merges = strs("tokenizer.ggml.tokens"), strs("tokenizer.ggml.merges")
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(mtk.KIMI_PAT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, t in enumerate(tokens) if types[i] == CONTROL])
    for c in cases:
        m = tok.encode(c["text"], add_special_tokens=False).ids
        if m != c["ids"]:
            c["moonshot_ids"] = m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", choices=["llama", "hf"], default="llama")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    for name, (src, pre, extra) in FIXTURES.items():
        if args.only and name not in args.only:
            continue
        path = os.path.join(OUT, name + ".gguf")
        tokens = write_gguf(path, name, src, pre, extra)
        if args.reference == "llama":
            enc, ref = reference_llama(path)
        else:
            enc, ref = reference_hf(name, src)
            if enc is None:
                print(f"{name}: no equivalent tokenizer for --reference hf; GGUF written, no expect file")
                continue
        cases = [{"text": t, "ids": enc(t, False), "ids_special": enc(t, True)} for t in texts()]
        if pre == "kimi-k2":
            moonshot_where_llama_differs(path, cases)
        exp = {"gguf": name + ".gguf", "reference": ref, "n_vocab": len(tokens), "cases": cases}
        with open(os.path.join(OUT, name + ".expect.json"), "w", encoding="utf-8") as f:
            json.dump(exp, f, ensure_ascii=False, separators=(",", ":"))
        print(f"{name}: {len(tokens)} tokens, {len(cases)} cases, reference {ref}")


if __name__ == "__main__":
    sys.exit(main())
