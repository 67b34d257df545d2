"""Python overhead of tandem.MoE against the same operator driven from C (issue 15).

One operator and one set of tensors; per round, the C loop (bench/moe_timer.c,
compiled here against libtandem.so) and the Python loop (tandem.MoE.__call__
with a preallocated output, as a host would) alternate, so both see the same
machine state. Prints BENCH.md-style lines: per tokens count, the medians of
the rounds and the difference per call.

    python3 bench/py_overhead.py [--format bf16] [--threads 2] [--rounds 7]
"""
import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import tandem
from tandem import _lib

ap = argparse.ArgumentParser()
ap.add_argument("--format", default="bf16")
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--tokens", default="0,1,2048")  # 0: the fixed cost of a call alone (nothing to compute)
ap.add_argument("--experts", type=int, default=128)
ap.add_argument("--hidden", type=int, default=2048)
ap.add_argument("--inter", type=int, default=768)
ap.add_argument("--topk", type=int, default=8)
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
libpath = _lib.lib._name
tmp = tempfile.mkdtemp()
timer_so = os.path.join(tmp, "moe_timer.so")
subprocess.check_call(["cc", "-std=c11", "-O2", "-shared", "-fPIC", "-I" + os.path.join(root, "include"),
                       "-o", timer_so, os.path.join(root, "bench", "moe_timer.c"), libpath])
timer = ctypes.CDLL(timer_so)
timer.moe_timer_run.restype = ctypes.c_double
timer.moe_timer_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

E, H, F, K = a.experts, a.hidden, a.inter, a.topk
toks = [int(t) for t in a.tokens.split(",")]
torch.manual_seed(0)
g = (torch.randn(E, F, H) * 0.02).to(torch.bfloat16)
u = (torch.randn(E, F, H) * 0.02).to(torch.bfloat16)
d = (torch.randn(E, H, F) * 0.02).to(torch.bfloat16)
t0 = time.time()
m = tandem.MoE(g, u, d, format=a.format, top_k=K, max_tokens=max(1, max(toks)), threads=a.threads)
pack_s = time.time() - t0
del g, u, d
cpu = "unknown"
try:
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
except Exception:
    pass
print(f"# {cpu}, {os.cpu_count()} cores, isa={m.info['isa']} threads={m.info['n_threads']}, "
      f"python {platform.python_version()}, torch {torch.__version__}, packed in {pack_s:.1f} s", flush=True)
for n in toks:
    x = torch.randn(n, H).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(n)]).to(torch.int32) if n else torch.zeros(0, K, dtype=torch.int32)
    w = torch.rand(n, K)
    out = torch.empty(n, H)
    m(x, ids, w, out=out)  # warm: fills m._batch with these tensors for the C loop too
    iters = max(3, min(20000, int(0.3 / max(1e-6, timer.moe_timer_run(m._h, ctypes.addressof(m._batch), 3)))))
    if n == 1:
        iters = max(iters, 30)
    cs, ps = [], []

    def run_py():
        t = time.perf_counter()
        for _ in range(iters):
            m(x, ids, w, out=out)
        ps.append((time.perf_counter() - t) / iters)

    for r in range(a.rounds):  # the side that goes first alternates, so neither always follows the other
        if r % 2:
            run_py()
        cs.append(timer.moe_timer_run(m._h, ctypes.addressof(m._batch), iters))
        if not r % 2:
            run_py()
    # medians, best rounds (least disturbed by other load on a shared machine) and the median of the
    # per-round ratio (both sides of a round ran back to back)
    c, p = statistics.median(cs), statistics.median(ps)
    ratio = statistics.median(pp / cc for pp, cc in zip(ps, cs)) if n else float("nan")
    print(f"bench=py_overhead shape=qwen3-30b-a3b fmt={a.format} isa={m.info['isa']} tokens={n} iters={iters} "
          f"rounds={a.rounds} c_ms={c * 1e3:.4f} py_ms={p * 1e3:.4f} overhead_us={(p - c) * 1e6:.1f} "
          f"c_best_ms={min(cs) * 1e3:.4f} py_best_ms={min(ps) * 1e3:.4f} "
          f"best_overhead_us={(min(ps) - min(cs)) * 1e6:.1f} round_ratio={ratio:.4f}", flush=True)
