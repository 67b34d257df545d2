#!/usr/bin/env python3
"""Build the transformers reference fixtures under tests/fixtures/<name>/.

Role: for every supported MoE family, build a SMALL random-weight model with Hugging Face
transformers, save it as a hub-format BF16 checkpoint (save_pretrained), and record transformers'
float32 reference logits (eager attention, CPU) in ref.safetensors. The C tests compare tandem's
logits against these files without needing Python. See tools/README.md for the file contract and
for what the installed transformers source does per family (rope layout, yarn, routing).

Invariants (the contract the C side relies on):
  - <name>/config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index.json)
    are written by save_pretrained from the model in bfloat16; e_score_correction_bias stays F32
    as in the real DeepSeek-V3 / GLM-4.5 checkpoints. deepseek_v3_fp8 is the exception: written
    directly with safetensors as a native DeepSeek FP8 checkpoint (see write_fp8_fixture).
  - The reference model is RELOADED from the saved files (from_pretrained, dtype=float32,
    attn_implementation="eager", experts_implementation="eager"), so the logits come from exactly
    the bf16 values on disk, upcast to float32. Load must report no missing/unexpected keys.
  - ref.safetensors holds (all contiguous):
      prefill_tokens I32 [T], prefill_logits F32 [T,V]            positions 0..T-1
      decode_tokens  I32 [D], decode_logits  F32 [D,V]            positions T..T+D-1, one token
                                                                  per call through DynamicCache
      batch_a_tokens I32 [La], batch_b_tokens I32 [Lb]             prompt + decode tokens
      batch_prompt_lens I32 [2]
      batch_a_logits F32 [La,V], batch_b_logits F32 [Lb,V]        every position, each sequence
                                                                  on its own (prefill + cached decode)
      noise_f64 F32 [1]   max|l32 - l64| / max|l64| over the prefill, same weights in float64
    decode tokens are greedy: decode_tokens[0] = argmax(prefill_logits[T-1]),
    decode_tokens[i] = argmax(decode_logits[i-1]); the same for the batch sequences.
  - Robustness: a seed is accepted only if (a) f32 and f64 logits agree to 1e-4 of max|logit| at
    every recorded position, (b) every top-1 vs top-2 logit gap is >= --min-top1-gap of max|logit|,
    (c) every routing decision (expert top-k and group top-k) has a margin >= --min-route-margin in
    the units the router compares (logits for softmax routers, sigmoid+bias for noaux_tc routers).
    Otherwise the next seed is tried.
  - Deterministic: same script + same library versions -> same bytes.

Run (about 10 s on 2 cores):  python3 tools/make_fixtures.py [--only NAME ...] [--check]
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    DynamicCache,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)
from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

T_PREFILL = 20          # prefill length
D_DECODE = 8            # decode steps after the prefill
BATCH_PROMPTS = (5, 11)  # prompt lengths of the two batch sequences
BATCH_DECODE = 4        # decode steps of each batch sequence
FP8_BLOCK = 32          # weight_block_size of deepseek_v3_fp8 (128 in the real checkpoint)
FP8_MAX = 448.0         # largest finite float8_e4m3fn

# ----------------------------------------------------------------------------------------------
# Family table: name -> (model class, config class, config kwargs, save options).
# Sizes are small (hidden 64, 3-4 layers, 8-16 experts, vocab 256-512); dims such as 48 and 144
# are deliberately not multiples of 32 so block/tile code sees partial blocks.
# ----------------------------------------------------------------------------------------------

YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
           "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}
# V2: mscale != mscale_all_dim on purpose so yarn's attention_factor (cos/sin scale) is not 1.
YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
           "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 0.8}

FAMILIES = {
    "qwen3_moe": dict(
        model=Qwen3MoeForCausalLM, config=Qwen3MoeConfig, shard=None,
        kw=dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=144,
                moe_intermediate_size=48, num_experts=16, num_experts_per_tok=4,
                norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1,
                rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3_moe_sharded": dict(
        model=Qwen3MoeForCausalLM, config=Qwen3MoeConfig, shard="300KB",
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=128,
                moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=2,
                rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2_moe": dict(
        model=Qwen2MoeForCausalLM, config=Qwen2MoeConfig, shard=None,
        kw=dict(vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                shared_expert_intermediate_size=96, num_experts=12, num_experts_per_tok=4,
                norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1,
                qkv_bias=True, rms_norm_eps=1e-6, max_position_embeddings=512,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": dict(
        model=MixtralForCausalLM, config=MixtralConfig, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, num_local_experts=8,
                num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                sliding_window=None, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "deepseek_v3": dict(
        model=DeepseekV3ForCausalLM, config=DeepseekV3Config, shard=None, fp8_weights=True,
        kw=dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=144, moe_intermediate_size=48,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=24, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                first_k_dense_replace=1, rms_norm_eps=1e-6, max_position_embeddings=256,
                tie_word_embeddings=False, rope_parameters=dict(YARN_V3))),
    "deepseek_v2": dict(
        model=DeepseekV2ForCausalLM, config=DeepseekV2Config, shard=None,
        kw=dict(vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16,
                v_head_dim=32, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
                n_group=4, topk_group=2, topk_method="group_limited_greedy",
                routed_scaling_factor=2.0, norm_topk_prob=False, first_k_dense_replace=1,
                rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
                rope_parameters=dict(YARN_V2))),
    "glm4_moe": dict(
        model=Glm4MoeForCausalLM, config=Glm4MoeConfig, shard=None,
        kw=dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5,
                intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5,
                max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # DeepSeek sparse attention: index_topk 8 < the prefill of 20, so every position from 8 on
    # attends to a selection, earlier ones to everything (the dense case). Yarn rope reaches the
    # indexer too (its cos/sin carry the attention factor).
    "deepseek_v32": dict(
        model=DeepseekV32ForCausalLM, config=DeepseekV32Config, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                first_k_dense_replace=1, index_topk=8, index_head_dim=32, index_n_heads=8,
                rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
                rope_parameters=dict(YARN_V3))),
    # GLM-5: interleaved rope in the indexer; layer 1 has no indexer and reuses layer 0's top-k.
    "glm_moe_dsa": dict(
        model=GlmMoeDsaForCausalLM, config=GlmMoeDsaConfig, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16,
                v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                first_k_dense_replace=1, index_topk=6, index_head_dim=24, index_n_heads=8,
                indexer_types=["full", "shared", "full"],
                rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Hybrid linear attention: Gated DeltaNet layers (conv1d state + delta-rule state per sequence,
    # 2 key heads serving 4 value heads) around a gated full-attention layer with partial rotary
    # 0.25, q/k norm and zero-centred RMSNorms.
    "qwen3_5_moe": dict(
        model=Qwen3_5MoeForCausalLM, config=Qwen3_5MoeTextConfig, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=24,
                linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6,
                max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.25})),
    # Qwen3-Next: the same layers with fused in_proj_qkvz / in_proj_ba, and a dense layer.
    "qwen3_next": dict(
        model=Qwen3NextForCausalLM, config=Qwen3NextConfig, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                norm_topk_prob=True, mlp_only_layers=[2], decoder_sparse_step=1,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=24,
                linear_num_key_heads=2, linear_num_value_heads=4, rms_norm_eps=1e-6,
                max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.25})),
    # gpt-oss: sinks, a sliding window of 6 (< the prefill) on layers 0 and 2, q/k/v/o biases, yarn,
    # router and expert biases, and a swiglu_limit low enough that the clamps act.
    "gpt_oss": dict(
        model=GptOssForCausalLM, config=GptOssConfig, shard=None,
        kw=dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
                num_experts_per_tok=2, sliding_window=6, attention_bias=True, swiglu_limit=0.8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                 "original_max_position_embeddings": 4096})),
}
# deepseek_v3_fp8 is derived from deepseek_v3 (same weights, same ref.safetensors).
ALL_NAMES = list(FAMILIES) + ["deepseek_v3_fp8"]


# ----------------------------------------------------------------------------------------------
# Weights: meaningful random values instead of transformers' tiny defaults.
# ----------------------------------------------------------------------------------------------

def fp8_block_quant(w, block):
    """Quantise a 2-D float32 tensor to float8_e4m3fn with one power-of-two scale per
    block x block tile (partial tiles at the edges). Returns (q fp8 [R,C], scale f32
    [ceil(R/B), ceil(C/B)]) with w ~= q * scale, and q * scale exactly representable in bf16."""
    rows, cols = w.shape
    nbr, nbc = (rows + block - 1) // block, (cols + block - 1) // block
    scale = torch.ones(nbr, nbc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nbr):
        for j in range(nbc):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            amax = tile.abs().max().item()
            s = 1.0 if amax == 0.0 else 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_block_dequant(q, scale, block):
    """Inverse of fp8_block_quant: w = q * scale broadcast over block x block tiles."""
    rows, cols = q.shape
    s = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q.float() * s


def fp8_roundtrip(w, block=FP8_BLOCK):
    q, s = fp8_block_quant(w, block)
    return fp8_block_dequant(q, s, block)


def init_weights(model, gen, fp8_weights):
    """Overwrite every parameter (and the routing-bias buffers) with values that make a bug show:
    Linear N(0, 1/fan_in), norms 1 + 0.1 N(0,1), biases 0.2 N(0,1), embeddings N(0,1),
    lm_head 3/sqrt(hidden) so logits have std of a few units, e_score_correction_bias 0.1 N(0,1).
    With fp8_weights, every Linear weight of attention and MLP/experts is replaced by its FP8
    block round trip (per hub tensor: a fused expert gate_up_proj is quantised as its gate and up
    halves), so the deepseek_v3_fp8 checkpoint dequantises to exactly these values."""
    def randn(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-2] if name.endswith(".weight") or name.endswith(".bias") else ""
            if name.endswith("embed_tokens.weight"):
                v = randn(p.shape, 1.0)
            elif name.endswith("linear_attn.conv1d.weight"):      # depthwise [C, 1, K]
                v = randn(p.shape, 1.0 / math.sqrt(p.shape[2]))
            elif name.endswith("linear_attn.dt_bias"):
                v = randn(p.shape, 0.5)
            elif name.endswith("linear_attn.A_log"):             # decay rates exp(A_log) around 1
                v = randn(p.shape, 0.5)
            elif name.endswith("self_attn.sinks"):               # gpt-oss: one sink logit per head
                v = randn(p.shape, 1.0)
            elif name == "lm_head.weight":
                v = randn(p.shape, 3.0 / math.sqrt(p.shape[1]))
            elif p.dim() == 1 and name.endswith(".bias"):
                v = randn(p.shape, 0.2)
            elif p.dim() == 1 and "norm" in leaf and not p.detach().any():
                v = randn(p.shape, 0.1)        # zero-centred RMSNorm (Qwen3.5, Qwen3-Next): scale 1 + w
            elif p.dim() == 1 and "norm" in leaf:
                v = 1.0 + randn(p.shape, 0.1)
            elif p.dim() == 2:
                v = randn(p.shape, 1.0 / math.sqrt(p.shape[1]))
                is_router = leaf in ("gate", "shared_expert_gate")
                if fp8_weights and not is_router:
                    v = fp8_roundtrip(v)
            elif p.dim() == 3 and name.endswith("experts.gate_up_proj"):
                v = randn(p.shape, 1.0 / math.sqrt(p.shape[2]))
                if fp8_weights:
                    half = p.shape[1] // 2
                    for e in range(p.shape[0]):
                        v[e, :half] = fp8_roundtrip(v[e, :half])
                        v[e, half:] = fp8_roundtrip(v[e, half:])
            elif p.dim() == 3 and name.endswith("experts.down_proj"):
                v = randn(p.shape, 1.0 / math.sqrt(p.shape[2]))
                if fp8_weights:
                    for e in range(p.shape[0]):
                        v[e] = fp8_roundtrip(v[e])
            else:
                raise RuntimeError(f"init_weights: no rule for parameter {name} {tuple(p.shape)}")
            # Round to bf16 now: the in-memory model then equals what is saved.
            p.copy_(v.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(randn(b.shape, 0.1))


# ----------------------------------------------------------------------------------------------
# Reference runs
# ----------------------------------------------------------------------------------------------

def forward_logits(model, ids, cache=None):
    """One forward call; returns logits [L, V] of a single sequence."""
    kw = {"use_cache": cache is not None}
    if cache is not None:
        kw["cache"] = cache
    out = model(input_ids=ids.view(1, -1).long(), **kw)
    return out.logits[0]


class SeedRejected(RuntimeError):
    """A reference run that is not robust for this seed (build_fixture tries the next)."""


def run_sequence(model, prompt, n_decode):
    """Prefill `prompt` through a DynamicCache, then feed n_decode greedy tokens one per call.
    Returns (tokens [P+n] int32, logits [P+n, V] float32) and checks the cached path against one
    uncached forward over the whole sequence."""
    cache = DynamicCache(config=model.config)
    logits = [forward_logits(model, prompt, cache)]
    tokens = [prompt]
    nxt = logits[-1][-1].argmax()
    for _ in range(n_decode):
        tok = nxt.view(1)
        tokens.append(tok)
        logits.append(forward_logits(model, tok, cache))
        nxt = logits[-1][-1].argmax()
    tokens = torch.cat(tokens).to(torch.int32)
    logits = torch.cat(logits).float().contiguous()
    full = forward_logits(model, tokens).float()
    dev = ((full - logits).abs().max() / logits.abs().max()).item()
    if dev > 1e-5:
        raise SeedRejected(f"cached and uncached logits differ by {dev:.2e} of max|logit|")
    return tokens, logits


class RouteMargins:
    """Forward hooks on the router modules: record the smallest margin of every top-k decision
    (experts, and groups where the router has them) in the units the router compares."""

    def __init__(self, model):
        self.min_margin = math.inf
        self.handles = []
        for mod in model.modules():
            if type(mod).__name__.endswith(("TopKRouter", "TopkRouter")):
                self.handles.append(mod.register_forward_hook(self._hook))

    @staticmethod
    def _kth_gap(x, k):
        """x [N, M] -> min over rows of x_(k) - x_(k+1) (sorted descending), ignoring -inf."""
        if k >= x.shape[1]:
            return math.inf
        s = x.sort(dim=-1, descending=True).values
        gap = s[:, k - 1] - s[:, k]
        return gap[torch.isfinite(gap)].min().item() if torch.isfinite(gap).any() else math.inf

    def _hook(self, mod, args, out):
        logits = out[0].detach().double().view(-1, out[0].shape[-1])
        k = mod.top_k
        if hasattr(mod, "e_score_correction_bias"):        # DeepSeek-V3 / GLM noaux_tc
            score = logits.sigmoid() + mod.e_score_correction_bias.double()
            ng, tg = mod.num_group, mod.topk_group
            grouped = score.view(score.shape[0], ng, -1)
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
            m = self._kth_gap(gscore, tg)
            gsel = gscore.topk(tg, dim=-1).indices
            mask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gsel, True)
            masked = score.masked_fill(~mask.repeat_interleave(grouped.shape[2], 1), -math.inf)
            m = min(m, self._kth_gap(masked, k))
        elif getattr(mod, "topk_method", "greedy") == "group_limited_greedy":   # DeepSeek-V2
            ng, tg = mod.num_group, mod.topk_group
            grouped = logits.view(logits.shape[0], ng, -1)
            gscore = grouped.max(dim=-1).values          # softmax is monotone: compare logits
            m = self._kth_gap(gscore, tg)
            gsel = gscore.topk(tg, dim=-1).indices
            mask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gsel, True)
            masked = logits.masked_fill(~mask.repeat_interleave(grouped.shape[2], 1), -math.inf)
            m = min(m, self._kth_gap(masked, k))
        else:                                            # softmax top-k on logits
            m = self._kth_gap(logits, k)
        self.min_margin = min(self.min_margin, m)

    def remove(self):
        for h in self.handles:
            h.remove()


class IndexMargins:
    """The DSA indexers' top-k decisions (DeepSeek-V3.2, GLM-5): while an *Indexer module runs,
    torch.Tensor.topk is wrapped to record the smallest gap between the k-th and (k+1)-th index
    score of every row that has more than k unmasked positions, so a seed whose selection hangs
    on a tie (or on float rounding) is rejected like a routing tie."""

    def __init__(self, model):
        self.min_margin = math.inf
        self.handles = []
        self.active = 0
        self.orig = torch.Tensor.topk
        mods = [m for m in model.modules() if type(m).__name__.endswith("Indexer")]
        if not mods:
            return
        for mod in mods:
            self.handles.append(mod.register_forward_pre_hook(self._enter))
            self.handles.append(mod.register_forward_hook(self._leave))
        margins = self

        def topk(t, k, *a, **kw):
            if margins.active:
                x = t.detach().double().reshape(-1, t.shape[-1])
                valid = x > -1e30                          # masked positions carry about -3.4e38
                s = x.masked_fill(~valid, -math.inf).sort(dim=-1, descending=True).values
                rows = valid.sum(-1) > k
                if rows.any():
                    gap = (s[rows, k - 1] - s[rows, k]).min().item()
                    margins.min_margin = min(margins.min_margin, gap)
            return margins.orig(t, k, *a, **kw)
        torch.Tensor.topk = topk

    def _enter(self, *_):
        self.active += 1

    def _leave(self, *_):
        self.active -= 1

    def remove(self):
        torch.Tensor.topk = self.orig
        for h in self.handles:
            h.remove()


def top1_gap(logits):
    """Smallest (top1 - top2) over rows, relative to max|logit|."""
    t = logits.topk(2, dim=-1).values
    return ((t[:, 0] - t[:, 1]).min() / logits.abs().max()).item()


def make_reference(model, gen, vocab):
    """All reference tensors of ref.safetensors plus quality measures for the seed check."""
    prompt = torch.randint(0, vocab, (T_PREFILL,), generator=gen)
    prompt_a = torch.randint(0, vocab, (BATCH_PROMPTS[0],), generator=gen)
    prompt_b = torch.randint(0, vocab, (BATCH_PROMPTS[1],), generator=gen)
    margins = RouteMargins(model)
    imargins = IndexMargins(model)
    try:
        toks, logits = run_sequence(model, prompt, D_DECODE)
        toks_a, logits_a = run_sequence(model, prompt_a, BATCH_DECODE)
        toks_b, logits_b = run_sequence(model, prompt_b, BATCH_DECODE)
    finally:
        margins.remove()
        imargins.remove()

    # The same weights in float64 (norms, routers and rope still cast to float32 inside
    # transformers, see tools/README.md): a floor for the error and a routing-flip detector.
    m64 = copy.deepcopy(model).double()
    worst = 0.0
    noise = None
    for t, l32 in ((toks, logits), (toks_a, logits_a), (toks_b, logits_b)):
        l64 = forward_logits(m64, t)
        rel = ((l32.double() - l64).abs().max() / l64.abs().max()).item()
        worst = max(worst, rel)
        if noise is None:   # the prefill part of the main sequence
            noise = ((l32[:T_PREFILL].double() - l64[:T_PREFILL]).abs().max()
                     / l64[:T_PREFILL].abs().max()).item()
    del m64

    ref = {
        "prefill_tokens": toks[:T_PREFILL].contiguous(),
        "prefill_logits": logits[:T_PREFILL].contiguous(),
        "decode_tokens": toks[T_PREFILL:].contiguous(),
        "decode_logits": logits[T_PREFILL:].contiguous(),
        "batch_a_tokens": toks_a.contiguous(),
        "batch_b_tokens": toks_b.contiguous(),
        "batch_prompt_lens": torch.tensor(BATCH_PROMPTS, dtype=torch.int32),
        "batch_a_logits": logits_a.contiguous(),
        "batch_b_logits": logits_b.contiguous(),
        "noise_f64": torch.tensor([noise], dtype=torch.float32),
    }
    all_logits = torch.cat([logits, logits_a, logits_b])
    stats = {
        "f64_worst": worst, "noise": noise, "top1_gap": top1_gap(all_logits),
        "route_margin": min(margins.min_margin, imargins.min_margin), "logit_std": all_logits.std().item(),
        "logit_max": all_logits.abs().max().item(),
    }
    return ref, stats


# ----------------------------------------------------------------------------------------------
# One fixture
# ----------------------------------------------------------------------------------------------

def build_config(spec):
    kw = copy.deepcopy(spec["kw"])
    cfg = spec["config"](**kw)
    cfg._attn_implementation = "eager"
    return cfg


def save_bf16(model, outdir, shard):
    """save_pretrained in bf16, keeping e_score_correction_bias F32 (as in the hub checkpoints)."""
    biases = {n: b.detach().clone() for n, b in model.named_buffers()
              if n.endswith("e_score_correction_bias")}
    m = model.to(torch.bfloat16)
    for n, b in m.named_buffers():
        if n in biases:
            b.data = biases[n]
    kw = {} if shard is None else {"max_shard_size": shard}
    m.save_pretrained(outdir, **kw)
    gen_cfg = os.path.join(outdir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)


def load_reference_model(spec, outdir):
    model, info = spec["model"].from_pretrained(
        outdir, dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}   # missing/unexpected/mismatched/errors
    if problems:
        raise RuntimeError(f"{outdir}: reload reported {problems}")
    model.eval()
    return model.float()


def check_roundtrip(mem_model, disk_model):
    """The reloaded model must hold exactly the in-memory values (bf16-rounded)."""
    disk = dict(disk_model.named_parameters())
    disk.update(dict(disk_model.named_buffers()))
    for name, p in list(mem_model.named_parameters()) + list(mem_model.named_buffers()):
        if "rotary_emb" in name:
            continue
        if not torch.equal(p.float(), disk[name].float()):
            raise RuntimeError(f"reload changed {name}")


def build_fixture(name, spec, outroot, args):
    """Try seeds until the reference passes the robustness checks; write the fixture folder."""
    for attempt in range(args.max_seeds):
        seed = 1000 * (ALL_NAMES.index(name) + 1) + attempt
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        cfg = build_config(spec)
        model = spec["model"](cfg).eval()
        init_weights(model, gen, spec.get("fp8_weights", False))
        tmp = tempfile.mkdtemp(prefix=f"fx_{name}_")
        save_bf16(copy.deepcopy(model), tmp, spec["shard"])
        ref_model = load_reference_model(spec, tmp)
        check_roundtrip(model, ref_model)
        with torch.no_grad():
            try:
                ref, st = make_reference(ref_model, gen, cfg.vocab_size)
            except SeedRejected as e:    # e.g. a DSA top-k tie: cached and uncached runs disagree
                print(f"  {name} seed {seed}: {e}: retry", flush=True)
                shutil.rmtree(tmp)
                continue
        ok = (st["f64_worst"] <= 1e-4 and st["top1_gap"] >= args.min_top1_gap
              and st["route_margin"] >= args.min_route_margin)
        print(f"  {name} seed {seed}: f64 {st['f64_worst']:.1e} top1-gap {st['top1_gap']:.1e} "
              f"route-margin {st['route_margin']:.1e} logit-std {st['logit_std']:.2f} "
              f"{'ok' if ok else 'retry'}", flush=True)
        if not ok:
            shutil.rmtree(tmp)
            continue
        save_file(ref, os.path.join(tmp, "ref.safetensors"), metadata={"format": "pt"})
        publish(tmp, os.path.join(outroot, name))
        st["seed"] = seed
        st["params"] = sum(p.numel() for p in ref_model.parameters())
        if any(n.endswith("e_score_correction_bias") for n, _ in ref_model.named_buffers()):
            bias_sensitivity(ref_model, ref, st)
        return st
    raise RuntimeError(f"{name}: no seed in {args.max_seeds} passed the robustness checks")


def bias_sensitivity(model, ref, st):
    """How much the logits move when e_score_correction_bias is dropped: shows the fixture
    catches an engine that ignores the bias."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
        l = forward_logits(m, ref["prefill_tokens"])
    st["bias_effect"] = ((l - ref["prefill_logits"]).abs().max() / ref["prefill_logits"].abs().max()).item()


# ----------------------------------------------------------------------------------------------
# deepseek_v3_fp8: the deepseek_v3 weights as a native DeepSeek-V3 FP8 checkpoint
# ----------------------------------------------------------------------------------------------

FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias")


def is_fp8_target(name, t):
    return (t.dim() == 2 and name.endswith(".weight")
            and not any(s in name for s in FP8_SKIP))


def to_legacy_rope(cfg):
    """config.json in the hub's native DeepSeek-V3 layout: rope_theta + rope_scaling (with
    "type") at the top level instead of transformers v5's rope_parameters."""
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def write_fp8_fixture(outroot):
    src = os.path.join(outroot, "deepseek_v3")
    dst = os.path.join(outroot, "deepseek_v3_fp8")
    tmp = tempfile.mkdtemp(prefix="fx_fp8_")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    n_fp8 = 0
    for name, t in sorted(tensors.items()):
        if is_fp8_target(name, t):
            q, s = fp8_block_quant(t.float(), FP8_BLOCK)
            if not torch.equal(fp8_block_dequant(q, s, FP8_BLOCK), t.float()):
                raise RuntimeError(f"{name}: FP8 dequantisation is not exact")
            out[name] = q.contiguous()
            out[name + "_scale_inv"] = s.contiguous()
            n_fp8 += 1
        else:
            out[name] = t.contiguous()
    save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg = to_legacy_rope(cfg)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic",
                                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copyfile(os.path.join(src, "ref.safetensors"), os.path.join(tmp, "ref.safetensors"))
    verify_fp8_fixture(tmp, src)
    publish(tmp, dst)
    print(f"  deepseek_v3_fp8: {n_fp8} FP8 tensors, block {FP8_BLOCK}", flush=True)


def verify_fp8_fixture(fp8dir, bf16dir):
    """Dequantise every FP8 tensor back and compare bit-exactly with the bf16 checkpoint, and
    check transformers reads the legacy-style config to the same rope parameters."""
    bf = load_file(os.path.join(bf16dir, "model.safetensors"))
    with safe_open(os.path.join(fp8dir, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:
            if name.endswith("_scale_inv"):
                continue
            t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                w = fp8_block_dequant(t, f.get_tensor(name + "_scale_inv"), FP8_BLOCK)
            else:
                w = t.float()
            if not torch.equal(w, bf[name].float()) or bf[name].dtype != (
                    t.dtype if t.dtype != torch.float8_e4m3fn else torch.bfloat16):
                raise RuntimeError(f"deepseek_v3_fp8: {name} does not match deepseek_v3")
    if names - {n for n in names if n.endswith("_scale_inv")} != set(bf):
        raise RuntimeError("deepseek_v3_fp8: tensor names differ from deepseek_v3")
    a = transformers.AutoConfig.from_pretrained(fp8dir).to_dict()
    b = transformers.AutoConfig.from_pretrained(bf16dir).to_dict()
    a["rope_parameters"].pop("type", None)
    for k in ("quantization_config", "dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        a.pop(k, None)
        b.pop(k, None)
    if a != b:
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        raise RuntimeError(f"deepseek_v3_fp8: config.json reads differently: {diff}")


# ----------------------------------------------------------------------------------------------
# Self-check: an independent float64 forward written from the checkpoint files alone (config.json
# + safetensors, no transformers), following the maths in tools/README.md. It must reproduce
# ref.safetensors; so the README's description of each family is checked, and this is the
# executable spec of what the C forward computes.
# ----------------------------------------------------------------------------------------------

def read_checkpoint(d):
    """(config dict, {name: float64 tensor}) with FP8 weights dequantised."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    raw = {}
    for fn in files:
        raw.update(load_file(os.path.join(d, fn)))
    qc = cfg.get("quantization_config")
    w = {}
    for n, t in raw.items():
        if n.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = fp8_block_dequant(t, raw[n + "_scale_inv"], qc["weight_block_size"][0])
        w[n] = t.double()
    return cfg, w


def rope_params(cfg):
    """Rope dict from either v5 rope_parameters or the hub's rope_theta + rope_scaling."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def yarn_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_tables(rp, dim, n_pos):
    """cos, sin [n_pos, dim/2] (already multiplied by yarn's attention factor)."""
    base = rp["rope_theta"]
    i = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv = base ** -i
    af = 1.0
    if rp["rope_type"] == "yarn":
        f, orig = rp["factor"], rp["original_max_position_embeddings"]
        bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1
        cdim = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = cdim(bf), cdim(bs)
        if rp.get("truncate", True):                              # gpt-oss: truncate false
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        inv = (inv / f) * ramp + inv * (1 - ramp)
        m, mad = rp.get("mscale"), rp.get("mscale_all_dim")
        af = yarn_mscale(f, m) / yarn_mscale(f, mad) if (m and mad) else yarn_mscale(f)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos() * af, ang.sin() * af


def rope_half(x, cos, sin):
    """rotate_half layout on the first 2*len(cos) dims of x [L, H, d]; the rest passes."""
    r = cos.shape[1]
    a, b, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([a * c - b * s, b * c + a * s, rest], -1)


def rope_pairs(x, cos, sin):
    """Adjacent-pair layout (x0,x1),(x2,x3)... rotated in place (DeepSeek)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
    return out


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def lin(w, p, x):
    y = x @ w[p + ".weight"].T
    return y + w[p + ".bias"] if p + ".bias" in w else y


def attention(q, k, v, scale, allow=None):
    """q [L,H,dk], k [L,H,dk], v [L,H,dv] (kv heads already expanded); causal, and only the
    key positions allow [L,L] marks where given (sparse attention)."""
    L = q.shape[0]
    sc = torch.einsum("qhd,khd->hqk", q, k) * scale
    masked = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    if allow is not None:
        masked = masked | ~allow
    sc = sc.masked_fill(masked, -math.inf)
    return torch.einsum("hqk,khd->qhd", sc.softmax(-1), v).reshape(L, -1)


def dsa_select(cfg, w, p, x, qres, cos, sin, st):
    """DeepSeek sparse attention's indexer: allow [L,L], each query's index_topk best causal
    positions by sum_h w_h relu(q_h . k / sqrt(d)); a GLM-5 "shared" layer (no indexer
    weights) reuses the previous layer's choice, kept in st."""
    if p + "indexer.wk.weight" not in w:
        return st["allow"]
    L, ih, dim, dr = x.shape[0], cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    rope = rope_pairs if cfg["model_type"] == "glm_moe_dsa" else rope_half
    q = lin(w, p + "indexer.wq_b", qres).view(L, ih, dim)
    k = torch.nn.functional.layer_norm(lin(w, p + "indexer.wk", x), (dim,), w[p + "indexer.k_norm.weight"],
                                       w[p + "indexer.k_norm.bias"], 1e-6).view(L, 1, dim)
    q = torch.cat([rope(q[..., :dr], cos, sin), q[..., dr:]], -1)
    k = torch.cat([rope(k[..., :dr], cos, sin), k[..., dr:]], -1)[:, 0]
    sc = torch.einsum("qhd,kd->qhk", q, k).mul(dim ** -0.5).relu()
    sc = torch.einsum("qh,qhk->qk", lin(w, p + "indexer.weights_proj", x) * ih ** -0.5, sc)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    top = sc.masked_fill(~causal, -math.inf).topk(min(cfg["index_topk"], L), -1).indices
    st["allow"] = torch.zeros(L, L, dtype=torch.bool).scatter_(1, top, True) & causal
    return st["allow"]


def gdn_block(cfg, w, p, x, eps):
    """Gated DeltaNet (Qwen3.5-MoE / Qwen3-Next linear attention), token by token in float64."""
    L, Hk, Hv = x.shape[0], cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, r = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], Hv // Hk
    if p + "in_proj_qkvz.weight" in w:                            # Qwen3-Next: grouped per key head
        qkvz = lin(w, p + "in_proj_qkvz", x).view(L, Hk, -1)
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], -1)
        b, a = lin(w, p + "in_proj_ba", x).view(L, Hk, -1).split([r, r], -1)
        qkv = torch.cat([q.reshape(L, -1), k.reshape(L, -1), v.reshape(L, -1)], -1)
        z, b, a = z.reshape(L, Hv, dv), b.reshape(L, Hv), a.reshape(L, Hv)
    else:
        qkv = lin(w, p + "in_proj_qkv", x)
        z = lin(w, p + "in_proj_z", x).view(L, Hv, dv)
        b, a = lin(w, p + "in_proj_b", x), lin(w, p + "in_proj_a", x)
    cw = w[p + "conv1d.weight"][:, 0, :]                          # [C, K], causal depthwise
    K = cw.shape[1]
    padded = torch.cat([torch.zeros(K - 1, qkv.shape[1], dtype=qkv.dtype), qkv])
    y = torch.stack([(padded[t:t + K] * cw.T).sum(0) for t in range(L)])
    y = torch.nn.functional.silu(y)
    kd = Hk * dk
    l2 = lambda u: u / torch.sqrt((u * u).sum(-1, keepdim=True) + 1e-6)
    q = (l2(y[:, :kd].view(L, Hk, dk)) / math.sqrt(dk)).repeat_interleave(r, 1)
    k = l2(y[:, kd:2 * kd].view(L, Hk, dk)).repeat_interleave(r, 1)
    v = y[:, 2 * kd:].view(L, Hv, dv)
    beta = torch.sigmoid(b)
    g = -w[p + "A_log"].exp() * torch.nn.functional.softplus(a + w[p + "dt_bias"])
    S = torch.zeros(Hv, dk, dv, dtype=x.dtype)
    o = torch.empty(L, Hv, dv, dtype=x.dtype)
    for t in range(L):
        S = S * g[t].exp()[:, None, None]
        delta = (v[t] - torch.einsum("hij,hi->hj", S, k[t])) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        o[t] = torch.einsum("hij,hi->hj", S, q[t])
    o = rms(o, w[p + "norm.weight"], eps) * torch.nn.functional.silu(z)
    return lin(w, p + "out_proj", o.reshape(L, -1))


def attention_sinks(q, k, v, scale, sinks, window):
    """gpt-oss: causal attention (within `window` positions if set) whose softmax also holds one
    sink logit per head, which is then dropped."""
    L = q.shape[0]
    sc = torch.einsum("qhd,khd->hqk", q, k) * scale
    i = torch.arange(L)
    masked = i[None, :] > i[:, None]
    if window:
        masked = masked | (i[:, None] - i[None, :] >= window)
    sc = sc.masked_fill(masked, -math.inf)
    sc = torch.cat([sc, sinks.view(-1, 1, 1).expand(-1, L, 1)], -1).softmax(-1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", sc, v).reshape(L, -1)


def attn_block(cfg, w, p, x, eps, rp, st=None):
    L = x.shape[0]
    H = cfg["num_attention_heads"]
    if "kv_lora_rank" in cfg:                                     # MLA: DeepSeek V2 / V3
        dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        if cfg.get("q_lora_rank") is None:
            q = lin(w, p + "q_proj", x)
        else:
            qres = rms(lin(w, p + "q_a_proj", x), w[p + "q_a_layernorm.weight"], 1e-6)
            q = lin(w, p + "q_b_proj", qres)
        q = q.view(L, H, dn + dr)
        ckv = lin(w, p + "kv_a_proj_with_mqa", x)
        c, kpe = ckv[:, :cfg["kv_lora_rank"]], ckv[:, cfg["kv_lora_rank"]:]
        kv = lin(w, p + "kv_b_proj", rms(c, w[p + "kv_a_layernorm.weight"], 1e-6)).view(L, H, dn + dv)
        cos, sin = rope_tables(rp, dr, L)
        qpe = rope_pairs(q[..., dn:], cos, sin)
        kpe = rope_pairs(kpe.view(L, 1, dr), cos, sin).expand(L, H, dr)
        scale = (dn + dr) ** -0.5
        if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
            scale *= yarn_mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
        allow = dsa_select(cfg, w, p, x, qres, cos, sin, st) if "index_topk" in cfg else None
        o = attention(torch.cat([q[..., :dn], qpe], -1), torch.cat([kv[..., :dn], kpe], -1),
                      kv[..., dn:], scale, allow)
        return lin(w, p + "o_proj", o)
    KV = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    gate = None
    if cfg["model_type"] in ZERO_CENTRED:                         # [q | gate] per head
        q, gate = lin(w, p + "q_proj", x).view(L, H, 2 * hd).split([hd, hd], -1)
    else:
        q = lin(w, p + "q_proj", x).view(L, H, hd)
    k = lin(w, p + "k_proj", x).view(L, KV, hd)
    v = lin(w, p + "v_proj", x).view(L, KV, hd)
    if p + "q_norm.weight" in w:                                  # Qwen3, GLM use_qk_norm
        c = 1.0 if cfg["model_type"] in ZERO_CENTRED else 0.0
        q, k = rms(q, c + w[p + "q_norm.weight"], eps), rms(k, c + w[p + "k_norm.weight"], eps)
    rdim = int(hd * rp.get("partial_rotary_factor", 1.0))
    cos, sin = rope_tables(rp, rdim, L)
    q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
    rep = H // KV
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if p + "sinks" in w:                                          # gpt-oss
        layer = int(p.split(".")[2])
        window = cfg["sliding_window"] if cfg["layer_types"][layer] == "sliding_attention" else 0
        return lin(w, p + "o_proj", attention_sinks(q, k, v, hd ** -0.5, w[p + "sinks"], window))
    if gate is not None:
        return lin(w, p + "o_proj", attention(q, k, v, hd ** -0.5) * torch.sigmoid(gate.reshape(L, -1)))
    return lin(w, p + "o_proj", attention(q, k, v, hd ** -0.5))


def mlp(w, p, x, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return lin(w, p + d, torch.nn.functional.silu(lin(w, p + g, x)) * lin(w, p + u, x))


def route(cfg, logits, bias):
    """(weights [L,k], ids [L,k]) for one MoE layer."""
    mt, k = cfg["model_type"], cfg["num_experts_per_tok"]
    if mt in ("deepseek_v3", "glm4_moe", "deepseek_v32", "glm_moe_dsa"):                         # sigmoid + bias, noaux_tc
        s = logits.sigmoid()
        c = s + bias
        ng, tg = cfg["n_group"], cfg["topk_group"]
        g = c.view(len(c), ng, -1).topk(2, -1).values.sum(-1)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(tg, -1).indices, True)
        ids = c.masked_fill(~keep.repeat_interleave(c.shape[1] // ng, 1), -math.inf).topk(k, -1).indices
        wt = s.gather(1, ids)
        if cfg["norm_topk_prob"]:
            wt = wt / (wt.sum(-1, keepdim=True) + 1e-20)
        return wt * cfg["routed_scaling_factor"], ids
    p = logits.softmax(-1)
    if mt == "deepseek_v2":
        if cfg.get("topk_method") == "group_limited_greedy":
            ng, tg = cfg["n_group"], cfg["topk_group"]
            g = p.view(len(p), ng, -1).max(-1).values
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(tg, -1).indices, True)
            p = p.masked_fill(~keep.repeat_interleave(p.shape[1] // ng, 1), 0.0)
        wt, ids = p.topk(k, -1)
        return wt * cfg["routed_scaling_factor"], ids            # no renormalisation in V2
    wt, ids = p.topk(k, -1)
    if mt in ("mixtral", "qwen3_5_moe_text") or cfg.get("norm_topk_prob"):
        wt = wt / wt.sum(-1, keepdim=True)
    return wt, ids


def moe_block_oss(cfg, w, p, x):
    """gpt-oss: biased router, softmax over the top-k logits, experts stored [E][in][out] with
    biases, gate/up interleaved, clamped SwiGLU."""
    p = p + "mlp."
    top, ids = lin(w, p + "router", x).topk(cfg["num_experts_per_tok"], -1)
    wt = top.softmax(-1)
    lim, alpha = cfg["swiglu_limit"], cfg.get("swiglu_alpha", 1.702)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j].item()
            gu = x[t] @ w[p + "experts.gate_up_proj"][e] + w[p + "experts.gate_up_proj_bias"][e]
            g, u = gu[::2].clamp(max=lim), gu[1::2].clamp(-lim, lim)
            act = (u + 1) * g * torch.sigmoid(g * alpha)
            out[t] += wt[t, j] * (act @ w[p + "experts.down_proj"][e] + w[p + "experts.down_proj_bias"][e])
    return out


def moe_block(cfg, w, p, x):
    mt = cfg["model_type"]
    if mt == "gpt_oss":
        return moe_block_oss(cfg, w, p, x)
    if mt == "mixtral":
        p, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        p, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
    wt, ids = route(cfg, x @ w[p + "gate.weight"].T, w.get(p + "gate.e_score_correction_bias"))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += wt[t, j] * mlp(w, f"{p}experts.{ids[t, j].item()}.", x[t:t + 1], names)[0]
    if mt in ("qwen2_moe", "qwen3_5_moe_text", "qwen3_next"):
        out += torch.sigmoid(x @ w[p + "shared_expert_gate.weight"].T) * mlp(w, p + "shared_expert.", x)
    elif p + "shared_experts.gate_proj.weight" in w:
        out += mlp(w, p + "shared_experts.", x)
    return out


def is_dense(cfg, layer):
    if "first_k_dense_replace" in cfg:
        return layer < cfg["first_k_dense_replace"]
    if cfg["model_type"] == "mixtral":
        return False
    return layer in cfg.get("mlp_only_layers", []) or (layer + 1) % cfg.get("decoder_sparse_step", 1) != 0


ZERO_CENTRED = ("qwen3_5_moe_text", "qwen3_next")   # RMSNorm weights stored as w - 1


def independent_forward(cfg, w, tokens):
    eps, rp = cfg["rms_norm_eps"], rope_params(cfg)
    x = w["model.embed_tokens.weight"][tokens.long()]
    st = {}
    c = 1.0 if cfg["model_type"] in ZERO_CENTRED else 0.0        # RMSNorm scale 1 + w
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, c + w[p + "input_layernorm.weight"], eps)
        if cfg.get("layer_types") and cfg["layer_types"][l] == "linear_attention":
            x = x + gdn_block(cfg, w, p + "linear_attn.", h, eps)
        else:
            x = x + attn_block(cfg, w, p + "self_attn.", h, eps, rp, st)
        h = rms(x, c + w[p + "post_attention_layernorm.weight"], eps)
        x = x + (mlp(w, p + "mlp.", h) if is_dense(cfg, l) else moe_block(cfg, w, p, h))
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return rms(x, c + w["model.norm.weight"], eps) @ head.T


def self_check(root, names):
    """Check the ref.safetensors contract and reproduce it with independent_forward."""
    bad = 0
    for name in names:
        d = os.path.join(root, name)
        ref = load_file(os.path.join(d, "ref.safetensors"))
        cfg, w = read_checkpoint(d)
        V = cfg["vocab_size"]
        problems = []
        for k, t in ref.items():
            want = torch.int32 if k.endswith(("tokens", "lens")) else torch.float32
            if t.dtype != want:
                problems.append(f"{k} is {t.dtype}")
        T, D = len(ref["prefill_tokens"]), len(ref["decode_tokens"])
        if T < 16 or D < 8 or ref["prefill_logits"].shape != (T, V) or ref["decode_logits"].shape != (D, V):
            problems.append("prefill/decode shapes")
        worst = 0.0
        seqs = [(torch.cat([ref["prefill_tokens"], ref["decode_tokens"]]),
                 torch.cat([ref["prefill_logits"], ref["decode_logits"]]), T)]
        for s, plen in zip("ab", ref["batch_prompt_lens"].tolist()):
            seqs.append((ref[f"batch_{s}_tokens"], ref[f"batch_{s}_logits"], plen))
        for toks, logits, plen in seqs:
            if logits.shape != (len(toks), V):
                problems.append("batch shapes")
                continue
            if not torch.equal(logits[plen - 1:-1].argmax(-1).int(), toks[plen:]):
                problems.append("decode tokens are not the greedy continuation")
            l64 = independent_forward(cfg, w, toks)
            worst = max(worst, ((l64 - logits.double()).abs().max() / logits.abs().max()).item())
        if worst > 1e-5:
            problems.append(f"independent forward differs by {worst:.1e} of max|logit|")
        print(f"  self-check {name:<18} independent f64 forward vs ref: {worst:.1e}  "
              f"{'; '.join(problems) or 'ok'}", flush=True)
        bad += bool(problems)
    return bad


# ----------------------------------------------------------------------------------------------

def publish(tmp, dst):
    """Move a finished fixture folder into place (replacing an old one), readable by all."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.move(tmp, dst)
    os.chmod(dst, 0o755)
    for f in os.listdir(dst):
        os.chmod(os.path.join(dst, f), 0o644)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def weight_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.startswith("model") and f.endswith(".safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="fixture root (default %(default)s)")
    ap.add_argument("--only", nargs="*", choices=ALL_NAMES, help="build only these fixtures")
    ap.add_argument("--check", action="store_true",
                    help="only verify existing fixtures with the independent forward")
    ap.add_argument("--max-seeds", type=int, default=200)
    ap.add_argument("--min-top1-gap", type=float, default=1e-3,
                    help="smallest accepted top1-top2 logit gap / max|logit|")
    ap.add_argument("--min-route-margin", type=float, default=1e-3,
                    help="smallest accepted routing margin (router units)")
    args = ap.parse_args()

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)          # same reduction order on every machine
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    names = args.only or ALL_NAMES
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    if args.check:
        sys.exit(1 if self_check(args.out, names) else 0)
    stats = {}
    for name in names:
        if name == "deepseek_v3_fp8":
            continue
        stats[name] = build_fixture(name, FAMILIES[name], args.out, args)
    if "deepseek_v3_fp8" in names:
        if not os.path.exists(os.path.join(args.out, "deepseek_v3", "ref.safetensors")):
            sys.exit("deepseek_v3_fp8 needs tests/fixtures/deepseek_v3: build it first")
        write_fp8_fixture(args.out)

    print()
    hdr = (f"{'fixture':<18} {'params':>8} {'weights':>9} {'ref':>8} {'seed':>5} {'logit std':>9} "
           f"{'noise_f64':>9} {'min top1 gap':>12} {'min route margin':>16}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        d = os.path.join(args.out, name)
        st = stats.get(name) or stats.get("deepseek_v3")
        if st is None:
            with safe_open(os.path.join(d, "ref.safetensors"), "pt") as f:
                nz = f.get_tensor("noise_f64").item()
            print(f"{name:<18} {'':>8} {weight_size(d):>9} {dir_size(d) - weight_size(d):>8} "
                  f"{'':>5} {'':>9} {nz:>9.1e}")
            continue
        print(f"{name:<18} {st['params']:>8} {weight_size(d):>9} "
              f"{os.path.getsize(os.path.join(d, 'ref.safetensors')):>8} {st['seed']:>5} "
              f"{st['logit_std']:>9.2f} {st['noise']:>9.1e} {st['top1_gap']:>12.1e} "
              f"{st['route_margin']:>16.1e}")
    for name, st in stats.items():
        if "bias_effect" in st:
            print(f"{name}: dropping e_score_correction_bias moves logits by "
                  f"{st['bias_effect']:.2f} of max|logit|")
    total = sum(dir_size(os.path.join(args.out, n)) for n in names)
    print(f"total size of these fixtures: {total / 1e6:.2f} MB")
    print()
    if self_check(args.out, names):
        sys.exit("self-check failed: see above")


if __name__ == "__main__":
    main()
