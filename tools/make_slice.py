#!/usr/bin/env python3
"""make_slice.py - full-width slices of models too big for the test machines.

A slice is a real model's config.json cut to a few layers, with random
weights of the real shapes and dtypes, written as a Hugging Face checkpoint
(safetensors shards of at most 4 GB). `tandem bench mem` loads them to hold
the measured peak RSS against the memory plan (DESIGN.md section 6).

  deepseek-v3   the first dense layer + one MoE layer (256 experts of
                2048 x 7168), linear weights FP8 E4M3 with 128 x 128 block
                scales as DeepSeek releases them; about 15.5 GB
  qwen3-235b    two MoE layers (128 experts of 1536 x 4096), BF16; about 12 GB

Usage: python3 tools/make_slice.py deepseek-v3|qwen3-235b OUTDIR

Only the standard library: random bytes from os.urandom, mapped by a byte
table into finite values (E4M3 without its NaN codes; BF16 with exponents of
magnitude 2^-9..2^-6), so the files are written at disk speed.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARD_MAX = 4 << 30

# E4M3: 0x7f / 0xff are NaN; everything else is finite
FP8_TABLE = bytes(b if (b & 0x7f) != 0x7f else b - 1 for b in range(256))
# BF16 as little-endian byte pairs: every byte is drawn from a table whose
# values, as a high byte, give exponents 2^-9..2^-6 of either sign; as a low
# byte they are just mantissa bits
BF16_TABLE = bytes((0x3b + (b % 3)) | (b & 0x80) for b in range(256))


def rand_bytes(n, table):
    return os.urandom(n).translate(table)


class Writer:
    """Tensors appended in order into shards; header written at the end."""

    def __init__(self, outdir):
        self.outdir = outdir
        self.shards = []  # [(name, [(tensor, dtype, shape, nbytes, chunks_fn)])]
        self.cur = []
        self.cur_bytes = 0

    def add(self, name, dtype, shape, make):
        n = 1
        for s in shape:
            n *= s
        nbytes = n * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
        if self.cur and self.cur_bytes + nbytes > SHARD_MAX:
            self.shards.append(self.cur)
            self.cur, self.cur_bytes = [], 0
        self.cur.append((name, dtype, shape, nbytes, make))
        self.cur_bytes += nbytes

    def finish(self):
        if self.cur:
            self.shards.append(self.cur)
        n = len(self.shards)
        weight_map = {}
        for i, tensors in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, off = {}, 0
            for name, dtype, shape, nbytes, _ in tensors:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
                off += nbytes
                weight_map[name] = fname
            h = json.dumps(header, separators=(",", ":")).encode()
            h += b" " * (-len(h) % 8)
            with open(os.path.join(self.outdir, fname), "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h)
                for name, dtype, shape, nbytes, make in tensors:
                    left = nbytes
                    while left:
                        chunk = make(min(left, 64 << 20))
                        f.write(chunk)
                        left -= len(chunk)
            print(f"{fname}: {off / 1e9:.2f} GB", flush=True)
        with open(os.path.join(self.outdir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def fp8(n):
    return rand_bytes(n, FP8_TABLE)


def bf16(n):
    return rand_bytes(n, BF16_TABLE)


def ones_bf16(n):
    return b"\x80\x3f" * (n // 2)


def scales(n):
    # 1/448-ish block scales: the value 2^-12 as f32, repeated
    return struct.pack("<f", 2.0 ** -12) * (n // 4)


def zeros(n):
    return bytes(n)


def linear_fp8(w, name, rows, cols, block=128):
    w.add(name, "F8_E4M3", [rows, cols], fp8)
    w.add(name + "_scale_inv", "F32", [-(-rows // block), -(-cols // block)], scales)


def deepseek_v3(outdir):
    with open(os.path.join(HERE, "..", "bench", "configs", "deepseek-v3", "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    cfg["first_k_dense_replace"] = 1
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    D, V, H = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qr, kvr, rope = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    F, Fe, E = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    w = Writer(outdir)
    w.add("model.embed_tokens.weight", "BF16", [V, D], bf16)
    for l in range(2):
        p = f"model.layers.{l}."
        w.add(p + "input_layernorm.weight", "BF16", [D], ones_bf16)
        w.add(p + "post_attention_layernorm.weight", "BF16", [D], ones_bf16)
        a = p + "self_attn."
        linear_fp8(w, a + "q_a_proj.weight", qr, D)
        w.add(a + "q_a_layernorm.weight", "BF16", [qr], ones_bf16)
        linear_fp8(w, a + "q_b_proj.weight", H * (nope + rope), qr)
        linear_fp8(w, a + "kv_a_proj_with_mqa.weight", kvr + rope, D)
        w.add(a + "kv_a_layernorm.weight", "BF16", [kvr], ones_bf16)
        linear_fp8(w, a + "kv_b_proj.weight", H * (nope + vd), kvr)
        linear_fp8(w, a + "o_proj.weight", D, H * vd)
        m = p + "mlp."
        if l == 0:
            linear_fp8(w, m + "gate_proj.weight", F, D)
            linear_fp8(w, m + "up_proj.weight", F, D)
            linear_fp8(w, m + "down_proj.weight", D, F)
            continue
        w.add(m + "gate.weight", "BF16", [E, D], bf16)
        w.add(m + "gate.e_score_correction_bias", "F32", [E], zeros)
        for x in range(E):
            linear_fp8(w, m + f"experts.{x}.gate_proj.weight", Fe, D)
            linear_fp8(w, m + f"experts.{x}.up_proj.weight", Fe, D)
            linear_fp8(w, m + f"experts.{x}.down_proj.weight", D, Fe)
        linear_fp8(w, m + "shared_experts.gate_proj.weight", Fe, D)
        linear_fp8(w, m + "shared_experts.up_proj.weight", Fe, D)
        linear_fp8(w, m + "shared_experts.down_proj.weight", D, Fe)
    w.add("model.norm.weight", "BF16", [D], ones_bf16)
    w.add("lm_head.weight", "BF16", [V, D], bf16)
    return cfg, w


def qwen3_235b(outdir):
    with open(os.path.join(HERE, "..", "bench", "configs", "qwen3-235b-a22b", "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    D, V, H, KV, hd = (cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg.get("head_dim", 128))
    Fe, E = cfg["moe_intermediate_size"], cfg["num_experts"]
    w = Writer(outdir)
    w.add("model.embed_tokens.weight", "BF16", [V, D], bf16)
    for l in range(2):
        p = f"model.layers.{l}."
        w.add(p + "input_layernorm.weight", "BF16", [D], ones_bf16)
        w.add(p + "post_attention_layernorm.weight", "BF16", [D], ones_bf16)
        a = p + "self_attn."
        w.add(a + "q_proj.weight", "BF16", [H * hd, D], bf16)
        w.add(a + "k_proj.weight", "BF16", [KV * hd, D], bf16)
        w.add(a + "v_proj.weight", "BF16", [KV * hd, D], bf16)
        w.add(a + "o_proj.weight", "BF16", [D, H * hd], bf16)
        w.add(a + "q_norm.weight", "BF16", [hd], ones_bf16)
        w.add(a + "k_norm.weight", "BF16", [hd], ones_bf16)
        m = p + "mlp."
        w.add(m + "gate.weight", "BF16", [E, D], bf16)
        for x in range(E):
            w.add(m + f"experts.{x}.gate_proj.weight", "BF16", [Fe, D], bf16)
            w.add(m + f"experts.{x}.up_proj.weight", "BF16", [Fe, D], bf16)
            w.add(m + f"experts.{x}.down_proj.weight", "BF16", [D, Fe], bf16)
    w.add("model.norm.weight", "BF16", [D], ones_bf16)
    w.add("lm_head.weight", "BF16", [V, D], bf16)
    return cfg, w


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("deepseek-v3", "qwen3-235b"):
        print(__doc__)
        sys.exit(2)
    outdir = sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    cfg, w = (deepseek_v3 if sys.argv[1] == "deepseek-v3" else qwen3_235b)(outdir)
    w.finish()
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


if __name__ == "__main__":
    main()
