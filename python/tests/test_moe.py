"""Python tests of the tandem package (plain script; pytest also collects the
test_* functions). Needs torch (CPU): tandem.MoE on torch tensors against a
torch reference per format, the held mask, deferral, submit/sync, numpy
arrays, and the SGLang adapter driven the way SGLang's KT hook drives it,
without importing SGLang. Last line: "N passed, N failed"."""
import os
import sys
import tempfile
import traceback

import numpy as np
import torch

import tandem
from tandem.kt import KTMoEWrapper, generate_gpu_experts_masks

E, H, F, K, T = 8, 256, 192, 4, 11
torch.manual_seed(15)


def weights(e=E, h=H, f=F):
    g = (torch.randn(e, f, h) * 0.06).to(torch.bfloat16)
    u = (torch.randn(e, f, h) * 0.06).to(torch.bfloat16)
    d = (torch.randn(e, h, f) * 0.06).to(torch.bfloat16)
    return g, u, d


def routing(t=T, e=E, k=K):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k) + 0.1
    return ids, w


def reference(g, u, d, x, ids, w, skip=None):
    """The layer in float32 with torch: the per-expert loop SGLang's own MoE computes."""
    x, g, u, d = x.float(), g.float(), u.float(), d.float()
    out = torch.zeros(x.shape[0], g.shape[2])
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0 or (skip is not None and bool(skip[e])):
                continue
            h = torch.nn.functional.silu(g[e] @ x[t]) * (u[e] @ x[t])
            out[t] += w[t, k] * (d[e] @ h)
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


TOL = {"bf16": 1e-2, "int8": 4e-2, "int4": 2e-1, "fp8": 8e-2}


def test_formats():
    g, u, d = weights()
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, w = routing()
    ref = reference(g, u, d, x, ids, w)
    for fmt, tol in TOL.items():
        m = tandem.MoE(g, u, d, format=fmt, top_k=K, max_tokens=T, threads=2)
        out = m(x, ids, w)
        assert out.dtype == torch.float32 and out.shape == (T, H)
        assert rel(out, ref) < tol, (fmt, rel(out, ref))
        # int64 ids and float64 weights are converted (a copy); the result is the same
        out2 = m(x, ids.long(), w.double())
        assert torch.equal(out, out2), fmt
        # into a caller's tensor (zero copy: the same storage comes back)
        buf = torch.empty(T, H)
        assert m(x, ids, w, out=buf).data_ptr() == buf.data_ptr()
        assert m.info["format"] == fmt and m.info["n_held"] == E


def test_tune():
    """An operator's own kernel settings (i4=0: exact INT4 on AMX); a bad key is refused, naming it."""
    g, u, d = weights()
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, w = routing()
    m = tandem.MoE(g, u, d, format="int4", top_k=K, max_tokens=T, threads=2, tune="i4=0,mc=128")
    assert rel(m(x, ids, w), reference(g, u, d, x, ids, w)) < TOL["int4"]
    try:
        tandem.MoE(g, u, d, top_k=K, threads=2, tune="i4=0,bogus=1")
        raise AssertionError("a bad tune key accepted")
    except tandem.TandemError as e:
        assert "bogus" in str(e)


def test_fp8_source():
    if not hasattr(torch, "float8_e4m3fn"):
        return
    g, u, d = weights()
    # E4M3 weights with one scale per 128 x 128 block, as DeepSeek-V3 ships them
    def q(m):
        s = torch.full((m.shape[0], (m.shape[1] + 127) // 128, (m.shape[2] + 127) // 128), 0.01)
        return (m.float() / 0.01).to(torch.float8_e4m3fn), s
    (gq, gs), (uq, us), (dq, ds) = q(g), q(u), q(d)
    deq = lambda qm: qm.float() * 0.01
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, w = routing()
    m = tandem.MoE(gq, uq, dq, format="fp8", scales=(gs, us, ds), block=(128, 128), top_k=K, max_tokens=T,
                   threads=2)
    assert rel(m(x, ids, w), reference(deq(gq), deq(uq), deq(dq), x, ids, w)) < 1e-2


def test_mask_and_set_held():
    g, u, d = weights()
    x = torch.randn(T, H)  # float32 activations
    ids, w = routing()
    ids[3, 1] = -1
    gpu = torch.zeros(E, dtype=torch.bool)
    gpu[[0, 5]] = True
    m = tandem.MoE(g, u, d, top_k=K, max_tokens=T, held=~gpu, threads=2)
    assert not m.holds(0) and m.holds(1) and m.info["n_held"] == E - 2
    assert rel(m(x, ids, w), reference(g, u, d, x, ids, w, skip=gpu)) < 1e-2
    more = gpu.clone()
    more[2] = True
    m.set_held(~more)
    assert rel(m(x, ids, w), reference(g, u, d, x, ids, w, skip=more)) < 1e-2


def test_deferral_and_submit():
    g, u, d = weights()
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, w = routing()
    m = tandem.MoE(g, u, d, top_k=K, max_tokens=T, max_deferred=2, threads=2)
    full = m(x, ids, w)
    imm, dfr = m(x, ids, w, n_deferred=2)
    assert rel(imm + dfr, full) < 1e-5
    # the deferred part is the two lowest-weight experts of each token
    low = torch.argsort(w, dim=1)[:, :2]
    only = torch.full_like(ids, -1)
    only.scatter_(1, low, ids.gather(1, low))
    assert rel(dfr, reference(g, u, d, x, only, w)) < 1e-2
    m.submit(x, ids, w, n_deferred=2)
    i2, d2 = m.sync()
    assert torch.equal(i2, imm) and torch.equal(d2, dfr)
    try:
        m.sync()
        raise AssertionError("sync without submit accepted")
    except tandem.TandemError:
        pass
    bad = ids.clone()
    bad[0, 0] = E
    try:
        m(x, bad, w)
        raise AssertionError("an id past n_expert accepted")
    except tandem.TandemError as e:
        assert "expert" in str(e)


def test_numpy_and_save_open():
    g, u, d = weights()
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, w = routing()
    m = tandem.MoE(g, u, d, format="int8", top_k=K, max_tokens=T, threads=2)
    ref = m(x, ids, w)
    # numpy: bf16 as raw uint16 bits
    xn = x.view(torch.int16).numpy().view(np.uint16)
    outn = m(xn, ids.numpy(), w.numpy())
    assert isinstance(outn, np.ndarray) and np.array_equal(outn, ref.numpy())
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "layer.pack")
        m.save(p)
        m2 = tandem.MoE.open(p, top_k=K, max_tokens=T, threads=2)
        assert torch.equal(m2(x, ids, w), ref) and m2.info["format"] == "int8"


def test_log_callback():
    lines = []
    tandem.set_log(lambda lv, msg: lines.append((lv, msg)), level="debug")
    g, u, d = weights()
    tandem.MoE(g, u, d, top_k=K, threads=2)
    tandem.set_log(None, level="warn")
    assert lines, "no log line reached the callback"
    assert tandem.__version__.count(".") == 2


def _write_checkpoint(path, layers, n_exp):
    """A Hugging Face style safetensors file with the experts of `layers` MoE layers."""
    import json
    import struct
    tensors, blobs, off = {}, [], 0
    ws = {}
    for l in range(layers):
        g, u, d = weights(e=n_exp)
        ws[l] = (g, u, d)
        for e in range(n_exp):
            for nm, t in (("gate_proj", g[e]), ("up_proj", u[e]), ("down_proj", d[e])):
                b = t.contiguous().view(torch.int16).numpy().tobytes()
                tensors[f"model.layers.{l}.mlp.experts.{e}.{nm}.weight"] = {
                    "dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
                blobs.append(b)
                off += len(b)
    hdr = json.dumps(tensors).encode()
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + b"".join(blobs))
    return ws


def test_sglang_call_sequence():
    """What SGLang's kt_ep_wrapper does, step for step: masks from activation counts, one wrapper per
    layer built with its keyword arguments, load_weights(physical_to_logical_map), then per layer
    submit_forward -> (GPU experts) -> sync_forward, output = GPU part + CPU part. Deferral: layer l's
    deferred experts arrive with layer l+1's sync; the last layer defers nothing."""
    layers, n_exp, topk, defer = 3, E, K, 1
    with tempfile.TemporaryDirectory() as td:
        ws = _write_checkpoint(os.path.join(td, "model.safetensors"), layers, n_exp)
        freq = torch.rand(layers, n_exp)
        masks = generate_gpu_experts_masks(freq, num_gpu_experts=4)
        assert masks.shape == (layers, n_exp) and int(masks.sum()) == 4
        wrappers = []
        for l in range(layers):
            wr = KTMoEWrapper(layer_idx=l, num_experts=n_exp, num_experts_per_tok=topk, hidden_size=H,
                              moe_intermediate_size=F, gpu_experts_mask=masks[l], cpuinfer_threads=2,
                              threadpool_count=1, weight_path=td, chunked_prefill_size=16, method="BF16",
                              max_deferred_experts_per_token=defer if l < layers - 1 else 0)
            wr.load_weights(torch.arange(n_exp, dtype=torch.int64))
            wrappers.append(wr)
        x = torch.randn(5, H).to(torch.bfloat16)
        pending = torch.zeros(5, H)
        for l, wr in enumerate(wrappers):
            ids, w = routing(t=5, e=n_exp, k=topk)
            g, u, d = ws[l]
            wr.submit_forward(x, ids, w, 0)
            gpu_part = reference(g, u, d, x, ids, w, skip=~masks[l])  # the GPU's experts, meanwhile
            cpu_part = wr.sync_forward(x, 0)
            assert cpu_part.dtype == x.dtype and cpu_part.shape == x.shape
            # what the CPU should have returned: its immediate experts now, plus the previous layer's deferred
            cpu_ids = ids.clone()
            cpu_ids[masks[l][ids.long()]] = -1
            d_now = defer if l < layers - 1 else 0
            imm_ids, def_ids = cpu_ids.clone(), torch.full_like(cpu_ids, -1)
            if d_now:
                wm = torch.where(cpu_ids >= 0, w, torch.full_like(w, float("inf")))
                for t in range(5):
                    lo = int(torch.argmin(wm[t]))
                    if cpu_ids[t, lo] >= 0:
                        def_ids[t, lo], imm_ids[t, lo] = cpu_ids[t, lo], -1
            want = reference(g, u, d, x, imm_ids, w) + pending
            pending = reference(g, u, d, x, def_ids, w)
            assert rel(cpu_part.float(), want) < 2e-2, (l, rel(cpu_part.float(), want))
            full = reference(g, u, d, x, ids, w)
            assert rel(gpu_part + reference(g, u, d, x, cpu_ids, w), full) < 1e-5
            x = (x.float() + gpu_part + cpu_part.float()).to(torch.bfloat16) * 0.5
        assert not KTMoEWrapper._pending, "the last layer left deferred output behind"


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    npass = nfail = 0
    for t in tests:
        try:
            t()
            npass += 1
            print(f"  ok: {t.__name__}")
        except Exception:
            nfail += 1
            print(f"  FAIL: {t.__name__}")
            traceback.print_exc()
    print(f"python: {npass} passed, {nfail} failed")
    sys.exit(1 if nfail else 0)
