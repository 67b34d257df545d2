"""tandem.kt: the interface SGLang's KT hook expects of kt_kernel.KTMoEWrapper,
on tandem's operator, so SGLang runs its CPU experts on tandem by swapping
one import (README, "SGLang").

What SGLang's hook (python/sglang/srt/layers/moe/kt_ep_wrapper.py) does with
the wrapper, and what this class does for it:
  - constructs one per MoE layer with keyword arguments (layer_idx,
    num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
    gpu_experts_mask or num_gpu_experts, cpuinfer_threads, threadpool_count,
    weight_path, chunked_prefill_size, method, max_deferred_experts_per_token;
    newer ones pass more, which are accepted and ignored);
  - load_weights(physical_to_logical_map): the layer's experts are read from
    the safetensors of weight_path (Hugging Face names), those the GPU mask
    does not claim are packed in the method's format;
  - submit_forward(hidden_states, topk_ids, topk_weights, cuda_stream) before
    the GPU experts run; sync_forward(hidden_states, cuda_stream) after, which
    returns the CPU experts' sum in hidden_states' dtype and device.
Deferral follows kt_kernel: with max_deferred_experts_per_token = d, each
token's d lowest-weight CPU experts of layer l are computed in the same pass
but returned by layer l + 1's sync_forward (added to its output); the last
layer (the hook passes d = 0 there) returns what is pending.
GPU tensors are copied to CPU on the caller's stream (blocking), since the
operator reads host memory; the copy back is the same.
"""
import json
import os
import struct

import numpy as np

try:
    import torch
except ImportError:
    torch = None

from .moe import MoE

_METHOD_FORMAT = {"BF16": "bf16", "AMXBF16": "bf16", "AMXINT8": "int8", "INT8": "int8", "AMXINT4": "int4",
                  "INT4": "int4", "RAWINT4": "int4", "FP8": "fp8", "LLAMAFILE": "int4", "MOE_INT4": "int4",
                  "MOE_INT8": "int8"}


def generate_gpu_experts_masks(activation_freq, num_gpu_experts):
    """Bool [num_layers, num_experts]: the num_gpu_experts most activated experts over all layers."""
    freq = activation_freq.detach().to("cpu").reshape(-1).float()
    mask = torch.zeros(freq.numel(), dtype=torch.bool)
    if num_gpu_experts > 0:
        mask[torch.topk(freq, k=int(num_gpu_experts)).indices] = True
    return mask.view(activation_freq.shape)


def _safetensors_index(path):
    """{tensor name: (file, dtype, shape, byte offset)} of a checkpoint directory or file."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    idx = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            hdr = json.loads(fh.read(n))
        for name, t in hdr.items():
            if name != "__metadata__":
                idx[name] = (f, t["dtype"], t["shape"], 8 + n + t["data_offsets"][0])
    return idx


def _read(idx, name):
    f, dt, shape, off = idx[name]
    np_dt = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}.get(dt)
    if np_dt is None:
        raise ValueError(f"{name}: dtype {dt} (tandem.kt reads BF16, F16 and F32 experts)")
    a = np.memmap(f, dtype=np_dt, mode="r", offset=off, shape=tuple(shape))
    return a, dt


class KTMoEWrapper:
    # deferred outputs waiting for the next layer's sync, shared by every layer as in kt_kernel
    _pending = {}

    def __init__(self, layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
                 gpu_experts_mask=None, cpuinfer_threads=None, threadpool_count=1, weight_path="",
                 chunked_prefill_size=512, method="BF16", max_deferred_experts_per_token=0, num_gpu_experts=None,
                 numa_nodes=None, **ignored):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        if gpu_experts_mask is None:
            gpu_experts_mask = torch.zeros(num_experts, dtype=torch.bool)
            if num_gpu_experts:
                gpu_experts_mask[:num_gpu_experts] = True  # the older interface: experts 0..n-1 on the GPU
        self.gpu_experts_mask = gpu_experts_mask.detach().to("cpu", torch.bool)
        self.cpuinfer_threads = cpuinfer_threads or 0
        self.threadpool_count = threadpool_count
        self.weight_path = weight_path
        self.chunked_prefill_size = chunked_prefill_size
        m = method.upper()
        if m not in _METHOD_FORMAT:
            raise ValueError(f"method {method!r}: tandem.kt takes {sorted(_METHOD_FORMAT)}")
        self.method = method
        self.format = _METHOD_FORMAT[m]
        self.max_deferred_experts_per_token = int(max_deferred_experts_per_token or 0)
        self.moe = None
        self._submitted = None

    # ---- weights ---------------------------------------------------------
    def load_weights_from_tensors(self, gate_proj, up_proj, down_proj, physical_to_logical_map_cpu=None):
        """gate/up: [num_experts, inter, hidden]; down: [num_experts, hidden, inter] (CPU tensors)."""
        gate, up, down = (self._physical(t, physical_to_logical_map_cpu) for t in (gate_proj, up_proj, down_proj))
        held = ~self.gpu_experts_mask
        self.moe = MoE(gate, up, down, format=self.format, top_k=self.num_experts_per_tok,
                       max_tokens=self.chunked_prefill_size, max_deferred=self.max_deferred_experts_per_token,
                       held=held, threads=self.cpuinfer_threads, numa=0)

    def _physical(self, t, p2l):
        t = t.detach().to("cpu").contiguous()
        if p2l is None or torch.equal(p2l.to("cpu", torch.int64), torch.arange(t.shape[0])):
            return t
        return t.index_select(0, p2l.to("cpu", torch.int64)).contiguous()

    def load_weights(self, physical_to_logical_map_cpu=None):
        """Read this layer's experts from weight_path (a Hugging Face checkpoint's safetensors)."""
        idx = _safetensors_index(self.weight_path)
        pre = None
        for cand in (f"model.layers.{self.layer_idx}.mlp.experts.", f"model.layers.{self.layer_idx}.block_sparse_moe.experts."):
            if cand + "0.gate_proj.weight" in idx or cand + "0.w1.weight" in idx:
                pre = cand
        if pre is None:
            raise KeyError(f"{self.weight_path}: no experts of layer {self.layer_idx}")
        names = ("gate_proj", "up_proj", "down_proj") if pre + "0.gate_proj.weight" in idx else ("w1", "w3", "w2")
        mats = []
        for nm in names:
            parts, dt = [], None
            for e in range(self.num_experts):
                a, dt = _read(idx, f"{pre}{e}.{nm}.weight")
                parts.append(a)
            arr = np.stack(parts)
            mats.append(torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if dt == "BF16"
                        else torch.from_numpy(np.ascontiguousarray(arr)))
        self.load_weights_from_tensors(*mats, physical_to_logical_map_cpu)

    # ---- forward ---------------------------------------------------------
    def submit_forward(self, hidden_states, topk_ids, topk_weights, cuda_stream=None):
        if self.moe is None:
            raise RuntimeError("KTMoEWrapper: load_weights first")
        x = hidden_states.reshape(-1, self.hidden_size)
        x = x.detach().to("cpu", torch.bfloat16).contiguous()
        ids = topk_ids.reshape(x.shape[0], -1).detach().to("cpu", torch.int32).contiguous()
        w = topk_weights.reshape(x.shape[0], -1).detach().to("cpu", torch.float32).contiguous()
        d = min(self.max_deferred_experts_per_token, ids.shape[1] - 1)
        self.moe.submit(x, ids, w, n_deferred=d)
        self._submitted = d

    def sync_forward(self, hidden_states, cuda_stream=None):
        if self._submitted is None:
            raise RuntimeError("KTMoEWrapper: sync_forward without submit_forward")
        d, self._submitted = self._submitted, None
        res = self.moe.sync()
        out, deferred = res if d else (res, None)
        prev = KTMoEWrapper._pending.pop(self.layer_idx - 1, None)
        if prev is not None and prev.shape == out.shape:
            out = out + prev
        if deferred is not None:
            KTMoEWrapper._pending[self.layer_idx] = deferred
        return out.to(hidden_states.dtype).reshape(hidden_states.shape).to(hidden_states.device)

    def forward(self, hidden_states, topk_ids, topk_weights, cuda_stream=None):
        self.submit_forward(hidden_states, topk_ids, topk_weights, cuda_stream)
        return self.sync_forward(hidden_states, cuda_stream)

    def update_gpu_experts_mask(self, mask):
        """New GPU placement: the CPU computes the experts the mask leaves it (among those packed)."""
        self.gpu_experts_mask = mask.detach().to("cpu", torch.bool)
        self.moe.set_held(~self.gpu_experts_mask)
