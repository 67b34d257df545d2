#!/usr/bin/env python3
"""Build the tiktoken (Kimi-K2 / K2.5) tokenizer fixture under tests/fixtures/tokenizers/kimi_k2/.

Role: Kimi-K2 ships no tokenizer.json; its tokenizer is tiktoken.model (one "<base64 bytes> <rank>"
line per token, the rank being the id) plus moonshotai's tokenization_kimi.py, which fixes the split
pattern (KIMI_PAT below, an o200k-style pattern that keeps runs of Han characters apart) and puts 256
special ids right after the base vocabulary, named by tokenizer_config.json's added_tokens_decoder and
"<|reserved_token_{id}|>" where it names none. This script writes a SMALL model directory of that
shape and records what the `tiktoken` package does with it; tests/test_tokenizer.c compares
bpe_load_tiktoken() (and tandem_tokenizer_open() on the directory) against it.

Files written:
  kimi_k2/tiktoken.model         ~3k ranks: the 256 single bytes in a shuffled order (so nothing may
                                 assume rank == byte), then byte-level BPE merges trained with
                                 `tokenizers` on the text of make_tokenizer_fixtures.py pre-split with
                                 KIMI_PAT (Oniguruma understands its && class intersections), then a
                                 few tokens no merge sequence reaches ("zqxjv", a lone-surrogate-free
                                 but non-UTF-8 byte string), which tiktoken still emits when a whole
                                 pre-token equals them
  kimi_k2/tokenizer_config.json  added_tokens_decoder for the named specials at Kimi's offsets from the
                                 base size ([BOS] +0, [EOS] +1, <|im_end|> +2 ... [UNK] +254,
                                 [PAD] +255), bos/eos/unk/pad, tokenizer_class TikTokenTokenizer
  kimi_k2/chat_template.jinja    Kimi-K2-Instruct's template (copied from tests/fixtures/templates)
  kimi_k2.expect.json            the format of make_tokenizer_fixtures.py (cases, decode, invalid):
      ids = ids_special = enc.encode(text, allowed_special="all")  (Kimi's encode adds no BOS)
      dec = enc.decode(ids)  (bytes joined, then decoded with errors="replace")
      dec_special_skip = the same without the 256 special ids
      "tiktoken": "kimi_k2" tells the C test to load the directory instead of a tokenizer.json.

Run (a few seconds):  python3 tools/make_tiktoken_fixtures.py [--out tests/fixtures/tokenizers]
Needs: tiktoken, tokenizers (pip install --break-system-packages tiktoken tokenizers).
"""

import argparse
import base64
import json
import os
import random
import shutil
import sys

import tiktoken
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tokenizer_fixtures as mtf  # noqa: E402  (shared hard strings and training text)

KIMI_PAT = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

N_RESERVED = 256
# offsets from the base vocabulary size, as in Kimi-K2's tokenizer_config.json
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
         6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
         11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
         13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
         17: "<|im_middle|>", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>",
         21: "<|media_pad|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]"}

# strings that only this tokenizer makes interesting: Han next to other scripts, the
# case-insensitive contractions after upper-case runs, digits in threes, kana vs Han
KIMI_HARD = [
    "中文English混合text日本語ひらがなカタカナ한국어",
    "々〆〇〻ヶ 〡〢 ㆒㆓ ⺀⼀ 𠀀𪜀 豈",
    "HELLO'S World'S they'RE ABC'd mIxEd'Ll O'NEIL ſ'S",
    "CamelCaseWord XMLHttpRequest iPhone eBay McDonald",
    "1 12 123 1234 12345 123456 1234567 ٣٤٥٦ ５６７８",
    "a/b/c path//to///x and ://",
    "  \n\n  \r\n\r\n\t \t  x  \n",
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>你好<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>",
    "[BOS]text[EOS] [EOT]x[UNK][PAD]",
    "<think>reason</think>answer <|tool_calls_section_begin|><|tool_call_begin|>f<|tool_call_end|>",
    "zqxjv zqxjvzqxjv xzqxjv",
]


def train_ranks():
    """Byte ranks (shuffled) + trained merges, as {bytes: rank}."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KIMI_PAT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tr = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the very long hard strings would train tokens of hundreds of bytes; real vocabularies have none
    tok.train_from_iterator([s for s in mtf.training_lines() if len(s) < 300], tr)
    cfg = json.loads(tok.to_str())
    byte_of = {}
    for b in range(256):
        byte_of[chr(mtf_byte_to_cp(b))] = b

    def to_bytes(s):
        return bytes(byte_of[c] for c in s)

    order = list(range(256))
    random.Random(7).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    for m in cfg["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        t = to_bytes(a) + to_bytes(b)
        if t not in ranks:
            ranks[t] = len(ranks)
    for extra in (b"zqxjv", b"\xe4\xb8", b"\x80\x80 \xff"):
        if extra not in ranks:
            ranks[extra] = len(ranks)
    return ranks


def mtf_byte_to_cp(b):
    """GPT-2's bytes_to_unicode (printable Latin-1 bytes stand for themselves)."""
    if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
        return b
    others = [x for x in range(256) if not (0x21 <= x <= 0x7E or 0xA1 <= x <= 0xAC or 0xAE <= x <= 0xFF)]
    return 256 + others.index(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/tokenizers")
    args = ap.parse_args()
    d = os.path.join(args.out, "kimi_k2")
    os.makedirs(d, exist_ok=True)
    ranks = train_ranks()
    n_base = len(ranks)
    with open(os.path.join(d, "tiktoken.model"), "w") as f:
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(t).decode() + " " + str(r) + "\n")
    # exactly what tokenization_kimi.py builds from these two files
    special = {NAMED.get(i, f"<|reserved_token_{n_base + i}|>"): n_base + i for i in range(N_RESERVED)}
    enc = tiktoken.Encoding(name="kimi_k2_fixture", pat_str=KIMI_PAT, mergeable_ranks=ranks,
                            special_tokens=special)
    atd = {str(n_base + i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, c in sorted(NAMED.items())}
    cfg = {"added_tokens_decoder": atd, "bos_token": "[BOS]", "eos_token": "[EOS]",
           "unk_token": "[UNK]", "pad_token": "[PAD]", "model_max_length": 131072,
           "tokenizer_class": "TikTokenTokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copy("tests/fixtures/templates/kimi-k2-instruct/chat_template.jinja",
                os.path.join(d, "chat_template.jinja"))

    n_vocab = n_base + N_RESERVED

    def dec(ids, skip=False):
        return enc.decode([i for i in ids if not (skip and i >= n_base)])

    cases = []
    for h in mtf.HARD + KIMI_HARD:
        ids = enc.encode(h, allowed_special="all")
        cases.append({"text": h, "ids": ids, "ids_special": ids, "dec": dec(ids),
                      "dec_special": dec(ids), "dec_special_skip": dec(ids, True)})
    rng = random.Random(99)
    decode = []
    seqs = [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, 14))] for _ in range(40)]
    for text in ["👨‍👩‍👧‍👦 你好 नमस्ते", "é🇫🇷x", "[BOS]Ελλάδα<|im_end|>"]:
        ids = enc.encode(text, allowed_special="all")
        for i in range(len(ids)):
            seqs += [ids[i:], ids[:i]]
    for ids in seqs:
        for skip in (False, True):
            decode.append({"ids": ids, "skip": skip, "text": dec(ids, skip)})
    invalid = [{"hex": b.hex(), "ids": enc.encode(b.decode("utf-8", "replace"), allowed_special="all")}
               for b in mtf.INVALID]
    # the directory as a whole (tandem_tokenizer_open): the chat template rendered as transformers
    # renders it (jinja2 sandbox, trim_blocks, lstrip_blocks), then encoded
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    with open(os.path.join(d, "chat_template.jinja")) as f:
        tmpl = env.from_string(f.read())
    messages = [{"role": "system", "content": "You are Kimi, 月之暗面的助手."},
                {"role": "user", "content": "What's 12345 + 678? 用中文回答 🙂"},
                {"role": "assistant", "content": "13023。"},
                {"role": "user", "content": "Thanks!\n\n  Bye"}]
    text = tmpl.render(messages=messages, tools=None, add_generation_prompt=True, bos_token="[BOS]",
                       eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]")
    chat = {"messages": messages, "text": text, "ids": enc.encode(text, allowed_special="all"),
            "eos": [n_base + 1, n_base + 2]}
    exp = {"tiktoken": "kimi_k2", "n_vocab": n_vocab, "cases": cases, "decode": decode,
           "invalid": invalid, "chat": chat}
    with open(os.path.join(args.out, "kimi_k2.expect.json"), "w", encoding="utf-8") as f:
        json.dump(exp, f, ensure_ascii=False, separators=(",", ":"))
    rt = sum(c["dec"] == c["text"] for c in cases)
    print(f"kimi_k2: {n_base} ranks + {N_RESERVED} specials, {len(cases)} cases ({rt} round-trip), "
          f"{len(decode)} decode cases")


if __name__ == "__main__":
    sys.exit(main())
