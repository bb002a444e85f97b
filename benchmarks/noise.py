"""ZO noise generation speed: hosl's counter-based generator against torch.randn and the old
one-seeded-generator-per-row method, on a (49152 × 576) float32 embedding (SmolLM2's).

    python benchmarks/noise.py [--threads N] [--repeats R] [--out benchmarks/results]

Each figure is the minimum over `repeats` timed runs (interleaved, so load drifts hit every
method alike). Writes noise.json and noise.md under --out when given, with the machine, the
thread count and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from machine_info import machine

from hosl.zo.seeds import noise_for, row_noise, tensor_seed

VOCAB, DIM, ROWS = 49152, 576, 1000
NAME = "model.embed_tokens.weight"


def old_row_noise(param: torch.Tensor, seed: int, name: str, rows: torch.Tensor) -> torch.Tensor:
    """The previous method: one torch generator per row, seeded tensor_seed + row · stride."""
    base, stride, mask63 = tensor_seed(seed, name) & (2**63 - 1), 0x9E3779B97F4A7C15, 2**63 - 1
    gen = torch.Generator()
    out = torch.empty((len(rows), *param.shape[1:]))
    for i, row in enumerate(rows.tolist()):
        gen.manual_seed((base + row * stride) & mask63)
        torch.randn(param.shape[1:], generator=gen, out=out[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    param = torch.empty(1, 1).expand(VOCAB, DIM)  # only the shape is read
    rows = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(0))
    cases = {
        "torch.randn whole": lambda: torch.randn(VOCAB, DIM),
        "hosl whole": lambda: noise_for(param, 1, NAME),
        "hosl 1000 rows": lambda: row_noise(param, 1, NAME, rows),
        "old per-row 1000 rows": lambda: old_row_noise(param, 1, NAME, rows),
    }
    load_start = os.getloadavg()
    best = {name: float("inf") for name in cases}
    for fn in cases.values():
        fn()  # warm up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    result = {
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "repeats": args.repeats,
        "shape": [VOCAB, DIM],
        "rows": ROWS,
        "seconds": best,
        "ratios": {
            "hosl whole / torch.randn whole": best["hosl whole"] / best["torch.randn whole"],
            "old per-row / hosl, 1000 rows": best["old per-row 1000 rows"] / best["hosl 1000 rows"],
        },
    }
    lines = [f"| method | best of {args.repeats} (ms) |", "|---|---:|"]
    lines += [f"| {name} | {sec * 1e3:.1f} |" for name, sec in best.items()]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    m = result["machine"]
    header = (f"# ZO noise generation, ({VOCAB} × {DIM}) float32\n\n"
              f"{m['cpu']}, {m['cores']} cores, "
              f"torch {m['torch']}, {m['threads']} torch thread(s); load average "
              f"{load_start[0]:.2f} at start, {result['load_average_end'][0]:.2f} at end.\n")
    table = "\n".join(lines)
    print(header + "\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "noise.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "noise.md").write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
