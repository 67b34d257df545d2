#!/usr/bin/env python3
"""train_demo.py: train the demo model that ships with tandem (models/demo).

Role
    A small Qwen3-MoE model (transformers' Qwen3MoeForCausalLM) with its own byte-level BPE
    tokenizer, trained on the package descriptions of `apt-cache dumpavail` (the corpus of
    tools/demo_corpus.py), for a wall-clock budget. It is the model of tandem's first command
    and the trained model on which quantisation and expert deferral are judged, so what it
    writes must load unchanged in transformers and in tandem:

        config.json             hub style, like Qwen/Qwen3-30B-A3B (num_experts, rope_theta)
        model.safetensors       bf16, hub tensor names, one tensor per expert
                                (model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight)
        tokenizer.json          Qwen2-style byte-level BPE, specials at the end of the vocab
        tokenizer_config.json   bos/eos/pad, ChatML chat_template (Qwen2.5's minus tools)
        generation_config.json
        training.json           sizes, steps, tokens, minutes, losses, ppl, versions, log
        heldout_ppl.json, heldout_tokens.u16   from eval_demo.evaluate (same code as there)

    That is 8 files, all written into --out (which may be the GPU machine's $OUT).

How to run
    python3 tools/demo_corpus.py          # here: writes .corpus/apt-descriptions.jsonl.gz
    python3 tools/train_demo.py --corpus .corpus/apt-descriptions.jsonl.gz --out "$OUT" \
        --minutes 6 --device cuda         # on the H200 (no network needed), ~7 min in all
    Smoke test on a CPU: add --device cpu --minutes 1 --max-docs 8000 --eval-tokens 8192.

Invariants
    - config.json and model.safetensors are written by this script, not by save_pretrained:
      their layout is then the hub's, whatever transformers version runs here (5.x writes
      num_local_experts and rope_parameters). Both are checked by loading them back with
      from_pretrained and comparing logits with the model in memory, once before training
      (so a mismatch costs seconds) and once after.
    - The weights in memory are rounded to bf16 before each export, so the model that is
      evaluated is exactly the one saved.
    - The training stream is <|endoftext|> + document, repeated, like the held-out stream of
      eval_demo.py; windows of --seq tokens are cut at random offsets.
    - A few percent of training documents are added a second time as a ChatML conversation
      ("Describe the Debian package X." -> the document), rendered exactly as the chat
      template does (checked), so `tandem chat` gives sensible answers too.
"""

import argparse
import json
import math
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_demo  # noqa: E402  (the held-out definition lives there)

SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are a helpful assistant."
# Qwen2.5's template without the tools branches; '\n' stays an escape inside Jinja literals,
# as in the official templates.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or message.role == 'assistant' or "
    "(message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QUESTIONS = ["Describe the Debian package %s.", "What is the package %s?", "What does %s do?"]
PROMPTS = ["Package: ", "Package: python3-", "Package: lib", "Package: fonts-",
           "Package: golang-", "Package: tandem\nDescription:"]

T0 = time.time()
LOG = []


def log(msg):
    line = "[%6.1fs] %s" % (time.time() - T0, msg)
    LOG.append(line)
    print(line, flush=True)


def die(msg):
    print("error: " + msg, file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size):
    """Byte-level BPE exactly like Qwen2's pipeline; the 3 specials take the last ids."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    n_bpe = vocab_size - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != n_bpe:
        die("BPE training gave %d tokens, wanted %d: the corpus is too small for --vocab %d"
            % (tok.get_vocab_size(), n_bpe, vocab_size))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def write_tokenizer_files(tok, out, seq):
    """tokenizer.json and tokenizer_config.json; returns the tokenizer as read back from
    the file (what training then uses) and the ids of the special tokens."""
    from tokenizers import Tokenizer
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    # Spell the defaults as Qwen2.5's tokenizer.json does (tokenizers writes None / true
    # here; decoding is the same either way).
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False}
    j["model"]["continuing_subword_prefix"] = ""
    j["model"]["end_of_word_suffix"] = ""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False)
    tok = Tokenizer.from_file(path)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[s]): {"content": s, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False,
                                               "special": True} for s in SPECIALS},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        # No BOS is prepended when encoding (as in Qwen); documents are separated, and
        # evaluated, with <|endoftext|> in front, so it is the natural BOS for prompts.
        "bos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": seq,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok, ids


def render_chat(messages):
    """What CHAT_TEMPLATE renders (add_generation_prompt=False); checked in preflight."""
    s = "" if messages[0]["role"] == "system" else "<|im_start|>system\n%s<|im_end|>\n" % SYSTEM
    return s + "".join("<|im_start|>%s\n%s<|im_end|>\n" % (m["role"], m["content"])
                       for m in messages)


def chat_example(text, rng):
    name = text.split("\n", 1)[0][len("Package: "):]
    return render_chat([{"role": "user", "content": rng.choice(QUESTIONS) % name},
                        {"role": "assistant", "content": text.rstrip("\n")}])


# ---------------------------------------------------------------- model files

def model_config(a, ids):
    """config.json in the hub's Qwen3-MoE style (what real checkpoints ship)."""
    import transformers
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": 4 * a.hidden,  # dense MLP size: unused, every layer is MoE
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.seq,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": a.layers,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": a.moe_inter,
        "num_experts": a.experts,
        "num_experts_per_tok": a.top_k,
        "norm_topk_prob": True,
        "output_router_logits": False,
        "router_aux_loss_coef": a.aux_coef,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "torch_dtype": "bfloat16",
        "transformers_version": transformers.__version__,
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def hub_tensors(model, cfg):
    """The model's weights under the hub's names, one tensor per expert, bf16.

    transformers 5.x keeps the experts of a layer fused in memory (gate_up_proj [E, 2I, D],
    down_proj [E, D, I]); 4.x kept them per expert. Both are accepted; anything else stops
    with the name and shape, before any time is spent training."""
    import torch
    E, I, D = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.bfloat16)
        if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            if tuple(t.shape) == (E, D, 2 * I) and D != 2 * I:
                t = t.transpose(1, 2)
            if tuple(t.shape) != (E, 2 * I, D):
                die("unexpected layout of %s: %s" % (k, tuple(t.shape)))
            base = k[:-len("gate_up_proj")]
            for e in range(E):
                out["%s%d.gate_proj.weight" % (base, e)] = t[e, :I].contiguous()
                out["%s%d.up_proj.weight" % (base, e)] = t[e, I:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            if tuple(t.shape) == (E, I, D) and D != I:
                t = t.transpose(1, 2)
            if tuple(t.shape) != (E, D, I):
                die("unexpected layout of %s: %s" % (k, tuple(t.shape)))
            base = k[:-len("down_proj")]
            for e in range(E):
                out["%s%d.down_proj.weight" % (base, e)] = t[e].contiguous()
        else:
            out[k] = t.contiguous()
    return out


def round_to_bf16(model):
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def export_and_check(model, cfg, out, x):
    """Write model.safetensors, load the folder with from_pretrained (float32) and compare
    its logits on x with the in-memory model's, both with the same experts kernel.
    Returns (max |logit diff|, fraction of positions off by more than 1e-3, parameters).

    A wrong tensor layout or config shows at every position; a lone position may differ
    only where float32 rounding flips a near-tie in the router's top-k, so it stops only
    when more than 1% of positions disagree."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    round_to_bf16(model)
    tensors = hub_tensors(model, cfg)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    dev = x.device
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(dev).eval()
    impl = getattr(model.config, "_experts_implementation", None)
    if impl is not None:
        set_experts_impl(loaded, impl)
    was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    model.eval()
    with torch.no_grad():
        a = model(input_ids=x, use_cache=False).logits.float()
        b = loaded(input_ids=x, use_cache=False).logits.float()
    model.train(was_training)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    per_pos = (a - b).abs().amax(dim=-1)
    diff, bad = per_pos.max().item(), (per_pos > 1e-3).float().mean().item()
    n_params = sum(t.numel() for t in tensors.values())
    if bad > 0.01:
        die("the saved model does not reproduce the one in memory: %.1f%% of positions differ, "
            "max |logit diff| %.3g (tensor layout or config mismatch; transformers %s)"
            % (100 * bad, diff, _tf_version()))
    del loaded
    return diff, bad, n_params


def _tf_version():
    import transformers
    return transformers.__version__


# ---------------------------------------------------------------- checks before training

def preflight(out, raw_tok, train_texts):
    """transformers must load our tokenizer files and agree with `tokenizers` exactly."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(out)
    probe = train_texts[:200] + [
        "<|endoftext|>Package: x\nDescription: a<|im_end|>\n", "  spaces\n\n\ttabs 123 ünïcödé 日本",
        "don't I'LL we've", chat_example(train_texts[0], random.Random(0))]
    for s in probe:
        a = raw_tok.encode(s).ids
        b = hf(s, add_special_tokens=False)["input_ids"]
        if a != b:
            die("transformers' tokenizer (%s) encodes %r differently from tokenizers"
                % (type(hf).__name__, s[:60]))
        if hf.decode(b) != s and raw_tok.decode(a, skip_special_tokens=False) != s:
            die("tokenizer round trip fails on %r" % s[:60])
    msgs = [{"role": "user", "content": "Describe the Debian package x."},
            {"role": "assistant", "content": "Package: x\nDescription: y"}]
    got = hf.apply_chat_template(msgs, tokenize=False)
    if got != render_chat(msgs):
        die("chat template renders %r, expected %r" % (got, render_chat(msgs)))
    return hf


# ---------------------------------------------------------------- training

def encode_stream(raw_tok, docs, eot):
    """<|endoftext|> + document, for every document, as one flat list."""
    stream = []
    for i in range(0, len(docs), 4096):
        for enc in raw_tok.encode_batch(docs[i:i + 4096]):
            stream.append(eot)
            stream.extend(enc.ids)
    return stream


def lr_at(a, step, frac):
    """Linear warm-up over --warmup steps, then cosine to lr/10 over the time budget."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    return a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def heldout_loss(model, windows, autocast):
    import torch
    import torch.nn.functional as F
    model.eval()
    with torch.no_grad(), autocast():
        logits = model(input_ids=windows, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               windows[:, 1:].reshape(-1)).item()
    model.train()
    return loss


def set_experts_impl(model, impl):
    """Select transformers' experts kernel ("eager" loop, "grouped_mm", ...); False if this
    transformers has no such switch or refuses the choice."""
    try:
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(impl)
        elif hasattr(model.config, "_experts_implementation"):
            model.config._experts_implementation = impl
        else:
            return False
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(model.config, "_experts_implementation", None) == impl


def pick_experts_impl(model, step_loss, x, autocast, sync):
    """Time a few forward+backward passes with each experts kernel and keep the fastest that
    works: which one wins (or runs at all, in float32 under autocast) depends on the torch
    and transformers versions of the machine. No optimizer step: weights do not change."""
    current = getattr(model.config, "_experts_implementation", None)
    if current is None:
        return None, {}
    times, active = {}, current
    for impl in dict.fromkeys([current, "grouped_mm", "eager"]):
        # The current kernel needs no switch (an old transformers may have none).
        if impl != active and not set_experts_impl(model, impl):
            continue
        active = impl
        try:
            for i in range(5):
                if i == 2:
                    sync()
                    t = time.time()
                with autocast():
                    ce, aux = step_loss(x)
                (ce + aux).backward()
            sync()
            times[impl] = (time.time() - t) / 3
        except Exception as e:  # a kernel this torch lacks for these dtypes: try the next
            log("experts implementation %s fails here (%s: %s)" % (impl, type(e).__name__, str(e)[:160]))
        model.zero_grad(set_to_none=True)
    if not times:
        die("no experts implementation runs on this machine")
    best = min(times, key=times.get)
    if best != active and not set_experts_impl(model, best):
        if active not in times:
            die("cannot switch transformers back to experts implementation %s" % best)
        best = active
    return best, {k: round(v, 4) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description="train the tandem demo model (Qwen3-MoE, apt descriptions)")
    ap.add_argument("--corpus", default=".corpus/apt-descriptions.jsonl.gz")
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (smoke tests)")
    g = ap.add_argument_group("model")
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--moe-inter", type=int, default=32)
    g = ap.add_argument_group("training")
    g.add_argument("--seq", type=int, default=512, help="context length (= max_position_embeddings)")
    g.add_argument("--batch", type=int, default=None, help="sequences per step (default 128 cuda, 4 cpu)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--wd", type=float, default=0.1)
    g.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    g.add_argument("--chat-fraction", type=float, default=0.05)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back if it fails)")
    g.add_argument("--log-every", type=float, default=10.0, help="seconds between log lines")
    g.add_argument("--eval-every", type=float, default=20.0, help="seconds between held-out checks")
    g.add_argument("--eval-tokens", type=int, default=200000, help="held-out perplexity budget")
    a = ap.parse_args()

    import numpy as np
    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        die("--device cuda but torch sees no GPU")
    if not os.path.exists(a.corpus):
        die("%s does not exist: build it with tools/demo_corpus.py" % a.corpus)
    if a.heads % a.kv_heads or a.top_k > a.experts or a.vocab > 65536:
        die("inconsistent sizes: heads %% kv-heads, top-k <= experts, vocab <= 65536")
    batch = a.batch or (128 if dev.startswith("cuda") else 4)
    os.makedirs(a.out, exist_ok=True)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log("torch %s, transformers %s, tokenizers %s, device %s%s" % (
        torch.__version__, transformers.__version__, tokenizers.__version__, dev,
        " (%s)" % torch.cuda.get_device_name() if cuda else ""))

    # Corpus and tokenizer.
    header, train_texts, held_texts = eval_demo.read_corpus(a.corpus, a.max_docs)
    log("corpus %s: %d train / %d held-out documents, %.1f MB train text" % (
        a.corpus, len(train_texts), len(held_texts), sum(map(len, train_texts)) / 1e6))
    raw_tok, ids = write_tokenizer_files(train_tokenizer(train_texts, a.vocab), a.out, a.seq)
    eot = ids["<|endoftext|>"]
    hf_tok = preflight(a.out, raw_tok, train_texts)
    log("tokenizer: %d tokens, specials %s; transformers agrees (%s)" % (
        raw_tok.get_vocab_size(), ids, type(hf_tok).__name__))

    rng = random.Random(a.seed)
    chat = [chat_example(t, rng) for t in rng.sample(train_texts, int(len(train_texts) * a.chat_fraction))]
    docs = train_texts + chat
    rng.shuffle(docs)
    stream = encode_stream(raw_tok, docs, eot)
    data = torch.tensor(np.asarray(stream, dtype=np.int64), device=dev)
    n_tok = data.numel()
    if n_tok < batch * (a.seq + 1):
        die("only %d training tokens, fewer than one batch" % n_tok)
    log("train stream: %d tokens (%.2f bytes/token), %d chat examples" % (
        n_tok, sum(len(d.encode()) for d in docs) / n_tok, len(chat)))
    # Held-out windows watched during training: taken from the tail of the held-out stream,
    # past the tokens eval_demo scores, so choosing the best checkpoint on them leaves the
    # reported perplexity unbiased.
    hstream = eval_demo.heldout_stream(hf_tok, held_texts)
    n_ppl = min(a.eval_tokens, len(hstream)) // a.seq * a.seq
    tail = hstream[n_ppl:]
    n_mon = min(32, len(tail) // a.seq)
    select = n_mon >= 4
    if select:
        hwin = [tail[i * a.seq:(i + 1) * a.seq] for i in range(n_mon)]
    else:
        hwin = eval_demo.heldout_windows(hf_tok, held_texts, a.seq, 32 * a.seq, hstream)
        log("note: the held-out split (%d tokens) has no tail past the %d scored tokens: "
            "training watches scored windows and keeps the last weights" % (len(hstream), n_ppl))
    hwin = torch.tensor(hwin, dtype=torch.long, device=dev)

    # Model: built from the config.json we ship, so training and loading agree.
    cfg = model_config(a, ids)
    write_json(os.path.join(a.out, "config.json"), cfg)
    write_json(os.path.join(a.out, "generation_config.json"), {
        "bos_token_id": eot, "eos_token_id": [eot, ids["<|im_end|>"]], "pad_token_id": eot,
        "do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 40,
        "repetition_penalty": 1.05, "max_new_tokens": 256,
        "transformers_version": transformers.__version__})
    config = AutoConfig.from_pretrained(a.out)
    # float32 master weights: from_config would follow the config's bf16 torch_dtype.
    model = AutoModelForCausalLM.from_config(config).float().to(dev)
    diff, bad, n_params = export_and_check(model, cfg, a.out, hwin[:2])
    n_expert = a.layers * a.experts * 3 * a.hidden * a.moe_inter
    n_active = n_params - n_expert * (a.experts - a.top_k) // a.experts
    log("model: %d params (%.2f MB bf16), %d active per token; "
        "export check max|dlogit| %.2g (%.2f%% of positions > 1e-3)"
        % (n_params, 2 * n_params / 1e6, n_active, diff, 100 * bad))

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    ar = torch.arange(a.seq, device=dev)
    fwd = model

    def step_loss(x):
        out = fwd(input_ids=x, use_cache=False, output_router_logits=a.aux_coef > 0)
        ce = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, a.vocab), x[:, 1:].reshape(-1))
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros((), device=dev)
        return ce, aux

    def sync():
        if cuda:
            torch.cuda.synchronize()

    x0 = data[torch.randint(0, n_tok - a.seq, (batch,), device=dev)[:, None] + ar]
    experts_impl, impl_times = pick_experts_impl(model, step_loss, x0, autocast, sync)
    log("experts implementation: %s (seconds per step: %s)" % (experts_impl, impl_times))
    if a.compile:
        fwd = torch.compile(model)

    log("training %.1f min: batch %d x %d tokens, lr %.1e, warmup %d, wd %.2f, aux %.3f" % (
        a.minutes, batch, a.seq, a.lr, a.warmup, a.wd, a.aux_coef))
    budget = a.minutes * 60
    curve, ce_acc, aux_acc, n_acc = [], 0.0, 0.0, 0
    step, tokens, last_log, last_eval = 0, 0, 0.0, 0.0
    best = {"loss": float("inf"), "step": 0, "state": None}
    last_hl = None
    model.train()
    t_start = time.time()
    done = False
    while not done:
        lr = lr_at(a, step, (time.time() - t_start) / budget)
        for grp in opt.param_groups:
            grp["lr"] = lr
        off = torch.randint(0, n_tok - a.seq, (batch,), device=dev)
        x = data[off[:, None] + ar]
        try:
            with autocast():
                ce, aux = step_loss(x)
        except Exception as e:  # only torch.compile may fail here; eager errors are real
            if fwd is model:
                raise
            log("torch.compile failed (%s: %s); continuing without it" % (type(e).__name__, str(e)[:200]))
            fwd = model
            continue
        loss = ce + a.aux_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch * a.seq
        ce_acc, aux_acc, n_acc = ce_acc + ce.detach(), aux_acc + aux.detach(), n_acc + 1
        el = time.time() - t_start
        done = el >= budget  # the last step always logs and checks held-out
        if el - last_log >= a.log_every or done:
            tl, al = float(ce_acc) / n_acc, float(aux_acc) / n_acc
            hl = None
            if el - last_eval >= a.eval_every or done:
                hl = last_hl = heldout_loss(model, hwin, autocast)
                last_eval = el
                if select and hl < best["loss"]:
                    best = {"loss": hl, "step": step,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            curve.append({"step": step, "min": round(el / 60, 3), "loss": round(tl, 4),
                          "aux": round(al, 4), "heldout_loss": None if hl is None else round(hl, 4)})
            log("step %6d  %5.2f min  lr %.2e  loss %.4f  aux %.3f%s  %.0fk tok/s  epoch %.2f" % (
                step, el / 60, lr, tl, al, "" if hl is None else "  held-out %.4f" % hl,
                tokens / el / 1e3, tokens / n_tok))
            ce_acc, aux_acc, n_acc, last_log = 0.0, 0.0, 0, el
    train_s = time.time() - t_start

    # Keep the best watched checkpoint: with many epochs over a small corpus the last one
    # may have begun to overfit.
    final_hl = last_hl
    if select and best["state"] is not None and best["step"] != step and best["loss"] < final_hl:
        model.load_state_dict(best["state"])
        log("keeping step %d (held-out %.4f) over the last step (%.4f)" % (best["step"], best["loss"], final_hl))
    else:
        best["step"] = step
    best["state"] = None

    # Save, check the saved files reproduce the model, then evaluate them with transformers.
    diff, bad, _ = export_and_check(model, cfg, a.out, hwin[:4])
    log("saved %s (export check max|dlogit| %.2g, %.2f%% of positions > 1e-3)" % (a.out, diff, 100 * bad))
    del model, fwd, opt, data
    res = eval_demo.evaluate(a.out, a.corpus, a.out, a.seq, a.eval_tokens, dev, a.max_docs, quiet=True)
    log("held-out ppl %.4f (nll %.4f) over %d tokens, transformers float32" % (
        res["ppl"], res["nll"], res["tokens"]))

    samples = generate_samples(a.out, dev, a.seed, ids)
    info = {
        "model": {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                                      "moe_intermediate_size", "max_position_embeddings", "tie_word_embeddings")},
        "params": n_params, "params_active_per_token": n_active, "bytes_bf16": 2 * n_params,
        "experts_implementation": experts_impl, "experts_step_seconds": impl_times,
        "export_check": {"max_abs_logit_diff": diff, "positions_over_1e-3": bad},
        "steps": step, "batch": batch, "seq": a.seq, "tokens_seen": tokens,
        "train_tokens": n_tok, "epochs": round(tokens / n_tok, 3),
        "minutes": round(train_s / 60, 3), "tokens_per_s": round(tokens / train_s),
        "total_minutes": round((time.time() - T0) / 60, 3),
        "train_loss": curve[-1]["loss"], "watched_heldout_loss_bf16": final_hl,
        "selected_step": best["step"], "watched_windows": int(hwin.shape[0]),
        "watched_windows_disjoint_from_ppl": select,
        "heldout_ppl": res["ppl"], "heldout_nll": res["nll"], "heldout_tokens": res["tokens"],
        "hyper": {"lr": a.lr, "warmup": a.warmup, "schedule": "cosine over wall time to lr/10",
                  "wd": a.wd, "betas": [0.9, 0.95], "clip": 1.0, "aux_coef": a.aux_coef,
                  "chat_fraction": a.chat_fraction, "seed": a.seed, "compile": a.compile,
                  "autocast": "bf16" if cuda else "fp32"},
        "corpus": header, "max_docs": a.max_docs,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": eval_demo.versions(), "curve": curve, "samples": samples, "log": LOG,
    }
    write_json(os.path.join(a.out, "training.json"), info)
    print("wrote %s: %s" % (a.out, ", ".join(sorted(os.listdir(a.out)))))


def generate_samples(out, dev, seed, ids):
    """Greedy and sampled continuations of "Package: " prompts, and one chat answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(dev).eval()
    stop = [ids["<|endoftext|>"], ids["<|im_end|>"]]
    samples = []
    torch.manual_seed(seed)
    chat = tok.apply_chat_template([{"role": "user", "content": "Describe the Debian package vim."}],
                                   tokenize=False, add_generation_prompt=True)
    for mode, prompt in ([("greedy", p) for p in PROMPTS[:3]] + [("sample", p) for p in PROMPTS] +
                         [("chat-greedy", chat)]):
        x = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(dev)
        kw = dict(do_sample=False) if "greedy" in mode else dict(do_sample=True, temperature=0.8,
                                                               top_p=0.95, top_k=40)
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=160, eos_token_id=stop, pad_token_id=stop[0],
                               repetition_penalty=1.0 if "greedy" in mode else 1.05, **kw)
        text = tok.decode(y[0, x.shape[1]:], skip_special_tokens=True)
        samples.append({"mode": mode, "prompt": prompt, "text": text})
        print("----- %s %r\n%s%s" % (mode, prompt, prompt if mode != "chat-greedy" else "", text), flush=True)
    return samples


if __name__ == "__main__":
    main()
