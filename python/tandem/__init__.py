"""tandem: the CPU Mixture-of-Experts operator of the tandem engine, from Python.

    import tandem
    moe = tandem.MoE(gate, up, down, format="int4", top_k=8, max_tokens=2048)
    out = moe(x, topk_ids, topk_weights)          # float32 [n_tokens, hidden]

tandem.kt.KTMoEWrapper has the interface SGLang's KT hook expects of
kt_kernel.KTMoEWrapper (README: "SGLang"). libtandem.so does the work; this
package only passes addresses (ctypes).
"""
from ._lib import TandemError
from . import _lib
from .moe import MoE

__version__ = _lib.version().decode()


def set_log(fn=None, level=None):
    """Route the library's log lines to fn(level: int, msg: str) (None: back to stderr);
    level: "error", "warn", "info" or "debug"."""
    global _log_cb
    if level is not None:
        _lib.set_log_level({"error": 0, "warn": 1, "info": 2, "debug": 3}[level])
    if fn is None:
        _log_cb = None
        _lib.set_log(_lib.LOG_FN(), None)
        return
    _log_cb = _lib.LOG_FN(lambda lv, msg, user: fn(lv, msg.decode(errors="replace")))
    _lib.set_log(_log_cb, None)


_log_cb = None
__all__ = ["MoE", "TandemError", "set_log", "__version__"]
