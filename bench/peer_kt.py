#!/usr/bin/env python3
"""bench/peer_kt.py - tandem's CPU MoE operator against kt-kernel (KTransformers'
CPU kernel library), side by side on this machine (../shared/BENCH.md, "Peers").

tandem runs through its own benchmark (`tandem bench moe`, one process per
shape and format, all token counts; it prints the median of its repetitions);
kt-kernel through its Python extension: kt_kernel_ext.CPUInfer (a worker pool
of --threads threads) and the moe.AMXBF16_MOE / AMXInt8_MOE / AMXInt4_MOE
classes, loaded from the same kind of random bf16 weights (kt quantises them
itself), several layers so that small batches read DRAM, timed per
forward_task + sync, the median of its repetitions. Both use random top-k
routing, new for every repetition, bf16 activations, the same threads.

Rounds alternate the two engines per (shape, format) block, so drift of a
shared machine falls on both; per cell the line gives the median over the
rounds of each side and the spread (max/min - 1) of those medians:

  bench=peer_kt shape=qwen3-30b-a3b fmt=int4 tokens=512 threads=2 ms=.. kt_ms=.. vs_kt=..
      spread=.. kt_spread=.. rounds=3

vs_kt = kt_ms / ms (above 1: tandem is faster). The formats are each
engine's own: INT4 is tandem's group-32 scale+min INT4 against kt-kernel's
AMXInt4_MOE, INT8 per-row (tandem's default) against AMXInt8_MOE.

--via python drives tandem the way kt-kernel is driven: through its Python
package (tandem.MoE, ctypes over libtandem.so; `pip install .`), the same
layers of random bf16 weights, the same routing and timing loop, so both
sides pay a Python call per forward.

Run with a Python that has kt-kernel, in a venv of its own (it pins a torch
version; the extension itself does not link torch, so a venv made with
--system-site-packages and `pip install --no-deps kt-kernel` works with the
system torch):
  /tmp/ktvenv/bin/python bench/peer_kt.py --shape qwen3-30b-a3b --fmt int4 --tokens 1,128,512
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: d_model, d_ff, experts, top_k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def tandem_block(args, shape, fmt, tokens):
    """one `tandem bench moe` process: {tokens: ms}"""
    dm, ff, ne, k = shape
    cmd = [args.tandem, "bench", "moe", "--shape", f"custom:{dm},{ff},{ne},{k}", "--fmt", fmt,
           "--tokens", ",".join(map(str, tokens)), "--threads", str(args.threads), "--layers", str(args.layers)]
    log("tandem:", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout).stdout
    res = {}
    for line in out.splitlines():
        if line.startswith("bench=moe ") and " ms=" in line:
            t = int(re.search(r" tokens=(\d+)", line).group(1))
            res[t] = float(re.search(r" ms=([0-9.]+)", line).group(1))
    return res


class KtBlock:
    """kt-kernel MoE layers of one shape and format, kept across rounds (its
    quantisation at load is slow); run() times every token count once."""

    def __init__(self, args, shape, fmt, tokens):
        import torch
        from kt_kernel import kt_kernel_ext as ext
        self.torch, self.ext, self.args = torch, ext, args
        dm, ff, ne, k = shape
        self.dm, self.ne, self.k = dm, ne, k
        if KtBlock.cpu is None:
            wc = ext.WorkerPoolConfig()
            wc.subpool_count = 1
            wc.subpool_numa_map = [0]
            wc.subpool_thread_count = [args.threads]
            KtBlock.cpu = ext.CPUInfer(wc)
        cls = {"bf16": ext.moe.AMXBF16_MOE, "int8": ext.moe.AMXInt8_MOE, "int4": ext.moe.AMXInt4_MOE}[fmt]
        g = torch.Generator().manual_seed(1)
        self.keep, self.moes = [], []
        t0 = time.time()
        for _ in range(args.layers):
            # random bf16 weights, scaled like a trained layer's
            gate = (torch.randn((ne, ff, dm), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            up = (torch.randn((ne, ff, dm), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            down = (torch.randn((ne, dm, ff), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            cfg = ext.moe.MOEConfig(ne, k, dm, ff, 0)
            cfg.max_len = max(tokens)
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
            cfg.pool = KtBlock.cpu.backend_
            moe = cls(cfg)
            p2l = torch.arange(ne, dtype=torch.int64).contiguous()
            KtBlock.cpu.submit(moe.load_weights_task(p2l.data_ptr()))
            KtBlock.cpu.sync()
            # the quantising classes keep their own copy; BF16's may read its source in place
            self.keep.append((p2l, gate, up, down) if fmt == "bf16" else (p2l,))
            del gate, up, down
            self.moes.append(moe)
        log(f"kt: {cls.__name__} {args.layers} layers loaded in {time.time() - t0:.1f} s")
        self.x = torch.randn((max(tokens), dm), generator=g).to(torch.bfloat16).contiguous()
        self.out = torch.empty((max(tokens), dm), dtype=torch.bfloat16).contiguous()
        self.tokens = tokens

    def run(self):
        torch, args = self.torch, self.args
        res = {}
        for n in self.tokens:
            times, i, t_start = [], 0, time.time()
            bsz = torch.tensor([n], dtype=torch.int64)
            while True:
                ids = torch.rand((n, self.ne)).argsort(dim=-1)[:, : self.k].to(torch.int64).contiguous()
                w = torch.rand((n, self.k), dtype=torch.float32).contiguous()
                moe = self.moes[i % len(self.moes)]
                task = moe.forward_task(bsz.data_ptr(), self.k, ids.data_ptr(), w.data_ptr(), self.x.data_ptr(),
                                        self.out.data_ptr(), False)
                a = time.perf_counter()
                KtBlock.cpu.submit(task)
                KtBlock.cpu.sync()
                dt = time.perf_counter() - a
                if i > 0:  # the first call warms up
                    times.append(dt)
                i += 1
                if len(times) >= args.reps and time.time() - t_start > args.min_s:
                    break
                if len(times) >= 3 and time.time() - t_start > 4 * args.min_s:
                    break
            res[n] = statistics.median(times) * 1e3
        return res


KtBlock.cpu = None


class TandemPyBlock:
    """tandem's operator through its Python package, built and timed as KtBlock is."""

    def __init__(self, args, shape, fmt, tokens):
        import torch
        import tandem
        self.torch, self.args = torch, args
        dm, ff, ne, k = shape
        self.dm, self.ne, self.k = dm, ne, k
        g = torch.Generator().manual_seed(1)
        self.moes = []
        t0 = time.time()
        for _ in range(args.layers):
            gate = (torch.randn((ne, ff, dm), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            up = (torch.randn((ne, ff, dm), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            down = (torch.randn((ne, dm, ff), generator=g, dtype=torch.bfloat16) * 0.02).contiguous()
            self.moes.append(tandem.MoE(gate, up, down, format=fmt, top_k=k, max_tokens=max(tokens),
                                        threads=args.threads))
            del gate, up, down  # packed: the sources are not kept
        log(f"tandem (python): {args.layers} layers packed in {time.time() - t0:.1f} s")
        self.x = torch.randn((max(tokens), dm), generator=g).to(torch.bfloat16).contiguous()
        self.out = torch.empty((max(tokens), dm), dtype=torch.float32).contiguous()
        self.tokens = tokens

    def run(self):
        torch, args = self.torch, self.args
        res = {}
        for n in self.tokens:
            times, i, t_start = [], 0, time.time()
            x, out = self.x[:n], self.out[:n]
            while True:
                ids = torch.rand((n, self.ne)).argsort(dim=-1)[:, : self.k].to(torch.int32).contiguous()
                w = torch.rand((n, self.k), dtype=torch.float32).contiguous()
                moe = self.moes[i % len(self.moes)]
                a = time.perf_counter()
                moe(x, ids, w, out=out)
                dt = time.perf_counter() - a
                if i > 0:  # the first call warms up
                    times.append(dt)
                i += 1
                if len(times) >= args.reps and time.time() - t_start > args.min_s:
                    break
                if len(times) >= 3 and time.time() - t_start > 4 * args.min_s:
                    break
            res[n] = statistics.median(times) * 1e3
        return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--experts", default="", help="name:N,... experts per shape (DeepSeek-V3: as many as fit)")
    ap.add_argument("--fmt", default="bf16,int8,int4")
    ap.add_argument("--tokens", default="1,16,128,512,2048,8192")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="kt-kernel: at least this many timed calls per cell")
    ap.add_argument("--min-s", type=float, default=0.4)
    ap.add_argument("--tandem", default="build/tandem")
    ap.add_argument("--via", default="cli", choices=["cli", "python"],
                    help="tandem through `tandem bench moe` (cli) or its Python package, as kt-kernel is driven")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    experts = dict((kv.split(":")[0], int(kv.split(":")[1])) for kv in args.experts.split(",") if kv)
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"bench=peer_kt_setup threads={args.threads} rounds={args.rounds} layers={args.layers} "
          f"tokens={args.tokens} load={os.getloadavg()[0]:.1f}", flush=True)
    for sname in args.shape.split(","):
        dm, ff, ne, k = SHAPES[sname]
        ne = experts.get(sname, ne)
        shape = (dm, ff, ne, k)
        for fmt in args.fmt.split(","):
            kt = KtBlock(args, shape, fmt, tokens)
            ours_py = TandemPyBlock(args, shape, fmt, tokens) if args.via == "python" else None
            ours, theirs = {n: [] for n in tokens}, {n: [] for n in tokens}
            for r in range(args.rounds):
                # alternate which engine goes first
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for who in order:
                    if who == 1:
                        res = kt.run()
                    else:
                        res = ours_py.run() if ours_py else tandem_block(args, shape, fmt, tokens)
                    for n, ms in res.items():
                        (ours if who == 0 else theirs)[n].append(ms)
                log(f"round {r}: tandem {[round(ours[n][-1], 2) if ours[n] else None for n in tokens]} "
                    f"kt {[round(theirs[n][-1], 2) for n in tokens]}")
            for n in tokens:
                a, b = ours[n], theirs[n]
                if not a or not b:
                    print(f"bench=peer_kt shape={sname} experts={ne} fmt={fmt} tokens={n} error=missing", flush=True)
                    continue
                ma, mb = statistics.median(a), statistics.median(b)
                print(f"bench=peer_kt shape={sname} experts={ne} fmt={fmt} tokens={n} threads={args.threads} via={args.via} "
                      f"ms={ma:.3f} kt_ms={mb:.3f} vs_kt={mb / ma:.2f} spread={max(a) / min(a) - 1:.2f} "
                      f"kt_spread={max(b) / min(b) - 1:.2f} rounds={len(a)} load={os.getloadavg()[0]:.1f}",
                      flush=True)
            del kt, ours_py


if __name__ == "__main__":
    main()
