"""ctypes bindings of libtandem.so (include/tandem.h, include/tandem_moe.h).

The library is found, in order: $TANDEM_LIB (a path to libtandem.so), the
copy installed inside this package by `pip install .`, build/libtandem.so of
the source tree this file sits in (development). Only what the package uses
is declared; the structs mirror the C headers field for field.
"""
import ctypes
import os

_here = os.path.dirname(os.path.abspath(__file__))


def _find():
    env = os.environ.get("TANDEM_LIB")
    cands = [env] if env else []
    cands += [os.path.join(_here, "libtandem.so.0"),
              os.path.join(_here, "..", "..", "build", "libtandem.so")]
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise OSError("libtandem.so not found (set TANDEM_LIB, or `pip install .` from the tandem repository)")


lib = ctypes.CDLL(_find())

c_int, c_void_p, c_char_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t


class MoeParams(ctypes.Structure):
    _fields_ = [("n_expert", c_int), ("d_model", c_int), ("d_ff", c_int),
                ("top_k", c_int), ("max_tokens", c_int), ("max_deferred", c_int),
                ("format", c_int), ("src_dtype", c_int),
                ("gate", c_void_p), ("up", c_void_p), ("down", c_void_p),
                ("gate_ptrs", c_void_p), ("up_ptrs", c_void_p), ("down_ptrs", c_void_p),
                ("gate_scale", c_void_p), ("up_scale", c_void_p), ("down_scale", c_void_p),
                ("block_n", c_int), ("block_k", c_int),
                ("held", c_void_p),
                ("n_threads", c_int), ("n_numa", c_int), ("isa", c_int),
                ("int8_group", c_int), ("amx_min", c_int), ("tune", c_char_p)]


class MoeInfo(ctypes.Structure):
    _fields_ = [("n_expert", c_int), ("d_model", c_int), ("d_ff", c_int), ("format", c_int),
                ("n_held", c_int), ("isa", c_int), ("n_threads", c_int), ("n_numa", c_int),
                ("top_k", c_int), ("max_tokens", c_int), ("max_deferred", c_int),
                ("expert_bytes", ctypes.c_int64)]


class MoeBatch(ctypes.Structure):
    _fields_ = [("n_tokens", c_int), ("top_k", c_int),
                ("ids", c_void_p), ("weights", c_void_p), ("x", c_void_p), ("x_dtype", c_int),
                ("out", c_void_p), ("n_deferred", c_int), ("out_deferred", c_void_p)]


def _fn(name, res, *args):
    f = getattr(lib, name)
    f.restype = res
    f.argtypes = list(args)
    return f


P = ctypes.POINTER
version = _fn("tandem_version", c_char_p)
version_number = _fn("tandem_version_number", c_int)
LOG_FN = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)
set_log = _fn("tandem_set_log", None, LOG_FN, c_void_p)
set_log_level = _fn("tandem_set_log_level", None, c_int)
moe_params_default = _fn("tandem_moe_params_default", None, P(MoeParams))
moe_create = _fn("tandem_moe_create", c_int, P(MoeParams), P(c_void_p), c_char_p, c_size_t)
moe_open = _fn("tandem_moe_open", c_int, c_char_p, P(MoeParams), P(c_void_p), c_char_p, c_size_t)
moe_save = _fn("tandem_moe_save", c_int, c_void_p, c_char_p, c_char_p, c_size_t)
moe_free = _fn("tandem_moe_free", None, c_void_p)
moe_get_info = _fn("tandem_moe_get_info", None, c_void_p, P(MoeInfo))
moe_holds = _fn("tandem_moe_holds", c_int, c_void_p, c_int)
moe_set_held = _fn("tandem_moe_set_held", c_int, c_void_p, c_void_p, c_char_p, c_size_t)
moe_forward = _fn("tandem_moe_forward", c_int, c_void_p, P(MoeBatch), c_char_p, c_size_t)
moe_submit = _fn("tandem_moe_submit", c_int, c_void_p, P(MoeBatch), c_char_p, c_size_t)
moe_sync = _fn("tandem_moe_sync", c_int, c_void_p, c_char_p, c_size_t)

# constants of tandem_moe.h
FMT = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3}
DT_BF16, DT_F32, DT_F16, DT_FP8 = 0, 1, 2, 3
ISA = {"auto": -1, "ref": 0, "avx2": 1, "avx512": 2, "amx": 3}
ISA_NAME = {v: k for k, v in ISA.items()}


class TandemError(RuntimeError):
    """A call into libtandem failed; the message is the library's."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code
