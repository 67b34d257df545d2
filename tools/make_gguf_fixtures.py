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
from gguf import GGUFValueType as V

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
    w.add_key_value("test.arr_u8", [7, 8, 9], V.ARRAY, sub_type=V.UINT8)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", action="store_true", help="only the quant and split fixtures")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(1234)
    write_quants(rng)
    write_split(rng)
    if a.quants:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
