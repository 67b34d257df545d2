#!/usr/bin/env python3
"""Build tests/fixtures/kimi_k25/: Kimi-K2.5's checkpoint layout around the deepseek_v3 fixture.

Role: Kimi-K2.5 (KimiK25ForConditionalGeneration) is a DeepSeek-V3 text model (Kimi-K2's) wrapped
with a vision tower: config.json holds the text model's fields under "text_config" next to a
"vision_config", and the weights are named language_model.model.* / language_model.lm_head.weight
beside vision_tower.* and mm_projector.*. tandem runs the text model only. The text model of this
fixture is tests/fixtures/deepseek_v3's, tensor for tensor (renamed, same bytes), so its logits are
deepseek_v3's transformers logits: ref.safetensors is a copy. The vision tensors are small random
placeholders that the loader must leave alone. tests/test_models.c picks the folder up like any
fixture.

No dependencies (safetensors is rewritten by hand: header renamed, data copied).
Run:  python3 tools/make_kimi_k25_fixture.py
"""
import json
import math
import os
import random
import shutil
import struct

SRC = "tests/fixtures/deepseek_v3"
DST = "tests/fixtures/kimi_k25"


def main():
    os.makedirs(DST, exist_ok=True)
    with open(os.path.join(SRC, "config.json")) as f:
        text = json.load(f)
    text["model_type"] = "kimi_k2"
    cfg = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"model_type": "moonvit", "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "patch_size": 2, "merge_kernel_size": [2, 2]},
        "media_placeholder_token_id": 3,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    with open(os.path.join(DST, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    with open(os.path.join(SRC, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        if name.startswith("model."):
            name = "language_model." + name
        elif name.startswith("lm_head."):
            name = "language_model." + name
        out[name] = t
    rng = random.Random(25)
    extra = bytearray()
    for name, shape in [("vision_tower.patch_embed.proj.weight", [8, 3, 2, 2]),
                        ("mm_projector.proj.0.weight", [64, 32])]:
        nbytes = 2 * math.prod(shape)
        out[name] = {"dtype": "BF16", "shape": shape,
                     "data_offsets": [len(data) + len(extra), len(data) + len(extra) + nbytes]}
        extra += bytes(rng.randrange(256) & 0x3F if i % 2 else 0 for i in range(nbytes))
    if meta is not None:
        out["__metadata__"] = meta
    hb = json.dumps(out, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(DST, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        f.write(data)
        f.write(extra)
    shutil.copy(os.path.join(SRC, "ref.safetensors"), os.path.join(DST, "ref.safetensors"))
    print(f"{DST}: {len(out)} tensors")


if __name__ == "__main__":
    main()
