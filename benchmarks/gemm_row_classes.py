"""The decode GEMM's row classes on the GPU, alone: for each of a layer's products (e4m3 weights, cold in L2 as
in a step), µs at 16–512 rows with the small class's configuration (16-row tiles, what M <= 16 runs) and with the
larger class's (what 17–1024 rows run), each with the grid's row tiles outermost (today) or innermost
(``M_FIRST``: the row tiles of a weight tile are neighbours, so the tile is read from memory once), against bf16
cuBLAS. The small class's configuration gives each row the same bits at any row count; that is checked here.
JSON on stdout.

    PYTHONPATH=. python benchmarks/gemm_row_classes.py [--rows 16,32,64,128,256,512]
"""

from __future__ import annotations

import argparse
import json

import torch

from dspark_compile.models.layers import quantize_fp8
from dspark_compile.targets.torch import decode_gemm
from dspark_compile.targets.torch.bench import QWEN3_8B, byte_floor_ms, measure_copy_bandwidth
from dspark_compile.targets.torch.decode_gemm import CUBLAS, DecodeWeight, _config, candidate_ms, decode_linear


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,32,64,128,256,512")
    args = ap.parse_args()
    s = QWEN3_8B
    h, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * s.intermediate_size, h),
              "down": (h, s.intermediate_size)}
    bandwidth = measure_copy_bandwidth("cuda")
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth / 1e9}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, scale = quantize_fp8(w)
        fw = DecodeWeight.of(qw, scale, 0, None)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in map(int, args.rows.split(","))}
        small, large = _config(xs[16], fw), _config(torch.randn(64, k, device="cuda", dtype=torch.bfloat16), fw)
        row: dict[str, object] = {"small_cfg": small, "large_cfg": large,
                                  "floor_us": byte_floor_ms(n * k, bandwidth) * 1e3}
        for m, x in xs.items():
            cell = {"bf16_cublas": candidate_ms(x, DecodeWeight.full(w), CUBLAS) * 1e3}
            for first in (False, True):
                decode_gemm.M_FIRST = first
                tag = "m_first" if first else "today"
                cell[f"small_{tag}"] = candidate_ms(x, fw, small) * 1e3
                if m > 16:
                    cell[f"large_{tag}"] = candidate_ms(x, fw, large) * 1e3
                full = decode_linear(x, fw, small)
                cell[f"small_{tag}_rows_same_bits"] = bool(torch.equal(full[:16], decode_linear(x[:16], fw, small))
                                                          and torch.equal(full[:1], decode_linear(x[:1], fw, small)))
            decode_gemm.M_FIRST = False
            row[f"m{m}"] = {key: round(v, 2) if isinstance(v, float) else v for key, v in cell.items()}
        out[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
