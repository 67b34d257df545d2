#!/usr/bin/env python3
"""PyTorch baseline for `tandem bench moe` (../shared/BENCH.md): one MoE layer
as a Python loop over the touched experts with `x @ W.T` in BF16, the loop the
KTransformers paper compares against.

Same cases as tandem's benchmark: shapes deepseek-v3 (7168 x 2048, 256
experts, top-8) and qwen3-30b-a3b (2048 x 768, 128, top-8), or
custom:DM,FF,E,K; weights random (16 distinct source experts, each expert a
separate copy so every expert is distinct memory); routing random uniform
top-k, new each repetition; warm-up, then repetitions until --min-s (at
least 2), median. Writes "shape=S tokens=N ms=X" lines to --out (read by
`tandem bench moe --torch FILE`) and prints BENCH.md-style lines.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
N_SRC = 16


def parse_shapes(spec):
    out = []
    for part in spec.split(";"):
        if part.startswith("custom:"):
            dm, ff, e, k = (int(v) for v in part[7:].split(","))
            out.append((f"custom-{dm}x{ff}x{e}x{k}", (dm, ff, e, k)))
            continue
        for name in part.split(","):
            if name not in SHAPES:
                sys.exit(f"torch_moe.py: unknown shape {name!r} (known: {', '.join(SHAPES)}, custom:DM,FF,E,K)")
            out.append((name, SHAPES[name]))
    return out


def make_experts(dm, ff, n_expert):
    g = torch.Generator().manual_seed(1)
    src = []
    for _ in range(min(N_SRC, n_expert)):
        src.append(tuple((torch.rand(r, c, generator=g) * 2 - 1).mul_(1.7 / c ** 0.5).to(torch.bfloat16)
                         for r, c in ((ff, dm), (ff, dm), (dm, ff))))
    return [tuple(m.clone() for m in src[e % len(src)]) for e in range(n_expert)]


def layer(x, ids, w, experts):
    n, k = ids.shape
    out = torch.zeros(n, x.shape[1], dtype=torch.float32)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    tok = order // k
    wflat = w.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        t = tok[start:start + c]
        wg, wu, wd = experts[e]
        xe = x[t]
        h = F.silu(xe @ wg.T) * (xe @ wu.T)
        y = h @ wd.T
        out.index_add_(0, t, y.float() * wflat[start:start + c, None])
        start += c
    return out


def route(n, n_expert, k, g):
    scores = torch.rand(n, n_expert, generator=g)
    w, ids = scores.topk(k, dim=1)
    return ids, (w / w.sum(1, keepdim=True)).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="deepseek-v3,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4,32,128,512,2048,8192")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--min-s", type=float, default=0.4)
    ap.add_argument("--out", required=True, help="file for the 'shape= tokens= ms=' lines")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tokens = [int(t) for t in a.tokens.split(",")]
    g = torch.Generator().manual_seed(2)
    with open(a.out, "w") as f, torch.inference_mode():
        for name, (dm, ff, n_expert, k) in parse_shapes(a.shape):
            t0 = time.time()
            experts = make_experts(dm, ff, n_expert)
            print(f"bench=torch_moe_weights shape={name} gen_s={time.time() - t0:.1f} torch={torch.__version__} "
                  f"threads={torch.get_num_threads()}", flush=True)
            for n in tokens:
                x = (torch.rand(n, dm, generator=g) * 2 - 1).to(torch.bfloat16)
                ids, w = route(n, n_expert, k, g)
                layer(x, ids, w, experts)  # warm-up
                times, start = [], time.time()
                while len(times) < 2 or (time.time() - start < a.min_s and len(times) < 50):
                    ids, w = route(n, n_expert, k, g)
                    t = time.perf_counter()
                    layer(x, ids, w, experts)
                    times.append(time.perf_counter() - t)
                ms = statistics.median(times) * 1e3
                flops = 2 * 3 * dm * ff * n * k
                f.write(f"shape={name} tokens={n} ms={ms:.4f}\n")
                f.flush()
                print(f"bench=torch_moe shape={name} fmt=bf16 tokens={n} ms={ms:.3f} "
                      f"TFLOPs={flops / (ms * 1e-3) / 1e12:.3f} reps={len(times)}", flush=True)
            del experts


if __name__ == "__main__":
    main()
