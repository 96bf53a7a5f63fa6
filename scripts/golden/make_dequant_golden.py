#!/usr/bin/env python3
"""Write worker/tests/golden/gguf/dequant.json: one pseudo-random block of each ggml type the
loader reads, with the values gguf-py's reference dequantizer (gguf.quants) gives for it.
Block scales are set to small finite f16 values so that every element is finite.

    .venv/bin/python scripts/golden/make_dequant_golden.py --out worker/tests/golden/gguf/dequant.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# (type, block bytes, byte offsets of f16 scales within the block)
TYPES = [
    (T.Q4_0, 18, [0]),
    (T.Q4_1, 20, [0, 2]),
    (T.Q8_0, 34, [0]),
    (T.Q4_K, 144, [0, 2]),
    (T.Q5_K, 176, [0, 2]),
    (T.Q6_K, 210, [208]),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(18)
    cases = []
    for ty, size, scales in TYPES:
        block = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        for off in scales:
            block[off : off + 2] = np.float16(rng.uniform(0.01, 0.5)).tobytes()
        values = quants.dequantize(np.frombuffer(bytes(block), dtype=np.uint8), ty)
        cases.append(
            {
                "type": ty.name,
                "id": int(ty.value),
                "block": bytes(block).hex(),
                "values": [float(f"{v:.7g}") for v in values.astype(np.float32).ravel()],
            }
        )
    args.out.write_text(json.dumps({"source": "gguf-py quants.dequantize", "cases": cases}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
