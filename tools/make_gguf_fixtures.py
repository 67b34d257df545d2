#!/usr/bin/env python3
"""make_gguf_fixtures.py - GGUF test fixtures for tests/test_gguf.c.

    python3 tools/make_gguf_fixtures.py            # everything (quants + models + references)
    python3 tools/make_gguf_fixtures.py --quants   # only tests/fixtures/gguf/quants.gguf and the split set

Needs `gguf` and `numpy`; the model references need `llama-cpp-python`
(CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python).

quants.gguf: one tensor per readable ggml type, [2 rows x 512] (ggml ne = {512, 2}),
and beside each a float32 tensor NAME.ref holding what the `gguf` package's
dequantize() gives for it: the C reader must reproduce it. The quantised bytes
are random blocks with sane scales (random bytes are valid blocks for every
type; only the f16 scale fields are set, so values stay finite), so every bit
pattern of scales and quants is exercised, not only those a quantiser emits.
The file's metadata holds one key of every value type and arrays of each
element type, which the reader tests check by value.

split-0000k-of-00003.gguf: the same writer with split_max_tensors, to test
split sets.
"""
import argparse
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as VT

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")

# byte offsets of the f16 scale fields in one block, and the value each gets
# relative to the wanted weight magnitude `s` (so that |w| is about s)
SCALE_FIELDS = {
    T.Q4_0: [(0, 1 / 8)],
    T.Q4_1: [(0, 1 / 8), (2, -1.0)],
    T.Q5_0: [(0, 1 / 16)],
    T.Q5_1: [(0, 1 / 16), (2, -1.0)],
    T.Q8_0: [(0, 1 / 128)],
    T.Q4_K: [(0, 1 / (31 * 8)), (2, 7.5 / (31 * 8))],
    T.Q5_K: [(0, 1 / (31 * 16)), (2, 15.5 / (31 * 16))],
    T.Q6_K: [(208, 1 / (64 * 32))],
    T.IQ4_NL: [(0, 1 / 127)],
    T.IQ4_XS: [(0, 1 / (32 * 127))],
}


def rand_quant(rng, shape, qtype, s=0.05):
    """Random bytes of a ggml tensor with logical shape `shape` (numpy order,
    last dim innermost), its scale fields set so that |w| is about s.
    Returns a uint8 array of the byte shape the writer wants."""
    if qtype == T.F32:
        return (rng.standard_normal(shape) * s).astype(np.float32)
    if qtype == T.F16:
        return (rng.standard_normal(shape) * s).astype(np.float16)
    if qtype == T.BF16:
        x = (rng.standard_normal(shape) * s).astype(np.float32)
        return gguf.quants.quantize(x, T.BF16)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    assert shape[-1] % block == 0, (shape, qtype)
    nblocks = int(np.prod(shape)) // block
    b = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off, rel in SCALE_FIELDS[qtype]:
        # vary the scale per block by up to x2 so blocks differ
        v = (s * rel * rng.uniform(0.5, 1.5, size=nblocks)).astype(np.float16)
        b[:, off:off + 2] = v.view(np.uint8).reshape(nblocks, 2)
    return b.reshape(*shape[:-1], shape[-1] // block * nbytes)


def write_quants(rng):
    w = gguf.GGUFWriter(os.path.join(OUT, "quants.gguf"), "tandem-test")
    # one key of every scalar value type, arrays of each element type
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.125)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo gguf")
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float64("test.f64", -2.5)
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.5, -1.5])
    w.add_array("test.arr_str", ["a", "", "xyz"])
    w.add_key_value("test.arr_u8", [7, 8, 9], VT.ARRAY, sub_type=VT.UINT8)
    types = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K,
             T.IQ4_NL, T.IQ4_XS]
    for t in types:
        data = rand_quant(rng, (2, 512), t, s=1.0)
        ref = gguf.quants.dequantize(data.reshape(2, -1) if t not in (T.F32, T.F16) else data, t)
        ref = np.asarray(ref, dtype=np.float32).reshape(2, 512)
        name = t.name.lower()
        if t in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=t)
        w.add_tensor(name + ".ref", ref)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_split(rng):
    w = gguf.GGUFWriter(os.path.join(OUT, "split.gguf"), "tandem-test", split_max_tensors=2)
    w.add_uint32("test.answer", 42)
    for i in range(5):
        w.add_tensor("t%d" % i, np.full((2, 32), float(i), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- tiny models ---------------------------------------------------------------
#
# Each fixture NAME.gguf is a random model written the way llama.cpp's
# converter writes that architecture (names, keys, merged experts), with the
# tensor types of `types`; NAME.ref.gguf holds llama.cpp's float32 logits for
# a prefill of 12 random tokens (tensors "tokens" I32 [12], "logits" F32
# [12 x n_vocab]), computed through llama-cpp-python with logits_all.
# Norms, routers and routing biases are F32 as the converter keeps them.
# Weights: N(0, 1/fan_in)-sized scales, norms 1 + 0.1 N(0,1), so the logits
# of these 2-3 layer models spread over a few units and top-1 is clear.

V = 320  # 3 specials, 256 byte tokens, 61 words: a valid SentencePiece-style vocab for llama.cpp


def add_vocab(w):
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        toks.append("<0x%02X>" % b)
        scores.append(0.0)
        types.append(6)
    for i in range(V - len(toks)):
        toks.append("\u2581w%d" % i)
        scores.append(-float(i))
        types.append(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)


class Model:
    def __init__(self, name, arch, rng):
        self.name, self.arch, self.rng = name, arch, rng
        self.w = gguf.GGUFWriter(os.path.join(OUT, name + ".gguf"), arch)
        self.tensors = []

    def kv(self, key, val, kind="u32"):
        k = "%s.%s" % (self.arch, key)
        {"u32": self.w.add_uint32, "f32": self.w.add_float32, "bool": self.w.add_bool,
         "str": self.w.add_string}[kind](k, val)

    def mat(self, name, rows, cols, qtype, scale=None, extra=()):
        """A [rows x cols] (torch order) weight, ne = {cols, rows}; extra: leading dims (experts)."""
        s = scale if scale is not None else 1.0 / np.sqrt(cols)
        shape = tuple(extra) + (rows, cols)
        data = rand_quant(self.rng, shape, qtype, s=s)
        if qtype in (T.F32, T.F16):
            self.w.add_tensor(name, data)
        else:
            self.w.add_tensor(name, data, raw_dtype=qtype)

    def vec(self, name, n, kind="norm"):
        if kind == "norm":
            v = 1.0 + 0.1 * self.rng.standard_normal(n)
        else:
            v = 0.2 * self.rng.standard_normal(n)
        self.w.add_tensor(name, v.astype(np.float32))

    def finish(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def common(m, D, n_layer, n_head, n_kv, ff, E, K, Fe, theta=10000.0):
    w = m.w
    add_vocab(w)
    m.kv("block_count", n_layer)
    m.kv("context_length", 256)
    m.kv("embedding_length", D)
    m.kv("feed_forward_length", ff)
    m.kv("attention.head_count", n_head)
    m.kv("attention.head_count_kv", n_kv)
    m.kv("rope.freq_base", theta, "f32")
    m.kv("attention.layer_norm_rms_epsilon", 1e-6, "f32")
    m.kv("expert_count", E)
    m.kv("expert_used_count", K)
    m.kv("expert_feed_forward_length", Fe)


def gqa_layer(m, l, D, n_head, n_kv, hd, t, bias=False, qk_norm=False):
    p = "blk.%d." % l
    m.vec(p + "attn_norm.weight", D)
    m.mat(p + "attn_q.weight", n_head * hd, D, t["q"])
    m.mat(p + "attn_k.weight", n_kv * hd, D, t["k"])
    m.mat(p + "attn_v.weight", n_kv * hd, D, t["v"])
    m.mat(p + "attn_output.weight", D, n_head * hd, t["o"])
    if bias:
        m.vec(p + "attn_q.bias", n_head * hd, "bias")
        m.vec(p + "attn_k.bias", n_kv * hd, "bias")
        m.vec(p + "attn_v.bias", n_kv * hd, "bias")
    if qk_norm:
        m.vec(p + "attn_q_norm.weight", hd)
        m.vec(p + "attn_k_norm.weight", hd)


def moe_block(m, l, D, E, Fe, t, probs_b=False, shared=0, shared_gate=False):
    p = "blk.%d." % l
    m.mat(p + "ffn_gate_inp.weight", E, D, T.F32, scale=1.0)
    if probs_b:
        m.w.add_tensor(p + "exp_probs_b.bias", (0.1 * m.rng.standard_normal(E)).astype(np.float32))
    m.mat(p + "ffn_gate_exps.weight", Fe, D, t["gate"], extra=(E,))
    m.mat(p + "ffn_up_exps.weight", Fe, D, t["up"], extra=(E,))
    m.mat(p + "ffn_down_exps.weight", D, Fe, t["down"], extra=(E,))
    if shared:
        m.mat(p + "ffn_gate_shexp.weight", shared, D, t.get("sh", T.F16))
        m.mat(p + "ffn_up_shexp.weight", shared, D, t.get("sh", T.F16))
        m.mat(p + "ffn_down_shexp.weight", D, shared, t.get("sh", T.F16))
    if shared_gate:
        m.w.add_tensor(p + "ffn_gate_inp_shexp.weight", (m.rng.standard_normal(D) / np.sqrt(D)).astype(np.float32))


def dense_block(m, l, D, ff, qt):
    p = "blk.%d." % l
    m.mat(p + "ffn_gate.weight", ff, D, qt)
    m.mat(p + "ffn_up.weight", ff, D, qt)
    m.mat(p + "ffn_down.weight", D, ff, qt)


def head(m, D, t_emb, t_out, tie=False):
    m.mat("token_embd.weight", V, D, t_emb, scale=1.0)
    m.vec("output_norm.weight", D)
    if not tie:
        m.mat("output.weight", V, D, t_out, scale=3.0 / np.sqrt(D))


def make_qwen3moe(rng):
    # the K-quant fixture: D = 256 so that rows hold whole 256-blocks
    D, L, H, KV, hd, E, K, Fe = 256, 2, 2, 1, 32, 4, 2, 32
    m = Model("qwen3moe", "qwen3moe", rng)
    common(m, D, L, H, KV, 0, E, K, Fe, theta=1e6)
    m.kv("attention.key_length", hd)
    m.kv("attention.value_length", hd)
    head(m, D, T.Q4_K, T.Q6_K)
    layer_types = [
        {"q": T.Q8_0, "k": T.Q4_K, "v": T.Q6_K, "o": T.Q8_0, "gate": T.Q4_K, "up": T.Q5_K, "down": T.Q8_0},
        {"q": T.Q5_K, "k": T.IQ4_XS, "v": T.Q8_0, "o": T.Q4_0, "gate": T.IQ4_XS, "up": T.Q6_K, "down": T.Q4_1},
    ]
    for l in range(L):
        gqa_layer(m, l, D, H, KV, hd, layer_types[l], qk_norm=True)
        m.vec("blk.%d.ffn_norm.weight" % l, D)
        moe_block(m, l, D, E, Fe, layer_types[l])
    m.finish()


def make_qwen2moe(rng):
    D, L, H, KV, hd, E, K, Fe, S = 64, 2, 4, 2, 16, 4, 2, 32, 64
    m = Model("qwen2moe", "qwen2moe", rng)
    common(m, D, L, H, KV, 0, E, K, Fe)
    m.kv("expert_shared_feed_forward_length", S)
    head(m, D, T.F16, T.BF16)
    t = {"q": T.F16, "k": T.BF16, "v": T.F32, "o": T.Q8_0, "gate": T.Q8_0, "up": T.Q8_0, "down": T.Q8_0,
         "sh": T.Q4_1}
    for l in range(L):
        gqa_layer(m, l, D, H, KV, hd, t, bias=True)
        m.vec("blk.%d.ffn_norm.weight" % l, D)
        moe_block(m, l, D, E, Fe, t, shared=S, shared_gate=True)
    m.finish()


def make_mixtral(rng):
    D, L, H, KV, hd, E, K, Fe = 64, 2, 4, 2, 16, 4, 2, 32
    m = Model("mixtral", "llama", rng)
    common(m, D, L, H, KV, Fe, E, K, Fe, theta=1e6)
    m.kv("rope.dimension_count", hd)
    head(m, D, T.Q8_0, T.Q8_0)
    t = {"q": T.Q8_0, "k": T.Q8_0, "v": T.Q4_0, "o": T.Q8_0, "gate": T.Q4_0, "up": T.Q4_1, "down": T.Q4_0}
    for l in range(L):
        gqa_layer(m, l, D, H, KV, hd, t)
        m.vec("blk.%d.ffn_norm.weight" % l, D)
        moe_block(m, l, D, E, Fe, t)
    m.finish()


def make_glm4moe(rng):
    D, L, H, KV, hd, E, K, Fe, ff = 64, 2, 4, 2, 16, 4, 2, 32, 96
    m = Model("glm4moe", "glm4moe", rng)
    common(m, D, L, H, KV, ff, E, K, Fe)
    m.kv("attention.key_length", hd)
    m.kv("attention.value_length", hd)
    m.kv("rope.dimension_count", hd // 2)
    m.kv("leading_dense_block_count", 1)
    m.kv("expert_shared_count", 1)
    m.kv("expert_weights_scale", 2.5, "f32")
    m.kv("expert_weights_norm", True, "bool")
    m.kv("expert_gating_func", 2)
    m.kv("expert_group_count", 2)
    m.kv("expert_group_used_count", 1)
    head(m, D, T.Q8_0, T.F16)
    t = {"q": T.Q8_0, "k": T.F16, "v": T.Q8_0, "o": T.Q4_1, "gate": T.Q4_0, "up": T.Q4_0, "down": T.Q8_0,
         "sh": T.Q8_0}
    for l in range(L):
        gqa_layer(m, l, D, H, KV, hd, t, bias=True)
        m.vec("blk.%d.post_attention_norm.weight" % l, D)
        if l == 0:
            dense_block(m, l, D, ff, T.Q8_0)
        else:
            moe_block(m, l, D, E, Fe, t, probs_b=True, shared=Fe)
    m.finish()


def make_deepseek2(rng, split, name):
    """split: newer files (attn_k_b / attn_v_b, *_mla keys, sigmoid routing with
    a bias, q_lora); else the older attn_kv_b form with softmax routing (V2)."""
    D, L, H, E, K, Fe, ff = 64, 2, 4, 4, 2, 32, 96
    R, rope, nope, v, ql = 32, 16, 32, 32, (32 if split else 0)
    m = Model(name, "deepseek2", rng)
    common(m, D, L, H, 1 if split else H, ff, E, K, Fe)
    m.kv("leading_dense_block_count", 1)
    m.kv("attention.q_lora_rank", ql)
    m.kv("attention.kv_lora_rank", R)
    m.kv("rope.dimension_count", rope)
    m.kv("expert_shared_count", 1)
    if split:
        m.kv("attention.key_length", R + rope)
        m.kv("attention.value_length", R)
        m.kv("attention.key_length_mla", nope + rope)
        m.kv("attention.value_length_mla", v)
        m.kv("expert_gating_func", 2)
        m.kv("expert_weights_norm", True, "bool")
        m.kv("expert_weights_scale", 2.5, "f32")
        m.kv("expert_group_count", 2)
        m.kv("expert_group_used_count", 1)
    else:
        m.kv("attention.key_length", nope + rope)
        m.kv("attention.value_length", v)
        m.kv("expert_gating_func", 1)
        m.kv("expert_weights_scale", 1.0, "f32")
    head(m, D, T.Q8_0, T.Q8_0)
    t = {"gate": T.Q8_0 if split else T.Q4_1, "up": T.Q4_0 if split else T.Q4_1, "down": T.Q8_0, "sh": T.Q8_0}
    for l in range(L):
        p = "blk.%d." % l
        m.vec(p + "attn_norm.weight", D)
        if ql:
            m.mat(p + "attn_q_a.weight", ql, D, T.Q8_0)
            m.vec(p + "attn_q_a_norm.weight", ql)
            m.mat(p + "attn_q_b.weight", H * (nope + rope), ql, T.Q8_0)
        else:
            m.mat(p + "attn_q.weight", H * (nope + rope), D, T.F16)
        m.mat(p + "attn_kv_a_mqa.weight", R + rope, D, T.Q8_0)
        m.vec(p + "attn_kv_a_norm.weight", R)
        kv_b = (rng.standard_normal((H, nope + v, R)) / np.sqrt(R)).astype(np.float32)
        if split:
            k_b = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1))  # [H][R][nope]
            v_b = np.ascontiguousarray(kv_b[:, nope:, :])                     # [H][v][R]
            m.w.add_tensor(p + "attn_k_b.weight", k_b.astype(np.float16))
            m.w.add_tensor(p + "attn_v_b.weight", v_b.astype(np.float16))
        else:
            m.w.add_tensor(p + "attn_kv_b.weight", kv_b.reshape(H * (nope + v), R).astype(np.float16))
        m.mat(p + "attn_output.weight", D, H * v, T.Q8_0)
        m.vec(p + "ffn_norm.weight", D)
        if l == 0:
            dense_block(m, l, D, ff, T.Q8_0)
        else:
            moe_block(m, l, D, E, Fe, t, probs_b=split, shared=Fe)
    m.finish()


MODELS = {
    "qwen3moe": make_qwen3moe,
    "qwen2moe": make_qwen2moe,
    "mixtral": make_mixtral,
    "glm4moe": make_glm4moe,
    "deepseek2": lambda rng: make_deepseek2(rng, True, "deepseek2"),
    "deepseek2_kvb": lambda rng: make_deepseek2(rng, False, "deepseek2_kvb"),
}


def reference(name, rng):
    """llama.cpp's logits for a 12-token prefill, into NAME.ref.gguf."""
    import llama_cpp
    from llama_cpp import Llama

    # ggml's AMX weight buffers (an "extra buffer type") crash in ggml_backend_amx_mul_mat on these tiny
    # shapes (0.3.36, AMX machine): load without extra buffer types; the CPU backend computes the same
    if not getattr(llama_cpp.llama_cpp, "_tandem_patched", False):
        orig = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra_bufts():
            p = orig()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
        llama_cpp.llama_cpp._tandem_patched = True
    path = os.path.join(OUT, name + ".gguf")
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, logits_all=True, verbose=False,
                seed=0)
    toks = [int(t) for t in rng.integers(3, V, size=12)]
    llm.eval(toks)
    logits = np.array(llm.scores[:len(toks)], dtype=np.float32)
    assert logits.shape == (len(toks), V), logits.shape
    assert np.isfinite(logits).all()
    w = gguf.GGUFWriter(os.path.join(OUT, name + ".ref.gguf"), "tandem-ref")
    w.add_string("ref.llama_cpp_python", llama_cpp.__version__)
    w.add_tensor("tokens", np.array(toks, dtype=np.int32))
    w.add_tensor("logits", logits)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    top2 = np.sort(logits, axis=1)[:, -2:]
    print("%-14s logits max|l| %.3f, min top-2 gap %.4f" % (name, np.abs(logits).max(), (top2[:, 1] - top2[:, 0]).min()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", action="store_true", help="only the quant and split fixtures")
    ap.add_argument("--only", nargs="*", help="only these models")
    ap.add_argument("--no-ref", action="store_true", help="write the models, not llama.cpp's logits")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(1234)
    write_quants(rng)
    write_split(rng)
    if a.quants:
        return 0
    for name, make in MODELS.items():
        if a.only and name not in a.only:
            continue
        make(np.random.default_rng(sum(map(ord, name))))
    for name in MODELS:
        if a.only and name not in a.only:
            continue
        if not a.no_ref:
            reference(name, np.random.default_rng(7 + sum(map(ord, name))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
