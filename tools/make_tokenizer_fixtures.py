#!/usr/bin/env python3
"""Build the tokenizer fixtures under tests/fixtures/tokenizers/ (the truth for tests/test_tokenizer.c).

Role: for each family tandem runs, train a SMALL BPE (vocab ~1-2k) with Hugging Face `tokenizers` on
text found on this machine, wrap it in that family's REAL tokenizer.json configuration (normalizer,
pre-tokenizer, decoder, post-processor, added/special tokens), reload it with `tokenizers`, and record
what `tokenizers` does on a corpus of hard strings. The C tests read these files with jansson and need
no Python.

Files written (per family NAME):
  NAME.tokenizer.json  the tokenizer, loadable by both `tokenizers` and bpe_load()
  NAME.expect.json     {"tokenizer": "NAME.tokenizer.json", "n_vocab": max id + 1,
                        "cases":  [{"text", "ids", "ids_special", "dec", "dec_special",
                                    "dec_special_skip"}],
                        "decode": [{"ids", "skip", "text"}],
                        "invalid": [{"hex", "ids"}]}
     ids          = tok.encode(text, add_special_tokens=False).ids
     ids_special  = tok.encode(text, add_special_tokens=True).ids
     dec          = tok.decode(ids, skip_special_tokens=False)
     dec_special  = tok.decode(ids_special, skip_special_tokens=False)
     dec_special_skip = tok.decode(ids_special, skip_special_tokens=True)
     decode[]     arbitrary id sequences (random ids, token sequences cut inside a UTF-8 character)
                  and tok.decode(ids, skip_special_tokens=skip)
     invalid[]    invalid UTF-8 bytes (hex) and the ids of bytes.decode("utf-8", "replace")

Where each family's configuration comes from (stored public copies, read through the search tools):
  qwen2       Qwen2.5 / Qwen3 tokenizer.json: normalizer NFC; pre_tokenizer Sequence[Split(Regex QWEN2,
              Isolated), ByteLevel(add_prefix_space=false, use_regex=false)]; decoder ByteLevel;
              post_processor ByteLevel (adds nothing); BPE without unk/byte_fallback, merges as pairs;
              added tokens <|endoftext|> <|im_start|> <|im_end|> ... special, normalized=false, after
              the vocabulary; <tool_call> </tool_call> <think> </think> special=false (Qwen3).
              The regex is also the one llama.cpp / ollama use for "qwen2".
  deepseek_v3 DeepSeek-V3 tokenizer.json: normalizer Sequence[] (empty); pre_tokenizer Sequence[
              Split(\\p{N}{1,3}), Split(CJK ranges), Split(DEEPSEEK_MAIN), all Isolated, then
              ByteLevel(add_prefix_space=false, use_regex=false)] (the same three patterns llama.cpp
              uses for "deepseek-v3"); decoder ByteLevel; post_processor TemplateProcessing adding
              <｜begin▁of▁sentence｜> (id 0) in front; merges as "a b" strings; BOS/EOS/pad at ids 0-2 in the
              model vocabulary; <｜User｜> / <｜Assistant｜> are added with special=false, normalized=true.
  glm45       GLM-4.5 tokenizer.json: pre_tokenizer Sequence[Split(Regex GLM4, Isolated),
              ByteLevel(false, use_regex=false)] where GLM4 is the cl100k-style regex llama.cpp uses for
              "chatglm4"/"glm4" (digits in groups of up to 3); decoder ByteLevel; special tokens
              <|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> <|user|> <|assistant|>
              <|observation|> ... after the vocabulary (ids as in GLM-4.1V/4.5: 151329 +). The
              post_processor here is Sequence[ByteLevel, TemplateProcessing("[gMASK] <sop> $A")] as in the
              GLM-4-0414 hf tokenizer.json; the GLM-4.5 chat template writes [gMASK]<sop> itself, so
              that part is an assumption (it exercises the Sequence post-processor either way).
  llama_sp    Mixtral-8x7B / Llama-2 tokenizer.json (legacy sentencepiece conversion): normalizer
              Sequence[Prepend("▁"), Replace(" " -> "▁")]; pre_tokenizer null; BPE with unk <unk>,
              fuse_unk, byte_fallback and <0x00>..<0xFF> in the vocabulary (ids 3..258); merges as
              "a b" strings; post_processor TemplateProcessing("<s> $A"); decoder Sequence[Replace("▁"
              -> " "), ByteFallback, Fuse, Strip(" ", 1, 0)].
  llama_meta  the non-legacy sentencepiece conversion: normalizer null, pre_tokenizer Metaspace("▁",
              prepend_scheme "first", split false); decoder Sequence[Metaspace, ByteFallback, Fuse].
  gpt2_misc   not a family: the other building blocks (normalizer Sequence[NFKC, Lowercase,
              Replace(Regex)], pre_tokenizer Sequence[Digits(individual), ByteLevel(add_prefix_space,
              use_regex)], ignore_merges, added tokens with lstrip/rstrip/single_word/normalized,
              TemplateProcessing "<s> $A </s>").
  suffix_misc not a family: Whitespace pre-tokenizer, NFD+StripAccents+Lowercase, end_of_word_suffix
              "</w>", unk without byte_fallback, BPEDecoder, BertProcessing.
  blocks_a..d building-block variants configured through the Python API and saved by tokenizers
              itself (Split behaviors MergedWithPrevious/MergedWithNext/Contiguous + invert,
              Punctuation, WhitespaceSplit, BertPreTokenizer, Metaspace split, Strip/Prepend/
              Replace/ByteLevel normalizers, Replace(Regex)/Strip decoders, continuing_subword_prefix,
              no decoder, RobertaProcessing); see each build_blocks_* docstring.

Training text: the first ~400 KB of `apt-cache dumpavail`, a few Python stdlib modules, and the
multilingual lines below; the fixtures committed are the truth, the training text only shapes them.
Re-running is not byte-identical for every file (the trainer breaks some ties differently between
runs when limit_alphabet is used); any regenerated set is as valid as the committed one.

Run (about 15 s):  python3 tools/make_tokenizer_fixtures.py [--out DIR] [--only NAME ...]
"""

import argparse
import glob
import json
import os
import random
import subprocess
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DS_DIGITS_RE = r"\p{N}{1,3}"
DS_CJK_RE = "[一-龥぀-ゟ゠-ヿ]+"
# as stored in DeepSeek-V3's tokenizer.json: literal CR / LF characters inside the classes
DS_MAIN_RE = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
              "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

MULTILINGUAL = """\
你好，世界！今天天气很好，我们去公园散步吧。机器学习和自然语言处理是人工智能的重要分支。
日本語のテキストです。カタカナとひらがなを混ぜて書きます。東京は大きな都市です。
한국어 문장입니다. 오늘은 날씨가 좋습니다.
مرحبا بالعالم، كيف حالك اليوم؟ هذه جملة باللغة العربية.
नमस्ते दुनिया, यह हिन्दी में एक वाक्य है। भारत एक बड़ा देश है।
Привет, мир! Это предложение на русском языке. Москва — столица России.
Γειά σου κόσμε! Αυτή είναι μια ελληνική πρόταση.
สวัสดีครับ นี่คือประโยคภาษาไทย
Ça va très bien, merci. Où est la gare ? Übermäßig große Straße. Niño, añejo, corazón.
Emoji: 😀 😃 😄 👋🌍 👍🏽 ❤️ 🇫🇷 🇯🇵 👨‍👩‍👧‍👦 ✨🚀
The numbers 1234567890, 3.14159 and 2718281828 appear; so do 1,000,000 and 42%.
I'm sure he's here; they'll come. We're done, you've seen it, I'd say it's fine. DON'T SHOUT.
    def main(argv):\n        return 0\n\tint x = a[i] + b->c; // comment
"""

HARD = [
    "",
    "Hello world",
    "Hello, World! How are you today?",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a\tb\t\tc\t",
    "\t\t\tindented with tabs",
    "line one\nline two\n\nline four\n",
    "windows\r\nline endings\r\n\r\nend",
    "\n",
    "\n\n\n",
    " \n \n  \n",
    " " * 37 + "x" + " " * 12 + "y",
    " " * 64,
    "mixed \t \n \r\n  whitespace\u00a0nbsp\u3000ideographic\u2028ls\u0085nel\u180emvs\u200bzwsp",
    "I'm sure he's here; they'll come. WE'RE done, you've seen it, I'd say it's fine. DON'T",
    "it'S THE'LL o'clock rock'n'roll ' s '' 'x",
    "0123456789",
    "3.14159 2718281828459045 1,000,000 and 007 and 12345678901234567890",
    "Prices: $1.99, €2,50, ¥300, 100% 2^10=1024 -5 +7 1e-9",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ Devanagari ०१२ fullwidth １２３ roman ⅫⅣ fractions ½¾ super ²³",
    "你好，世界！今天天气很好。",
    "机器学习123和自然语言处理abc",
    "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ",
    "한국어 텍스트입니다. 한글 자모 ᄒ ᅡ ᆫ",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "नमस्ते दुनिया, यह एक परीक्षण है। क्षत्रिय",
    "Привет, мир! Ёлка и ЁЛКА.",
    "Γειά σου κόσμε! ΣΊΣΥΦΟΣ",
    "สวัสดีครับ ภาษาไทย",
    "עברית: שלום עולם",
    "👋🌍😀",
    "family 👨‍👩‍👧‍👦 and couple 👩‍❤️‍👨 and zwj 🏳️‍🌈",
    "flags 🇫🇷🇯🇵🇺🇸🇩🇪 tag 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "skin tones 👍🏽👋🏿 keycap 1️⃣ #️⃣ variation ❤️ ☺︎",
    "precomposed \u00e9\u00e8\u00ea vs decomposed e\u0301e\u0300e\u0302",
    "A\u030a vs \u00c5 vs \u212b (angstrom) and \u1e9b\u0323",
    "ligatures \ufb01 \ufb02 fullwidth ＦＵＬＬ ｗｉｄｔｈ circled ⓐⓑ",
    "combining only \u0301\u0302\u0303 after space \u0301",
    "Zalgo: Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 and rare \U0001f9ec \U0010fffd",
    "\ufeffBOM at start and \ufffd replacement char",
    "control \x01\x02\x07\x1b[0m\x7f chars",
    "nul\x00byte",
    "İstanbul ıi ß ẞ ǅ ﬃ Σας",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n    pass\n",
    "int main(void) {\n\tprintf(\"%d\\n\", a[i] + b->c);\n\treturn 0;\n}\n",
    '{"key": [1, 2.5, true, null], "s": "a\\"b"}',
    "https://example.com/path?q=1&r=%20x#frag user@example.org",
    "!!!???... ---=== ((([[[{{{ }}}]]]))) <<<>>> ''' \"\"\" ``` ~~~",
    "snake_case camelCase PascalCase SCREAMING_CASE kebab-case",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_end|><|im_end|> <|im_end|>  <|im_end|>x",
    "<|im_ <|im_end <im_end|> <|IM_END|>",
    "<tool_call>{\"name\": \"f\"}</tool_call> <think>hmm</think>",
    "<｜begin▁of▁sentence｜>Hello<｜User｜>Hi<｜Assistant｜>Yo<｜end▁of▁sentence｜>",
    "x<｜User｜>y <｜User｜> z",
    "[gMASK]<sop><|system|>\nsys<|user|>\nquestion<|assistant|>\nanswer<|endoftext|>",
    "<s>[INST] Hello [/INST] Hi</s><s>[INST] again [/INST]",
    "<s> <s>x</s> </s>",
    "<unk> and <0x41> literal",
    "▁already▁has▁meta ▁ spaces",
    "hello world <mask> is here, then<mask>there and <mask> again; hello world!",
    "ab<mask>cd <mask>, <mask>- <mask>",
]

LONG_PARAGRAPH = (
    "Tandem runs mixture-of-experts language models on one machine with a GPU and its CPU working "
    "together: the GPU runs attention, the KV cache, the router and the shared experts, while the CPU "
    "runs the routed experts whose weights stay in DRAM. 混合专家模型把计算分给GPU和CPU。 "
    "In 2024 and 2025 models such as DeepSeek-V3 (671B parameters, 37B active) showed that 256 experts "
    "with top-8 routing work at scale; Qwen3-30B-A3B uses 128 experts and top-8. "
    "Les modèles de mélange d'experts sont efficaces. Die Experten werden über einen Router gewählt. "
    "ルーターはトークンごとに専門家を選びます。 يتم اختيار الخبراء لكل رمز. "
    "Numbers: 3.14159, 2.71828, 1.41421; dates 2025-01-31T12:34:56Z; ids 0xDEADBEEF, 0b1010. "
    "Code: for (int i = 0; i < n; i++) { y[i] += w[i] * x[i]; } "
    "Emoji 🚀✨ and ZWJ 👩‍💻 mark the end.\n\n"
)
HARD.append(LONG_PARAGRAPH * 3)
# long runs: one huge pre-token (or, without a pre-tokenizer, one huge word) each
HARD += ["a" * 3000, " " * 3000 + "x", "7" * 1000, "\n" * 500 + "end", "ab" * 1500, "😀" * 300]


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, errors="replace").stdout


def training_lines():
    apt = sh("apt-cache dumpavail 2>/dev/null | head -c 400000")
    lines = apt.splitlines()
    lib = os.path.dirname(json.__file__)
    for path in sorted(glob.glob(os.path.join(lib, "*.py")))[:4]:
        with open(path, encoding="utf-8") as f:
            lines += f.read().splitlines()
    for _ in range(30):
        lines += MULTILINGUAL.splitlines()
    for _ in range(3):
        lines += [h for h in HARD if h]
    return lines


def train(model, normalizer, pre_tokenizer, vocab_size, alphabet, special=(), limit_alphabet=None):
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    kw = dict(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=list(special),
              initial_alphabet=alphabet)
    if limit_alphabet:
        kw["limit_alphabet"] = limit_alphabet
    m = model
    if getattr(m, "continuing_subword_prefix", None):
        kw["continuing_subword_prefix"] = m.continuing_subword_prefix
    if getattr(m, "end_of_word_suffix", None):
        kw["end_of_word_suffix"] = m.end_of_word_suffix
    tok.train_from_iterator(training_lines(), trainers.BpeTrainer(**kw))
    return json.loads(tok.to_str())


def added(id_, content, special=True, normalized=None, lstrip=False, rstrip=False, single_word=False):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": (not special) if normalized is None else normalized,
            "special": special}


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTELEVEL_PT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def bpe_model(trained, merges_as_strings, **over):
    m = trained["model"]
    merges = m["merges"]
    if merges_as_strings:
        merges = [" ".join(p) if isinstance(p, list) else p for p in merges]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": False, "vocab": m["vocab"], "merges": merges}
    model.update(over)
    return model


def template(prefix, suffix, ids):
    single = [{"SpecialToken": {"id": t, "type_id": 0}} for t in prefix]
    single += [{"Sequence": {"id": "A", "type_id": 0}}]
    single += [{"SpecialToken": {"id": t, "type_id": 0}} for t in suffix]
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in prefix + suffix}}


def tokenizer_json(model, added_tokens, normalizer, pre_tokenizer, post, decoder):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
            "decoder": decoder, "model": model}


def build_qwen2():
    pt = {"type": "Sequence", "pretokenizers": [split(QWEN2_RE), BYTELEVEL_PT]}
    from tokenizers import Regex
    pt_py = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tr = train(models.BPE(), normalizers.NFC(), pt_py, 1500, pre_tokenizers.ByteLevel.alphabet())
    n = len(tr["model"]["vocab"])
    names = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
             ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
             ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
             ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
             ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
             ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
             ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
             ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
             ("<think>", False), ("</think>", False)]
    # Qwen's file marks every added token normalized=false, the non-special ones included
    at = [added(n + i, c, special=s, normalized=False) for i, (c, s) in enumerate(names)]
    return tokenizer_json(bpe_model(tr, False), at, {"type": "NFC"}, pt,
                          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
                          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False})


def build_deepseek_v3():
    from tokenizers import Regex
    bos, eos, pad = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    pt_py = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DS_DIGITS_RE), "isolated"),
        pre_tokenizers.Split(Regex(DS_CJK_RE), "isolated"),
        pre_tokenizers.Split(Regex(DS_MAIN_RE), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tr = train(models.BPE(), None, pt_py, 1500, pre_tokenizers.ByteLevel.alphabet(),
               special=[bos, eos, pad])
    n = len(tr["model"]["vocab"])
    at = [added(0, bos), added(1, eos), added(2, pad)]
    extra = [f"<｜place▁holder▁no▁{i}｜>" for i in range(8)]
    extra += ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
    at += [added(n + i, c) for i, c in enumerate(extra)]
    k = n + len(extra)
    at += [added(k, "<｜User｜>", special=False, normalized=True),
           added(k + 1, "<｜Assistant｜>", special=False, normalized=True),
           added(k + 2, "<|EOT|>", special=True),
           added(k + 3, "<｜tool▁calls▁begin｜>", special=False, normalized=True),
           added(k + 4, "<think>", special=False, normalized=True),
           added(k + 5, "</think>", special=False, normalized=True)]
    pt = {"type": "Sequence", "pretokenizers": [split(DS_DIGITS_RE), split(DS_CJK_RE), split(DS_MAIN_RE),
                                                dict(BYTELEVEL_PT, trim_offsets=True)]}
    return tokenizer_json(bpe_model(tr, True), at, {"type": "Sequence", "normalizers": []}, pt,
                          template([bos], [], {bos: 0}),
                          {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                           "use_regex": True})


def build_glm45():
    from tokenizers import Regex
    pt_py = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM4_RE), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tr = train(models.BPE(), None, pt_py, 1200, pre_tokenizers.ByteLevel.alphabet())
    n = len(tr["model"]["vocab"])
    names = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
             "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
             "<|begin_of_video|>", "<|end_of_video|>"]
    at = [added(n + i, c) for i, c in enumerate(names)]
    k = n + len(names)
    at += [added(k, "<think>", special=False, normalized=False),
           added(k + 1, "</think>", special=False, normalized=False),
           added(k + 2, "<tool_call>", special=False, normalized=False),
           added(k + 3, "</tool_call>", special=False, normalized=False)]
    ids = {c["content"]: c["id"] for c in at}
    pt = {"type": "Sequence", "pretokenizers": [split(GLM4_RE), dict(BYTELEVEL_PT, trim_offsets=True)]}
    post = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        template(["[gMASK]", "<sop>"], [], ids)]}
    return tokenizer_json(bpe_model(tr, False), at, None, pt, post,
                          {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                           "use_regex": True})


def sp_vocab(tr):
    """Renumber a trained Metaspace model into the Llama layout: <unk> <s> </s> <0x00>..<0xFF> rest."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = 3 + b
    for tok, _ in sorted(tr["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    tr = json.loads(json.dumps(tr))
    tr["model"]["vocab"] = vocab
    return tr


SP_ADDED = [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")]


def build_llama_sp():
    tr = sp_vocab(train(models.BPE(), None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                        1200, [], limit_alphabet=180))
    model = bpe_model(tr, True, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                 {"type": "Replace", "pattern": {"String": " "},
                                                  "content": "▁"}]}
    dec = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return tokenizer_json(model, SP_ADDED, norm, None, template(["<s>"], [], {"<s>": 1}), dec)


def build_llama_meta():
    tr = sp_vocab(train(models.BPE(), None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                        1000, [], limit_alphabet=160))
    model = bpe_model(tr, False, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    pt = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    dec = {"type": "Sequence", "decoders": [
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return tokenizer_json(model, SP_ADDED, None, pt, template(["<s>"], [], {"<s>": 1}), dec)


def build_gpt2_misc():
    from tokenizers import Regex
    norm_py = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                    normalizers.Replace(Regex(r"[\t ]{2,}"), "  ")])
    pt_py = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    tr = train(models.BPE(), norm_py, pt_py, 1000, pre_tokenizers.ByteLevel.alphabet())
    n = len(tr["model"]["vocab"])
    at = [added(n, "<s>"), added(n + 1, "</s>"), added(n + 2, "<pad>"),
          added(n + 3, "<mask>", special=True, lstrip=True, rstrip=True, single_word=True),
          added(n + 4, "hello world", special=False, normalized=True),
          added(n + 5, "İstanbul", special=False, normalized=False, single_word=True),
          added(n + 6, "<|im_end|>", special=True, rstrip=True)]
    norm = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"},
        {"type": "Replace", "pattern": {"Regex": "[\t ]{2,}"}, "content": "  "}]}
    pt = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    post = template(["<s>"], ["</s>"], {"<s>": n, "</s>": n + 1})
    return tokenizer_json(bpe_model(tr, False, ignore_merges=True), at, norm, pt, post,
                          {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                           "use_regex": True})


def build_suffix_misc():
    norm_py = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tr = train(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"), norm_py,
               pre_tokenizers.Whitespace(), 800, [], special=["[UNK]", "[CLS]", "[SEP]"], limit_alphabet=60)
    ids = tr["model"]["vocab"]
    at = [added(ids["[UNK]"], "[UNK]"), added(ids["[CLS]"], "[CLS]"), added(ids["[SEP]"], "[SEP]")]
    norm = {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"},
                                                {"type": "Lowercase"}]}
    post = {"type": "BertProcessing", "sep": ["[SEP]", ids["[SEP]"]], "cls": ["[CLS]", ids["[CLS]"]]}
    model = bpe_model(tr, True, unk_token="[UNK]", end_of_word_suffix="</w>")
    return tokenizer_json(model, at, norm, {"type": "Whitespace"}, post,
                          {"type": "BPEDecoder", "suffix": "</w>"})


def trained_tokenizer(model, normalizer, pre_tokenizer, decoder, post, vocab_size, alphabet, special,
                      limit_alphabet=None):
    """A building-block variant: configured through the Python API, trained, saved by tokenizers."""
    cfg = train(model, normalizer, pre_tokenizer, vocab_size, alphabet, special, limit_alphabet)
    tok = Tokenizer.from_str(json.dumps(cfg))
    if decoder is not None:
        tok.decoder = decoder
    if post is not None:
        tok.post_processor = post
    return json.loads(tok.to_str())


def build_blocks_a():
    """Strip + NFKD normalizers; Split behaviors MergedWithPrevious / MergedWithNext; Digits
    (contiguous); unk; no decoder (tokens joined with spaces); RobertaProcessing."""
    norm = normalizers.Sequence([normalizers.Strip(left=True, right=True), normalizers.NFKD()])
    pt = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), "merged_with_previous"),
                                  pre_tokenizers.Split("-", "merged_with_next"),
                                  pre_tokenizers.Digits(individual_digits=False)])
    cfg = trained_tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False), norm, pt, None, None, 700, [],
                            ["<unk>", "<s>", "</s>"], limit_alphabet=80)
    tok = Tokenizer.from_str(json.dumps(cfg))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return json.loads(tok.to_str())


def build_blocks_b():
    """Split Contiguous with invert, Punctuation (Removed), WhitespaceSplit; decoders Replace (Regex)
    and Strip with stop; fuse_unk."""
    pt = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[aeiou]+"), "contiguous", invert=True),
                                  pre_tokenizers.Punctuation("removed"), pre_tokenizers.WhitespaceSplit()])
    # tokenizers' Strip panics when a token is shorter than `right` (the empty text here): those
    # decodes are recorded as null and only checked not to crash
    dec = decoders.Sequence([decoders.Replace(Regex(r"[aeiou]{2}"), "_"), decoders.Fuse(),
                             decoders.Strip(content="x", left=1, right=2)])
    return trained_tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True), normalizers.Lowercase(), pt,
                             dec, None, 700, [], ["<unk>"], limit_alphabet=60)


def build_blocks_c():
    """Metaspace split=true (MergedWithNext) with prepend "always"; continuing_subword_prefix;
    Metaspace decoder; Prepend + Replace(String) normalizers."""
    norm = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Prepend("~")])
    pt = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return trained_tokenizer(models.BPE(unk_token="<unk>", continuing_subword_prefix="##"), norm, pt,
                             decoders.Metaspace(replacement="▁", prepend_scheme="always"), None, 800, [],
                             ["<unk>"], limit_alphabet=120)


def build_blocks_d():
    """ByteLevel normalizer, BertPreTokenizer, NFD + StripAccents, ByteLevel decoder."""
    norm = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.ByteLevel()])
    return trained_tokenizer(models.BPE(), norm, pre_tokenizers.BertPreTokenizer(), decoders.ByteLevel(),
                             None, 700, pre_tokenizers.ByteLevel.alphabet(), [])


FAMILIES = {
    "qwen2": build_qwen2,
    "deepseek_v3": build_deepseek_v3,
    "glm45": build_glm45,
    "llama_sp": build_llama_sp,
    "llama_meta": build_llama_meta,
    "gpt2_misc": build_gpt2_misc,
    "suffix_misc": build_suffix_misc,
    "blocks_a": build_blocks_a,
    "blocks_b": build_blocks_b,
    "blocks_c": build_blocks_c,
    "blocks_d": build_blocks_d,
}


# invalid UTF-8: bpe_encode repairs it like bytes.decode("utf-8", "replace") (one U+FFFD per maximal
# ill-formed subpart) and must then give the ids tokenizers gives for the repaired text
INVALID = [b"\xff\xfeabc", b"abc\xe4\xb8", b"\xe4\xb8\xadx\xe4", b"\xc0\xaf overlong",
           b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80 too big", b"\x80\x80\x80",
           b"ok \xf0\x9f\x98 cut emoji", b"<|im_end|>\xff<|im_end|>", b"\xf0\x9f\x98\x80\xf0",
           b"\xe0\x80\x80\xe0\xa0", b"a\xf5b\xf8c\xfed"]


def decode_cases(tok, n_vocab, cases, rng):
    out = []
    for _ in range(40):
        ids = [rng.randrange(n_vocab) for _ in range(rng.randrange(1, 14))]
        out.append(ids)
    # real sequences cut at every position: starts and ends inside UTF-8 characters
    for text in ["👨‍👩‍👧‍👦 你好 नमस्ते", "é🇫🇷x", "<s>Ελλάδα</s>"]:
        ids = tok.encode(text, add_special_tokens=True).ids
        for i in range(len(ids)):
            out.append(ids[i:])
            out.append(ids[:i])
    res = []
    for ids in out:
        for skip in (False, True):
            res.append({"ids": ids, "skip": skip, "text": safe_decode(tok, ids, skip)})
    return res


def safe_decode(tok, ids, skip):
    """tok.decode, or None where tokenizers itself panics (Strip on a too short token)."""
    try:
        return tok.decode(ids, skip_special_tokens=skip)
    except BaseException:  # pyo3's PanicException derives from BaseException
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/tokenizers")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(1234)
    for name, build in FAMILIES.items():
        if args.only and name not in args.only:
            continue
        cfg = build()
        text = json.dumps(cfg, ensure_ascii=False, indent=None, separators=(",", ":"))
        tok = Tokenizer.from_str(text)          # what we record is what `tokenizers` does with the file
        path = os.path.join(args.out, name + ".tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        ids_all = list(cfg["model"]["vocab"].values()) + [a["id"] for a in cfg["added_tokens"]]
        n_vocab = max(ids_all) + 1
        cases = []
        for h in HARD:
            e = tok.encode(h, add_special_tokens=False).ids
            s = tok.encode(h, add_special_tokens=True).ids
            cases.append({"text": h, "ids": e, "ids_special": s,
                          "dec": safe_decode(tok, e, False),
                          "dec_special": safe_decode(tok, s, False),
                          "dec_special_skip": safe_decode(tok, s, True)})
        exp = {"tokenizer": name + ".tokenizer.json", "n_vocab": n_vocab, "cases": cases,
               "decode": decode_cases(tok, n_vocab, cases, rng),
               "invalid": [{"hex": b.hex(), "ids": tok.encode(b.decode("utf-8", "replace"),
                                                              add_special_tokens=False).ids}
                           for b in INVALID]}
        with open(os.path.join(args.out, name + ".expect.json"), "w", encoding="utf-8") as f:
            json.dump(exp, f, ensure_ascii=False, separators=(",", ":"))
        rt = sum(c["dec"] == c["text"] for c in cases)
        print(f"{name}: vocab {len(cfg['model']['vocab'])}, added {len(cfg['added_tokens'])}, "
              f"{len(cases)} cases ({rt} round-trip), {len(exp['decode'])} decode cases")


if __name__ == "__main__":
    sys.exit(main())
