#!/usr/bin/env python3
"""eval_demo.py: held-out perplexity of the demo model, by transformers alone.

Role
    The reference perplexity that tandem must reproduce. It loads the saved model folder
    with transformers (AutoTokenizer, AutoModelForCausalLM, float32, TF32 off), builds the
    held-out token stream from the corpus of tools/demo_corpus.py, and writes next to the
    numbers the exact token ids it evaluated, so the C engine can compute the same thing and
    the two can be compared without Python:

        heldout_ppl.json    definition, perplexity, mean NLL, NLL of every window, versions
        heldout_tokens.u16  the windows, row-major [n_windows][ctx], uint16 little-endian

    train_demo.py imports this file and calls evaluate() at the end of training, so the
    number in training.json and the one here are computed by the same code.

Definition (keep it in sync with heldout_ppl.json's "definition")
    stream  = for each held-out document, in corpus order: <|endoftext|> then its tokens
              (documents as written by demo_corpus.py; no other special tokens)
    windows = the first floor(min(budget, len(stream)) / ctx) * ctx tokens of the stream,
              cut into non-overlapping windows of ctx tokens (stride = ctx)
    NLL     = mean over all windows and positions t = 1 .. ctx-1 of -log p(w[t] | w[0..t-1]),
              each window evaluated from an empty cache (position ids 0 .. ctx-1)
    ppl     = exp(NLL)
"""

import argparse
import gzip
import json
import math
import os
import platform
import sys

EOT = "<|endoftext|>"


def read_corpus(path, max_docs=None):
    """-> (header dict, train texts, held-out texts) from demo_corpus.py's JSON lines.

    max_docs limits the documents read (smoke tests); the held-out share stays the same
    because the file is shuffled."""
    if path.endswith(".xz"):
        import lzma  # not every Python build has it: only needed for .xz
        opener = lzma.open
    else:
        opener = gzip.open if path.endswith(".gz") else open
    header, train, held = {}, [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise SystemExit("error: %s: line %d is not JSON (%s); rebuild it with "
                                 "tools/demo_corpus.py" % (path, n + 1, e))
            if "corpus" in rec and "text" not in rec:
                header = rec
                continue
            if "text" not in rec or rec.get("split") not in ("train", "heldout"):
                raise SystemExit("error: %s: line %d lacks 'text' or a split of train/heldout"
                                 % (path, n + 1))
            (train if rec["split"] == "train" else held).append(rec["text"])
            if max_docs and len(train) + len(held) >= max_docs:
                break
    if not train or not held:
        raise SystemExit("error: %s: needs both train and held-out documents (has %d / %d)"
                         % (path, len(train), len(held)))
    return header, train, held


def heldout_stream(tok, held_texts, need=None):
    """<|endoftext|> + tokens of each held-out document, until at least `need` tokens
    (None: all of them). tok is a transformers tokenizer."""
    eot = tok.convert_tokens_to_ids(EOT)
    stream = []
    # Encode in slices: the held-out split can be far larger than what is needed.
    for i in range(0, len(held_texts), 256):
        for ids in tok(held_texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            stream.append(eot)
            stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    return stream


def heldout_windows(tok, held_texts, ctx, budget, stream=None):
    """The evaluated token ids, as a list of windows of ctx ids (see the definition above)."""
    if stream is None:
        stream = heldout_stream(tok, held_texts, budget)
    n_win = min(budget, len(stream)) // ctx
    if n_win == 0:
        raise SystemExit("error: the held-out split has only %d tokens, fewer than one window "
                         "of %d" % (len(stream), ctx))
    return [stream[w * ctx:(w + 1) * ctx] for w in range(n_win)]


def window_nll(model, windows, device, batch=16):
    """Mean NLL of each window (float64 sums of float32 log-probs)."""
    import torch
    import torch.nn.functional as F
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.tensor(windows[i:i + batch], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 x[:, 1:].reshape(-1), reduction="none")
            out.extend(lp.view(x.shape[0], -1).double().mean(dim=1).tolist())
    return out


def versions():
    import tokenizers
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def evaluate(model_dir, corpus, out_dir=None, ctx=512, budget=200000, device="cpu",
             max_docs=None, quiet=False):
    """Held-out perplexity of the model saved in model_dir; writes the two files into out_dir
    (default model_dir). Returns the dict written to heldout_ppl.json."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # True float32: the C engine's reference path is float32 and TF32 would cost ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _, _, held = read_corpus(corpus, max_docs)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if ctx > model.config.max_position_embeddings:
        raise SystemExit("error: --ctx %d exceeds the model's max_position_embeddings %d"
                         % (ctx, model.config.max_position_embeddings))
    windows = heldout_windows(tok, held, ctx, budget)
    nll = window_nll(model, windows, device)
    mean = sum(nll) / len(nll)  # every window has ctx-1 predictions: the mean of means is exact
    res = {
        "definition": "stream = per held-out document in corpus order: <|endoftext|> + its tokens; "
                      "windows = first floor(min(budget, len)/ctx)*ctx tokens, non-overlapping, "
                      "stride = ctx, each from an empty cache; NLL = mean over windows and "
                      "positions 1..ctx-1 of -log p; ppl = exp(NLL); float32",
        "ppl": math.exp(mean), "nll": mean, "ctx": ctx, "n_windows": len(windows),
        "tokens": len(windows) * ctx, "predicted_tokens": len(windows) * (ctx - 1),
        "token_file": "heldout_tokens.u16", "token_dtype": "uint16 little-endian, [n_windows][ctx]",
        "window_nll": [round(v, 6) for v in nll],
        "corpus": os.path.basename(corpus), "device": str(device), "dtype": "float32",
        "versions": versions(),
    }
    out_dir = out_dir or model_dir
    os.makedirs(out_dir, exist_ok=True)
    if model.config.vocab_size > 65536:
        raise SystemExit("error: vocab %d does not fit uint16 token ids" % model.config.vocab_size)
    np.asarray(windows, dtype="<u2").tofile(os.path.join(out_dir, "heldout_tokens.u16"))
    with open(os.path.join(out_dir, "heldout_ppl.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    if not quiet:
        print("held-out ppl %.4f (nll %.5f) over %d windows x %d tokens [%s]"
              % (res["ppl"], mean, len(windows), ctx, device))
    return res


def main():
    ap = argparse.ArgumentParser(description="held-out perplexity of the demo model (transformers)")
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--corpus", default=".corpus/apt-descriptions.jsonl.gz")
    ap.add_argument("--out", default=None, help="folder for heldout_ppl.json and "
                    "heldout_tokens.u16 (default: the model folder)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=200000, help="token budget of the stream")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--max-docs", type=int, default=None, help="read only the first N documents")
    args = ap.parse_args()
    for p in (args.model, args.corpus):
        if not os.path.exists(p):
            sys.exit("error: %s does not exist" % p)
    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    evaluate(args.model, args.corpus, args.out, args.ctx, args.tokens, dev, args.max_docs)


if __name__ == "__main__":
    main()
