"""tandem.MoE: tandem's CPU Mixture-of-Experts operator on tensors.

Weights, activations and outputs are torch CPU tensors (pinned or not) or
numpy arrays, passed to the C operator by address: nothing is copied on the
way in or out when they are contiguous and of a dtype the operator reads
(activations bf16 or float32, ids int32, weights float32). Other dtypes are
converted first (a copy); see each argument. numpy has no bfloat16: a numpy
uint16 array is taken as raw bf16 bits.
"""
import ctypes

from . import _lib
from ._lib import TandemError

try:
    import torch
except ImportError:  # numpy arrays work without torch
    torch = None
import numpy as np


_TORCH_X = {torch.bfloat16: _lib.DT_BF16, torch.float32: _lib.DT_F32} if torch is not None else {}


def _is_torch(t):
    return torch is not None and isinstance(t, torch.Tensor)


def _dtype_code(t):
    if _is_torch(t):
        m = {torch.bfloat16: _lib.DT_BF16, torch.float32: _lib.DT_F32, torch.float16: _lib.DT_F16}
        f8 = getattr(torch, "float8_e4m3fn", None)
        if f8 is not None:
            m[f8] = _lib.DT_FP8
        if t.dtype not in m:
            raise TypeError(f"tensor dtype {t.dtype}: tandem takes bfloat16, float32, float16 or float8_e4m3fn")
        return m[t.dtype]
    m = {np.dtype(np.uint16): _lib.DT_BF16, np.dtype(np.float32): _lib.DT_F32, np.dtype(np.float16): _lib.DT_F16,
         np.dtype(np.uint8): _lib.DT_FP8}
    if t.dtype not in m:
        raise TypeError(f"array dtype {t.dtype}: tandem takes uint16 (bf16 bits), float32, float16 or uint8 (e4m3)")
    return m[t.dtype]


def _ptr(t):
    """Address of a contiguous CPU tensor or array (refused otherwise: a copy here would be hidden)."""
    if _is_torch(t):
        if t.device.type != "cpu":
            raise ValueError(f"tensor on {t.device}: tandem.MoE takes CPU tensors (copy to CPU first)")
        if not t.is_contiguous():
            raise ValueError("tensor is not contiguous")
        return t.data_ptr()
    if not t.flags.c_contiguous:
        raise ValueError("array is not C-contiguous")
    return t.ctypes.data


def _as_int32(t):
    if _is_torch(t):
        return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()
    return np.ascontiguousarray(t, dtype=np.int32)


def _as_f32(t):
    if _is_torch(t):
        return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
    return np.ascontiguousarray(t, dtype=np.float32)


def _empty_like_rows(x, n, d):
    if _is_torch(x):
        return torch.empty((n, d), dtype=torch.float32)
    return np.empty((n, d), dtype=np.float32)


class MoE:
    """One MoE layer's routed experts, packed once into `format`.

    gate, up: [n_expert, d_ff, d_model]; down: [n_expert, d_model, d_ff] (Hugging
    Face layout), bf16 / float32 / float16, or float8_e4m3fn with block scales
    (scales=(gate_scale, up_scale, down_scale) float32, block=(block_n, block_k)).
    The weights are copied into the packed format at construction and may be
    freed afterwards. tune: tile-kernel settings ("i4=0": exact INT4 on AMX;
    the keys of `tandem bench moe --tune`).

    held: bool mask [n_expert] of experts computed here (None = all); routed ids
    of other experts, and ids < 0, are skipped, so a host keeping some experts on
    the GPU passes its full top-k. max_deferred > 0 allows deferral (a second
    output); it doubles the scratch.
    """

    def __init__(self, gate, up, down, *, format="bf16", top_k=8, max_tokens=1, max_deferred=0, held=None,
                 threads=0, numa=0, isa="auto", int8_group=0, amx_min=0, scales=None, block=(128, 128),
                 tune=None, _handle=None):
        self._h = None
        self._err = ctypes.create_string_buffer(512)
        self._inflight = None
        if _handle is not None:
            self._h = _handle
        else:
            p = _lib.MoeParams()
            _lib.moe_params_default(ctypes.byref(p))
            if len(gate.shape) != 3 or tuple(up.shape) != tuple(gate.shape):
                raise ValueError("gate and up must be [n_expert, d_ff, d_model]")
            ne, dff, dm = (int(v) for v in gate.shape)
            if tuple(down.shape) != (ne, dm, dff):
                raise ValueError(f"down must be [n_expert, d_model, d_ff] = {(ne, dm, dff)}, got {tuple(down.shape)}")
            dt = _dtype_code(gate)
            if _dtype_code(up) != dt or _dtype_code(down) != dt:
                raise TypeError("gate, up and down must have one dtype")
            if format not in _lib.FMT:
                raise ValueError(f"format {format!r}: one of {sorted(_lib.FMT)}")
            p.n_expert, p.d_model, p.d_ff = ne, dm, dff
            p.top_k, p.max_tokens, p.max_deferred = top_k, max_tokens, max_deferred
            p.format, p.src_dtype = _lib.FMT[format], dt
            p.gate, p.up, p.down = _ptr(gate), _ptr(up), _ptr(down)
            keep = []
            if dt == _lib.DT_FP8:
                if scales is None:
                    raise ValueError("float8 weights need scales=(gate_scale, up_scale, down_scale)")
                sc = [_as_f32(s) for s in scales]
                keep += sc
                p.gate_scale, p.up_scale, p.down_scale = (_ptr(s) for s in sc)
                p.block_n, p.block_k = block
            if held is not None:
                hm = self._mask(held, ne)
                keep.append(hm)
                p.held = hm.ctypes.data
            p.n_threads, p.n_numa, p.int8_group, p.amx_min = threads, numa, int8_group, amx_min
            p.isa = _lib.ISA[isa]
            p.tune = tune.encode() if tune else None
            h = ctypes.c_void_p()
            rc = _lib.moe_create(ctypes.byref(p), ctypes.byref(h), self._err, 512)
            if rc:
                raise TandemError(rc, self._err.value.decode())
            self._h = h
        self._batch = _lib.MoeBatch()
        self._batch_ref = ctypes.byref(self._batch)
        self._refresh()

    @staticmethod
    def _mask(held, ne):
        if _is_torch(held):
            held = held.detach().to("cpu").numpy()
        hm = np.ascontiguousarray(np.asarray(held).astype(np.uint8))
        if hm.shape != (ne,):
            raise ValueError(f"held mask must have shape ({ne},), got {hm.shape}")
        return hm

    def _refresh(self):
        i = _lib.MoeInfo()
        _lib.moe_get_info(self._h, ctypes.byref(i))
        self.info = {f: getattr(i, f) for f, _ in _lib.MoeInfo._fields_}
        self.info["isa"] = _lib.ISA_NAME.get(i.isa, i.isa)
        self.info["format"] = {v: k for k, v in _lib.FMT.items()}[i.format]
        self.n_expert, self.d_model, self.d_ff = i.n_expert, i.d_model, i.d_ff
        self.top_k, self.max_tokens, self.max_deferred = i.top_k, i.max_tokens, i.max_deferred

    @classmethod
    def open(cls, path, *, top_k=8, max_tokens=1, max_deferred=0, held=None, threads=0, numa=0, isa="auto"):
        """An operator from a pack file (MoE.save, or a layer of `tandem convert`)."""
        p = _lib.MoeParams()
        _lib.moe_params_default(ctypes.byref(p))
        p.top_k, p.max_tokens, p.max_deferred = top_k, max_tokens, max_deferred
        p.n_threads, p.n_numa, p.isa = threads, numa, _lib.ISA[isa]
        err = ctypes.create_string_buffer(512)
        h = ctypes.c_void_p()
        rc = _lib.moe_open(str(path).encode(), ctypes.byref(p), ctypes.byref(h), err, 512)
        if rc:
            raise TandemError(rc, err.value.decode())
        m = cls(None, None, None, _handle=h)
        if held is not None:
            m.set_held(held)
        return m

    def save(self, path):
        rc = _lib.moe_save(self._h, str(path).encode(), self._err, 512)
        if rc:
            raise TandemError(rc, self._err.value.decode())

    def holds(self, e):
        return bool(_lib.moe_holds(self._h, int(e)))

    def set_held(self, held):
        """Change which packed experts are computed here (None = all packed)."""
        hm = None if held is None else self._mask(held, self.n_expert)
        rc = _lib.moe_set_held(self._h, None if hm is None else hm.ctypes.data, self._err, 512)
        if rc:
            raise TandemError(rc, self._err.value.decode())
        self._refresh()

    def _fill(self, x, ids, weights, out, n_deferred, out_deferred):
        """Point the reusable batch struct at the tensors; returns them (converted ones
        included) so the caller keeps them alive while the C side reads them."""
        if torch is not None and type(x) is torch.Tensor:
            return self._fill_torch(x, ids, weights, out, n_deferred, out_deferred)
        n = int(x.shape[0])
        if len(x.shape) != 2 or int(x.shape[1]) != self.d_model:
            raise ValueError(f"x must be [n_tokens, {self.d_model}], got {tuple(x.shape)}")
        ids, weights = _as_int32(ids), _as_f32(weights)
        if len(ids.shape) != 2 or int(ids.shape[0]) != n or tuple(weights.shape) != tuple(ids.shape):
            raise ValueError(f"ids and weights must be [n_tokens, top_k] with n_tokens = {n}")
        xd = _dtype_code(x)
        if xd not in (_lib.DT_BF16, _lib.DT_F32):
            x = x.astype(np.float32)
            xd = _lib.DT_F32
        if out is None:
            out = _empty_like_rows(x, n, self.d_model)
        if n_deferred and out_deferred is None:
            out_deferred = _empty_like_rows(x, n, self.d_model)
        b = self._batch
        b.n_tokens, b.top_k = n, int(ids.shape[1])
        b.ids, b.weights, b.x, b.x_dtype = _ptr(ids), _ptr(weights), _ptr(x), xd
        b.out, b.n_deferred = _ptr(out), n_deferred
        b.out_deferred = _ptr(out_deferred) if n_deferred else None
        return (x, ids, weights, out, out_deferred)

    def _fill_torch(self, x, ids, weights, out, n_deferred, out_deferred):
        # the per-call path of a host: only cheap attribute checks (each torch
        # property read costs a fraction of a microsecond, a dict built per call
        # or device.type several), no Python-side copies when dtypes are right
        if x.dim() != 2:
            raise ValueError(f"x must be [n_tokens, {self.d_model}], got {tuple(x.shape)}")
        n, h = x.shape
        if h != self.d_model:
            raise ValueError(f"x must be [n_tokens, {self.d_model}], got {tuple(x.shape)}")
        xd = _TORCH_X.get(x.dtype)
        if xd is None:
            x, xd = x.to(torch.bfloat16), _lib.DT_BF16
        if not (x.is_cpu and x.is_contiguous()):
            raise ValueError("x must be a contiguous CPU tensor (copy it to CPU first)")
        if ids.dtype is not torch.int32 or not ids.is_contiguous():
            ids = ids.to(torch.int32).contiguous()
        if weights.dtype is not torch.float32 or not weights.is_contiguous():
            weights = weights.to(torch.float32).contiguous()
        if ids.dim() != 2 or ids.shape[0] != n or weights.shape != ids.shape or not (ids.is_cpu and weights.is_cpu):
            raise ValueError(f"ids and weights must be CPU tensors [n_tokens, top_k] with n_tokens = {n}")
        if out is None:
            out = torch.empty((n, h), dtype=torch.float32)
        elif out.dtype is not torch.float32 or out.shape != x.shape or not (out.is_cpu and out.is_contiguous()):
            raise ValueError(f"out must be a contiguous float32 CPU tensor [{n}, {h}]")
        b = self._batch
        b.n_tokens = n
        b.top_k = ids.shape[1]
        b.ids = ids.data_ptr()
        b.weights = weights.data_ptr()
        b.x = x.data_ptr()
        b.x_dtype = xd
        b.out = out.data_ptr()
        b.n_deferred = n_deferred
        if n_deferred:
            if out_deferred is None:
                out_deferred = torch.empty((n, h), dtype=torch.float32)
            elif (out_deferred.dtype is not torch.float32 or out_deferred.shape != x.shape or
                  not (out_deferred.is_cpu and out_deferred.is_contiguous())):
                raise ValueError(f"out_deferred must be a contiguous float32 CPU tensor [{n}, {h}]")
            b.out_deferred = out_deferred.data_ptr()
        return (x, ids, weights, out, out_deferred)

    def forward(self, x, ids, weights, out=None, n_deferred=0, out_deferred=None):
        """out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) (float32 [n_tokens, d_model]).

        With n_deferred = d > 0 returns (out, out_deferred): each token's d held
        experts of lowest weight are summed into out_deferred instead."""
        keep = self._fill(x, ids, weights, out, n_deferred, out_deferred)
        rc = _lib.moe_forward(self._h, self._batch_ref, self._err, 512)
        if rc:
            raise TandemError(rc, self._err.value.decode())
        return (keep[3], keep[4]) if n_deferred else keep[3]

    __call__ = forward

    def submit(self, x, ids, weights, out=None, n_deferred=0, out_deferred=None):
        """Start forward on the operator's threads and return; sync() returns its result.
        The tensors are held (not copied) until then: do not write to them."""
        if self._inflight is not None:
            raise TandemError(-1, "moe: a batch was submitted and not synced yet")
        keep = self._fill(x, ids, weights, out, n_deferred, out_deferred)
        rc = _lib.moe_submit(self._h, self._batch_ref, self._err, 512)
        if rc:
            raise TandemError(rc, self._err.value.decode())
        self._inflight = (keep, n_deferred)

    def sync(self):
        if self._inflight is None:
            raise TandemError(-1, "moe: sync without a submitted batch")
        keep, nd = self._inflight
        self._inflight = None
        rc = _lib.moe_sync(self._h, self._err, 512)
        if rc:
            raise TandemError(rc, self._err.value.decode())
        return (keep[3], keep[4]) if nd else keep[3]

    def close(self):
        if self._h:
            _lib.moe_free(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
