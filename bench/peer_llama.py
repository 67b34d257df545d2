#!/usr/bin/env python3
"""peer_llama.py - the helper of bench/peer_llama.sh (see there).

    peer_llama.py make OUT.gguf --quant q4_k_m|q8_0 --layers N
        a GGUF of Qwen3-30B-A3B shapes (hidden 2048, 32 query / 4 KV heads of 128,
        128 experts of 768, top-8, vocabulary 151936), N layers, random blocks
        (valid for every type; scales set so weights are about N(0, 1/fan_in)),
        a SentencePiece-style vocabulary in which each word "w<i>" is one token.
        q4_k_m: experts gate/up Q4_K, down Q6_K in every other layer (as llama.cpp's
        Q4_K_M mix), attention Q4_K with attn_v Q6_K, output Q6_K;
        q8_0: everything Q8_0. Norms and routers F32.
    peer_llama.py llama OUT.gguf --threads T --prompt P --decode D
        llama.cpp (llama-cpp-python) on the file: one P-token prompt (timed), then
        D single-token decode steps (timed); prints "llama_prompt_tok_s=... llama_decode_tok_s=..."
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

D, H, KV, HD, E, K, FE, V = 2048, 32, 4, 128, 128, 8, 768, 151936


def make(path, quant, layers):
    import gguf
    from gguf import GGMLQuantizationType as T
    from make_gguf_fixtures import rand_quant

    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(path, "qwen3moe")
    # "\u2581", "w", the digits and "\u2581w" make every "\u2581w<i>" reachable by SentencePiece merges
    # (its prefixes are words too), so a text "w12 w345 ..." is one token per word in both engines
    toks = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    toks += ["\u2581", "w"] + [str(d) for d in range(10)] + ["\u2581w"]
    n0 = len(toks)
    toks += ["\u2581w%d" % i for i in range(V - n0)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n0 + [-float(i) for i in range(V - n0)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (V - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    a = "qwen3moe"
    for k, v in [("block_count", layers), ("context_length", 40960), ("embedding_length", D),
                 ("feed_forward_length", 6144), ("attention.head_count", H), ("attention.head_count_kv", KV),
                 ("expert_count", E), ("expert_used_count", K), ("expert_feed_forward_length", FE),
                 ("attention.key_length", HD), ("attention.value_length", HD)]:
        w.add_uint32("%s.%s" % (a, k), v)
    w.add_float32(a + ".rope.freq_base", 1e6)
    w.add_float32(a + ".attention.layer_norm_rms_epsilon", 1e-6)

    def mat(name, rows, cols, t, extra=()):
        data = rand_quant(rng, tuple(extra) + (rows, cols), t, s=1.0 / np.sqrt(cols))
        w.add_tensor(name, data, raw_dtype=t) if t != T.F32 else w.add_tensor(name, data)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q8 = quant == "q8_0"
    q4, q6 = (T.Q8_0, T.Q8_0) if q8 else (T.Q4_K, T.Q6_K)
    mat("token_embd.weight", V, D, q4)
    vec("output_norm.weight", D)
    mat("output.weight", V, D, q6)
    for l in range(layers):
        p = "blk.%d." % l
        vec(p + "attn_norm.weight", D)
        mat(p + "attn_q.weight", H * HD, D, q4)
        mat(p + "attn_k.weight", KV * HD, D, q4)
        mat(p + "attn_v.weight", KV * HD, D, q6)
        mat(p + "attn_output.weight", D, H * HD, q4)
        vec(p + "attn_q_norm.weight", HD)
        vec(p + "attn_k_norm.weight", HD)
        vec(p + "ffn_norm.weight", D)
        mat(p + "ffn_gate_inp.weight", E, D, T.F32)
        mat(p + "ffn_gate_exps.weight", FE, D, q4, extra=(E,))
        mat(p + "ffn_up_exps.weight", FE, D, q4, extra=(E,))
        mat(p + "ffn_down_exps.weight", D, FE, q6 if l % 2 == 0 else q4, extra=(E,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama(path, threads, prompt, decode, extra_bufts):
    import llama_cpp
    from llama_cpp import Llama

    if not extra_bufts:
        # ggml's AMX weight buffers (an "extra buffer type", as is the repacked one) crash in
        # ggml_backend_amx_mul_mat on this machine (0.3.36): load without them
        orig = llama_cpp.llama_cpp.llama_model_default_params

        def no_extra():
            p = orig()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_cpp.llama_model_default_params = no_extra
    llm = Llama(model_path=path, n_ctx=prompt + decode + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(3)
    toks = [int(t) for t in rng.integers(272, V, size=prompt)]
    t0 = time.perf_counter()
    llm.eval(toks)
    t1 = time.perf_counter()
    nxt = [int(t) for t in rng.integers(272, V, size=decode)]
    t2 = time.perf_counter()
    for t in nxt:
        llm.eval([t])
    t3 = time.perf_counter()
    print("llama_prompt_tok_s=%.3f llama_decode_tok_s=%.3f llama_extra_bufts=%d llama_cpp_python=%s" %
          (prompt / (t1 - t0), decode / (t3 - t2), extra_bufts, llama_cpp.__version__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "llama"])
    ap.add_argument("path")
    ap.add_argument("--quant", default="q4_k_m", choices=["q4_k_m", "q8_0"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--extra-bufts", type=int, default=0, help="1: let llama.cpp use its AMX / repacked weight buffers")
    a = ap.parse_args()
    if a.what == "make":
        make(a.path, a.quant, a.layers)
    else:
        llama(a.path, a.threads, a.prompt, a.decode, a.extra_bufts)


if __name__ == "__main__":
    main()
