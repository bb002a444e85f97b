"""ZO noise generation speed: hosl's counter-based generator (its compiled CPU loops, and the
tensor operations that run without numba: the same bits) against torch.randn and the old
one-seeded-generator-per-row method, on a (49152 × 576) float32 embedding (SmolLM2's).

    python benchmarks/noise.py [--threads 1 2] [--repeats R] [--out benchmarks/results]
    python benchmarks/noise.py --step-split 24 [--step-repeats 6] [--out benchmarks/results]

Each figure is the minimum over `repeats` timed runs, interleaved across methods and thread
counts, so load drifts hit every cell alike. The default thread counts are 1 and this machine's
torch default. Writes noise.json and noise.md under --out when given, with the machine, the
thread count and the load average at the start and the end.

`--step-split K`: instead, what the compiled loops buy a real training step. SmolLM2-135M split at
k = K, one `hosl` run (`cut-grad`, Q = 1, row-sparse embedding noise, batches of 16 × 64 synthetic
tokens), its steps taken in turn with the compiled loops and with tensor operations only (the same
bits, so the same training), one torch thread; writes noise_step.json and noise_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine_info import machine

from hosl.zo.cpu_noise import tensor_path
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


def _tensor_ops(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    with tensor_path():
        return make()


def step_seconds(split: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` hosl steps each way, alternating, after one warm-up step."""
    import copy

    import step_time
    from transport import synthetic_batches

    from hosl.build import build_run
    from hosl.models.loading import load_pretrained

    step_time.SETTINGS["split"] = split
    model = load_pretrained(step_time.MODEL)[0]
    batches = synthetic_batches(model.config.vocab_size, repeats + 1)
    run = build_run(step_time.config("hosl", 1, "cut-grad", noise="batch"), copy.deepcopy(model))
    run.train_step([batches[0]], 0)
    seconds: dict[str, list[float]] = {"compiled loops": [], "tensor ops": []}
    for step in range(1, repeats + 1):
        for name, times in seconds.items():
            start = time.perf_counter()
            if name == "tensor ops":
                with tensor_path():
                    run.train_step([batches[step]], step)
            else:
                run.train_step([batches[step]], step)
            times.append(time.perf_counter() - start)
            print(f"  step {step} {name}: {times[-1]:.2f} s", flush=True)
    return seconds


def main_step(split: int, repeats: int, out: Path | None) -> None:
    import statistics

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    seconds = step_seconds(split, repeats)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    result = {"machine": machine(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "split_layer": split, "repeats": repeats,
              "seconds": seconds, "median_seconds": median,
              "ratio": median["tensor ops"] / median["compiled loops"]}
    m = result["machine"]
    text = (f"# A hosl step with the compiled noise loops and with tensor operations\n\n"
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, 1 torch thread; load average "
            f"{load_start[0]:.2f} at start, {result['load_average_end'][0]:.2f} at end.\n"
            f"Command: `python benchmarks/noise.py --step-split {split} --step-repeats "
            f"{repeats}`. SmolLM2-135M split at k = {split}, `hosl` with `cut-grad`, Q = 1, "
            "row-sparse embedding noise, 16 × 64 synthetic tokens per step; the two ways take "
            "their steps in turn (the same bits: the same training).\n\n"
            "| noise | median s/step | steps (s) |\n|---|---:|---|\n"
            + "".join(f"| {name} | {median[name]:.2f} | "
                      + ", ".join(f"{t:.1f}" for t in seconds[name]) + " |\n"
                      for name in seconds)
            + f"\nTensor operations ÷ compiled loops: **{result['ratio']:.2f}x**.\n")
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "noise_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "noise_step.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                    help="torch thread counts to measure (default: 1 and torch's default)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--step-split", type=int, default=None,
                    help="time real hosl steps at this split instead (see the module docstring)")
    ap.add_argument("--step-repeats", type=int, default=6)
    args = ap.parse_args()
    if args.step_split is not None:
        main_step(args.step_split, args.step_repeats, args.out)
        return
    param = torch.empty(1, 1).expand(VOCAB, DIM)  # only the shape is read
    rows = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(0))
    cases = {
        "torch.randn whole": lambda: torch.randn(VOCAB, DIM),
        "hosl whole": lambda: noise_for(param, 1, NAME),
        "hosl whole, tensor ops": lambda: _tensor_ops(lambda: noise_for(param, 1, NAME)),
        "hosl 1000 rows": lambda: row_noise(param, 1, NAME, rows),
        "old per-row 1000 rows": lambda: old_row_noise(param, 1, NAME, rows),
    }
    load_start = os.getloadavg()
    best = {(name, t): float("inf") for t in args.threads for name in cases}
    for fn in cases.values():
        fn()  # warm up
    for _ in range(args.repeats):
        for name, threads in best:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            cases[name]()
            best[name, threads] = min(best[name, threads], time.perf_counter() - start)
    ms = {t: {name: best[name, t] * 1e3 for name in cases} for t in args.threads}
    ratios = {
        t: {
            "hosl whole / torch.randn whole": ms[t]["hosl whole"] / ms[t]["torch.randn whole"],
            "hosl tensor ops / hosl compiled, whole":
                ms[t]["hosl whole, tensor ops"] / ms[t]["hosl whole"],
            "old per-row / hosl, 1000 rows":
                ms[t]["old per-row 1000 rows"] / ms[t]["hosl 1000 rows"],
        }
        for t in args.threads
    }
    result = {
        "machine": machine(), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "repeats": args.repeats, "shape": [VOCAB, DIM],
        "rows": ROWS, "milliseconds_by_threads": ms, "ratios_by_threads": ratios,
    }
    heads = " | ".join(f"{t} thread{'s' * (t > 1)}" for t in args.threads)
    rule = "---:|" * len(args.threads)
    lines = [f"| best of {args.repeats} (ms) | {heads} |", f"|---|{rule}"]
    lines += [f"| {name} | " + " | ".join(f"{ms[t][name]:.1f}" for t in args.threads) + " |"
              for name in cases]
    lines += ["", f"| ratio | {heads} |", f"|---|{rule}"]
    lines += [f"| {name} | " + " | ".join(f"{ratios[t][name]:.2f}" for t in args.threads) + " |"
              for name in ratios[args.threads[0]]]
    m = result["machine"]
    header = (f"# ZO noise generation, ({VOCAB} × {DIM}) float32\n\n"
              f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average "
              f"{load_start[0]:.2f} at start, {result['load_average_end'][0]:.2f} at end.\n"
              f"Command: `python benchmarks/noise.py --repeats {args.repeats} --threads "
              f"{' '.join(map(str, args.threads))}`.\n")
    table = "\n".join(lines)
    print(header + "\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "noise.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "noise.md").write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
