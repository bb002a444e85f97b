"""Does a ZO estimate survive low precision? Wire dtypes, a bf16 model, and bf16 ZO updates.

    python benchmarks/zo_signal.py --out benchmarks/results [--threads 2]

A ZO estimate reads g_q = (L⁺ − L⁻)/2ε, where L± are the server's losses on the client's
activations h± = f_c(x; θ_c ± εz_q). This measures, on the real demo model (SmolLM2-135M, split at
k = 4, a batch of 8 training examples of the offline `rt` task, max_length 64, ε = 1e-3), how far
g moves from its float32 value when something on the way is rounded:

1. **Wire precision** (float32 model). g for the same seeds with a float32 wire (the reference)
   against a bf16 and a float16 wire, each with hosl's difference encoding (`perturbed` = h± − h,
   `clean` = h, which the codec keeps at float32 on any narrower wire), with a bf16 clean h as
   well (the encoding before that rule; emulated by rounding both and sending them on a float32
   wire), and with the old scheme in which h± themselves were rounded (emulated by sending
   `clean` = 0 and `perturbed` = h±, so the server rebuilds 0 + h±). Every variant sends one
   `HoslStepRequest` with all its seeds through `LocalTransport` (the real codec) and reads
   `reply.losses`; the client's deltas are computed once and sent through each wire, and every run
   is built from a copy of the same weights, so only the wire differs.
2. **bf16 model**: a run built from `model.to(bfloat16)` (model.dtype bfloat16, bf16 wire)
   against the float32 reference: correlation, sign agreement, median relative error.
3. **bf16 ZO update**: `apply_zo_update_` on a copy of the bf16 client with one record (seed, g),
   g the median-magnitude g of the reference, at several learning rates: the fraction of the
   intended update −lr·g·z (float32) that lands, ⟨Δθ, intended⟩/⟨intended, intended⟩ over all
   client parameters, and the fraction of weights that changed; against round-to-nearest
   ((θ.float() + intended).to(bf16)), which stochastic rounding replaces.

Seeds per variant (`--seeds`, `--side-seeds`): the reference and the bf16 difference wire (the
targets: sign agreement >= 99%, median relative error <= 2%) use 50 seeds; the other variants use
the first `--side-seeds` of the same seeds, compared with the reference on those. On 2 shared CPU
cores each server loss takes about 2-3 s and each perturbed client forward about 1.5 s, so 50
seeds everywhere would take about half an hour. Writes <out>/zo_signal.json and <out>/zo_signal.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine_info import machine, run_lines

from hosl.algos.split_modes import cut
from hosl.batching import Batch, collate
from hosl.build import Run, build_run
from hosl.config import ModelConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.protocol import HoslStepRequest
from hosl.tasks import load_examples
from hosl.zo import ZoTarget, apply_zo_update_, noise_for, projected_gradient

MODEL, SPLIT, BATCH, MAX_LENGTH, EPS, TASK = "smollm2-135m", 4, 8, 64, 1e-3, "rt"
LRS = (1e-6, 1e-5, 1e-4)
TARGET_SIGN, TARGET_MEDIAN = 0.99, 0.02


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_run(model: torch.nn.Module, wire: str, dtype: str = "float32", q: int = 50) -> Run:
    cfg = TrainConfig(
        mode="hosl", model=ModelConfig(name=MODEL, split_layer=SPLIT, dtype=dtype),
        # every-row embedding noise, as results/ were measured
        # (row-sparse noise, the hosl default since, is measured against it in embedding_noise.py)
        zo=ZoConfig(q=q, eps=EPS, embedding_noise="all"), wire_dtype=wire,
    )
    return build_run(cfg, copy.deepcopy(model))


def client_side(run: Run, batch: Batch, n: int) -> tuple[Any, list[int], list[torch.Tensor]]:
    """The clean activations, the step's seeds and the 2n deltas h± − h of the first n seeds."""
    clean = run.client.activations(batch)
    seeds = run.runner.seeds(0, 0)[:n]
    deltas = list(run.client.perturbed_deltas(batch, seeds, EPS, clean.hidden))
    return clean, seeds, deltas


def server_g(run: Run, batch: Batch, clean: Any, deltas: list[torch.Tensor], n: int,
             encoding: str = "diff") -> list[float]:
    """g of the first n seeds from one request through `run`'s transport.

    encoding "old": emulate the scheme before difference encoding (h± themselves on the wire);
    "bf16 base": bf16 differences around a bf16 clean h (both rounded, sent on a float32 wire),
    which a bf16 wire sent before its base was kept at float32."""
    perturbed = deltas[: 2 * n]
    base = clean.hidden
    if encoding == "bf16 base":
        perturbed = [d.to(torch.bfloat16).float() for d in perturbed]
        base = base.to(torch.bfloat16).float()
    if encoding == "old":
        perturbed = [base + d for d in perturbed]  # h± itself
        base = torch.zeros_like(base)               # the server rebuilds 0 + h±
    reply = run.transport.hosl_step(HoslStepRequest(
        step=0, micro=0, update=False, batch=cut(batch, clean), perturbed=perturbed, clean=base))
    run.server.part.zero_grad(set_to_none=True)
    losses = reply.losses
    return [projected_gradient(losses[2 * q], losses[2 * q + 1], EPS) for q in range(n)]


def compare(g: list[float], ref: list[float]) -> dict[str, Any]:
    ref = ref[: len(g)]
    rel = sorted(abs(a - b) / abs(b) for a, b in zip(g, ref))
    sign = sum((a > 0) == (b > 0) for a, b in zip(g, ref)) / len(g)
    return {
        "seeds": len(g),
        "median_rel_err": statistics.median(rel),
        "p90_rel_err": rel[min(len(rel) - 1, int(round(0.9 * (len(rel) - 1))))],
        "max_rel_err": rel[-1],
        "sign_agreement": sign,
        "correlation": float(torch.corrcoef(torch.tensor([g, ref], dtype=torch.float64))[0, 1]),
    }


def half_range(clean: torch.Tensor, deltas: list[torch.Tensor]) -> dict[str, Any]:
    """What a float16 wire does to the tensors it carries: overflow (>65504) and underflow."""
    def stats(t: torch.Tensor) -> dict[str, Any]:
        half = t.to(torch.float16)
        nonzero = t != 0
        return {"max_abs": float(t.abs().max()), "inf_after_fp16": int(torch.isinf(half).sum()),
                "flushed_to_zero": int((nonzero & (half == 0)).sum()),
                "subnormal": int((nonzero & (half.abs() < 2.0**-14) & (half != 0)).sum()),
                "elements": t.numel()}

    per = [stats(d) for d in deltas]
    return {"clean": stats(clean), "deltas": {
        "max_abs": max(p["max_abs"] for p in per),
        "inf_after_fp16": sum(p["inf_after_fp16"] for p in per),
        "flushed_to_zero": sum(p["flushed_to_zero"] for p in per),
        "subnormal": sum(p["subnormal"] for p in per),
        "elements": sum(p["elements"] for p in per)}}


@torch.no_grad()
def update_landing(client_part: torch.nn.Module, seed: int, g: float) -> list[dict[str, Any]]:
    """Measurement 3 on copies of the bf16 client, one per learning rate."""
    base = ZoTarget(client_part)
    z = {name: noise_for(p, seed, name) for name, p in base.named}  # float32, shared by all lrs
    rows = []
    for lr in LRS:
        part = copy.deepcopy(client_part)
        target = ZoTarget(part)
        before = {name: p.detach().float() for name, p in target.named}
        apply_zo_update_(target, [(seed, g)], lr)
        sums = {k: 0.0 for k in ("sr_dot", "rtn_dot", "ii", "sr_err", "rtn_err")}
        changed = {"sr": 0, "rtn": 0}
        total = 0
        for name, p in target.named:
            intended = z[name] * (-lr * g)
            theta = before[name]
            sr = p.float() - theta
            rtn = (theta + intended).to(p.dtype).float() - theta
            ii = intended.double()
            sums["ii"] += float((ii * ii).sum())
            sums["sr_dot"] += float((sr.double() * ii).sum())
            sums["rtn_dot"] += float((rtn.double() * ii).sum())
            sums["sr_err"] += float(((sr.double() - ii) ** 2).sum())
            sums["rtn_err"] += float(((rtn.double() - ii) ** 2).sum())
            changed["sr"] += int((sr != 0).sum())
            changed["rtn"] += int((rtn != 0).sum())
            total += p.numel()
        rows.append({
            "lr": lr, "g": g, "params": total,
            "intended_rms": (sums["ii"] / total) ** 0.5,
            "stochastic": {"landed": sums["sr_dot"] / sums["ii"], "changed": changed["sr"] / total,
                           "rel_err": (sums["sr_err"] / sums["ii"]) ** 0.5},
            "nearest": {"landed": sums["rtn_dot"] / sums["ii"],
                        "changed": changed["rtn"] / total,
                        "rel_err": (sums["rtn_err"] / sums["ii"]) ** 0.5},
        })
        log(f"  lr {lr:g}: stochastic lands {rows[-1]['stochastic']['landed']:.3f} "
            f"(changed {rows[-1]['stochastic']['changed']:.3%}), nearest lands "
            f"{rows[-1]['nearest']['landed']:.3f} (changed {rows[-1]['nearest']['changed']:.3%})")
        del part, target, before
        gc.collect()
    return rows


def measure(seeds_main: int, seeds_side: int) -> dict[str, Any]:
    model, tokenizer = load_pretrained(MODEL, dtype=torch.float32)
    examples = load_examples(TASK, "train", n=BATCH, seed=0)
    batch = collate(examples, tokenizer, MAX_LENGTH, "right")
    out: dict[str, Any] = {"tokens": list(batch.input_ids.shape), "wires": {}, "timings": {}}

    # 1. wires ------------------------------------------------------------------------------
    t = time.perf_counter()
    ref_run = make_run(model, "float32", q=seeds_main)
    clean, seeds, deltas = client_side(ref_run, batch, seeds_main)
    out["timings"]["client_float32_s"] = round(time.perf_counter() - t, 1)
    out["fp16_range"] = half_range(clean.hidden, deltas)
    log(f"float32 client: {2 * seeds_main} perturbed forwards in "
        f"{out['timings']['client_float32_s']} s")
    g: dict[str, list[float]] = {}
    plan = [  # (key, wire, encoding, seeds)
        ("float32 (reference)", "float32", "diff", seeds_main),
        ("bfloat16 difference", "bfloat16", "diff", seeds_main),
        ("bfloat16 difference, bf16 clean (before)", "float32", "bf16 base", seeds_side),
        ("float16 difference", "float16", "diff", seeds_side),
        ("bfloat16 old (h± rounded)", "bfloat16", "old", seeds_side),
        ("float16 old (h± rounded)", "float16", "old", seeds_side),
    ]
    encodings = {"diff": "h± − h", "old": "h± (old)", "bf16 base": "h± − h, h in bf16"}
    for key, wire, encoding, n in plan:
        t = time.perf_counter()
        run = ref_run if wire == "float32" else make_run(model, wire, q=seeds_main)
        g[key] = server_g(run, batch, clean, deltas, n, encoding)
        out["timings"][key] = round(time.perf_counter() - t, 1)
        if run is not ref_run:
            del run
            gc.collect()
        log(f"{key}: {n} seeds in {out['timings'][key]} s")
    ref = g["float32 (reference)"]
    for key, wire, encoding, _n in plan:
        out["wires"][key] = {"wire": wire, "encoding": encodings[encoding], **compare(g[key], ref)}
    del ref_run, deltas, clean
    gc.collect()

    # 2. bf16 model --------------------------------------------------------------------------
    t = time.perf_counter()
    bf16_run = make_run(model.to(torch.bfloat16), "bfloat16", dtype="bfloat16", q=seeds_main)
    del model
    gc.collect()
    bclean, _, bdeltas = client_side(bf16_run, batch, seeds_side)
    g["bf16 model, bf16 wire"] = server_g(bf16_run, batch, bclean, bdeltas, seeds_side)
    out["timings"]["bf16 model"] = round(time.perf_counter() - t, 1)
    log(f"bf16 model: {seeds_side} seeds in {out['timings']['bf16 model']} s")
    out["bf16_model"] = compare(g["bf16 model, bf16 wire"], ref)
    del bdeltas, bclean
    gc.collect()

    # 3. bf16 ZO update ----------------------------------------------------------------------
    t = time.perf_counter()
    order = sorted(range(len(ref)), key=lambda i: abs(ref[i]))
    pick = order[len(order) // 2]
    out["update_record"] = {"seed": seeds[pick], "g": ref[pick], "index": pick}
    log(f"bf16 update with the median-|g| record: g = {ref[pick]:.4g}")
    out["bf16_update"] = update_landing(bf16_run.client.part, seeds[pick], ref[pick])
    out["timings"]["bf16 update"] = round(time.perf_counter() - t, 1)
    out["g"] = g
    out["seeds"] = seeds
    return out


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    bf16 = result["measurements"]["wires"]["bfloat16 difference"]
    return [
        {"target": "bf16 difference wire: sign agreement >= 99%", "value": bf16["sign_agreement"],
         "verdict": "met" if bf16["sign_agreement"] >= TARGET_SIGN else "missed"},
        {"target": "bf16 difference wire: median relative error <= 2%",
         "value": bf16["median_rel_err"],
         "verdict": "met" if bf16["median_rel_err"] <= TARGET_MEDIAN else "missed"},
    ]


def reading(result: dict[str, Any]) -> str:
    m = result["measurements"]
    w = m["wires"]
    bd, bo = w["bfloat16 difference"], w["bfloat16 old (h± rounded)"]
    fd, fo = w["float16 difference"], w["float16 old (h± rounded)"]
    bm = m["bf16_model"]
    rng = m["fp16_range"]
    up = {row["lr"]: row for row in m["bf16_update"]}
    lo, hi = up[min(up)], up[max(up)]
    met = all(v["verdict"] == "met" for v in result["verdicts"])
    fp16_note = (
        f"float16 never overflows here (largest |h| {rng['clean']['max_abs']:.0f}, largest "
        f"|h± − h| {rng['deltas']['max_abs']:.1f}, against float16's 65504)"
        if rng["clean"]["inf_after_fp16"] == 0 and rng["deltas"]["inf_after_fp16"] == 0 else
        f"float16 OVERFLOWS: {rng['clean']['inf_after_fp16']} clean and "
        f"{rng['deltas']['inf_after_fp16']} delta elements become inf")
    return (
        f"Sending differences is what keeps the signal: with a bf16 wire the estimate agrees in "
        f"sign with the float32 one for {bd['sign_agreement']:.0%} of seeds with a median "
        f"relative error of {bd['median_rel_err']:.2%} (90th percentile "
        f"{bd['p90_rel_err']:.2%}), against {bo['sign_agreement']:.0%} and "
        f"{bo['median_rel_err']:.1%} when h± themselves are rounded (the old scheme); the two "
        f"bf16 targets are {'both met' if met else 'NOT both met'}. A float16 wire is better "
        f"still with differences ({fd['median_rel_err']:.3%} median) and usable even with the "
        f"old scheme ({fo['median_rel_err']:.2%}, sign {fo['sign_agreement']:.0%}) because its "
        f"10-bit mantissa rounds 8x finer; {fp16_note}, and "
        f"{rng['deltas']['flushed_to_zero']:,} of {rng['deltas']['elements']:,} delta elements "
        f"flush to zero ({rng['deltas']['subnormal']:,} are float16 subnormals). A bf16 model "
        f"(bf16 storage, float32 compute, bf16 wire) estimates the gradient of a slightly "
        f"different function (its weights are the float32 ones rounded by up to 0.4%), so its g "
        f"is not the float32 g: correlation {bm['correlation']:.3f}, sign agreement "
        f"{bm['sign_agreement']:.0%}, median relative error {bm['median_rel_err']:.1%}. "
        f"The bf16 update at the median |g| = {lo['g']:.3g}: stochastic rounding lands "
        f"{lo['stochastic']['landed']:.2f} of the intended update at lr {lo['lr']:g} (changing "
        f"{lo['stochastic']['changed']:.2%} of the weights) and {hi['stochastic']['landed']:.2f} "
        f"at lr {hi['lr']:g}, where round-to-nearest lands {lo['nearest']['landed']:.2f} and "
        f"{hi['nearest']['landed']:.2f} (changing {lo['nearest']['changed']:.2%} and "
        f"{hi['nearest']['changed']:.2%}): at lr 1e-6 and 1e-5 most of a step is smaller than half "
        f"a bf16 step, so round-to-nearest discards most of it while stochastic rounding keeps it "
        f"in expectation, at the price of per-weight noise (relative error "
        f"{lo['stochastic']['rel_err']:.0f}x the update's size at lr {lo['lr']:g})."
    )


def write_markdown(result: dict[str, Any]) -> str:
    m, s = result["measurements"], result["settings"]
    lines = [
        "# ZO signal under low precision: wire dtype, bf16 model, bf16 updates", "",
        *run_lines(result, shared=True),
        f"- Command: `{result['command']}`",
        f"- Settings: {s['model']} split at k = {s['split_layer']}, a batch of {s['batch']} "
        f"`{s['task']}` training examples (seed 0, max_length {s['max_length']}: "
        f"{m['tokens'][0]} x {m['tokens'][1]} tokens), ε = {s['eps']}, seeds "
        f"`perturbation_seed(0, 0, 0, q)`. g = (L⁺ − L⁻)/2ε from one `HoslStepRequest` "
        "(update=False) through `LocalTransport`; relative error |g − g_ref|/|g_ref| against the "
        "float32 wire on the same seeds and weights.",
        f"- Seeds: {s['seeds_main']} for the reference and the bf16 difference wire (the "
        f"targets), the first {s['seeds_side']} of them for the other rows (time on this "
        "machine: each server loss is 2-3 s here).",
        "- Old scheme (before difference encoding) emulated: `clean` = 0 and `perturbed` = h±, "
        "so the wire rounds h± themselves and the server rebuilds 0 + h±.", "",
        "## 1. Wire precision (float32 model)", "",
        "| wire | encoding | seeds | median rel. error | 90th pct | max | sign agreement "
        "| correlation |", "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in m["wires"].items():
        lines.append(
            f"| {key} | {row['encoding']} | {row['seeds']} | {row['median_rel_err']:.3%} | "
            f"{row['p90_rel_err']:.3%} | {row['max_rel_err']:.3%} | {row['sign_agreement']:.0%} "
            f"| {row['correlation']:.5f} |")
    rng = m["fp16_range"]
    lines += [
        "", f"float16 range: largest |h| {rng['clean']['max_abs']:.1f}, largest |h± − h| "
        f"{rng['deltas']['max_abs']:.2f}; inf after a float16 cast: "
        f"{rng['clean']['inf_after_fp16']} (h), {rng['deltas']['inf_after_fp16']} (deltas); "
        f"delta elements flushed to zero {rng['deltas']['flushed_to_zero']:,}, subnormal "
        f"{rng['deltas']['subnormal']:,} of {rng['deltas']['elements']:,}.", "",
        "## 2. bf16 model (bf16 storage, float32 compute, bf16 wire) vs the float32 model", "",
        "| seeds | correlation | sign agreement | median rel. error | 90th pct |",
        "|---:|---:|---:|---:|---:|",
    ]
    bm = m["bf16_model"]
    lines.append(f"| {bm['seeds']} | {bm['correlation']:.4f} | {bm['sign_agreement']:.0%} | "
                 f"{bm['median_rel_err']:.2%} | {bm['p90_rel_err']:.2%} |")
    rec = m["update_record"]
    lines += [
        "", "## 3. bf16 ZO update: how much of θ −= lr·g·z lands", "",
        f"One record (seed {rec['seed']}, g = {rec['g']:.4g}, the median |g| of the reference) "
        "applied by `apply_zo_update_` to a fresh copy of the bf16 client "
        f"({m['bf16_update'][0]['params']:,} parameters) per learning rate. Landed = "
        "⟨Δθ, intended⟩/⟨intended, intended⟩ with intended = −lr·g·z in float32; rel. error = "
        "‖Δθ − intended‖/‖intended‖. Round-to-nearest is (θ.float() + intended).to(bf16).", "",
        "| lr | intended rms | stochastic: landed | changed | rel. error "
        "| nearest: landed | changed | rel. error |", "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in m["bf16_update"]:
        sr, rn = row["stochastic"], row["nearest"]
        lines.append(
            f"| {row['lr']:g} | {row['intended_rms']:.2e} | {sr['landed']:.3f} | "
            f"{sr['changed']:.2%} | {sr['rel_err']:.2f} | {rn['landed']:.3f} | "
            f"{rn['changed']:.2%} | {rn['rel_err']:.2f} |")
    lines += ["", "## Verdicts", ""]
    for v in result["verdicts"]:
        value = v["value"]
        lines.append(f"- **{v['verdict']}**: {v['target']}: {value:.2%}")
    lines += ["", "## Reading", "", reading(result), ""]
    timings = ", ".join(f"{k} {v} s" for k, v in m["timings"].items())
    lines += [f"Timings: {timings}.", ""]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    m = result["measurements"]
    print("\n| variant | seeds | median rel. err | p90 | sign agreement | correlation |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {**{f"wire {k}": v for k, v in m["wires"].items()},
            "bf16 model, bf16 wire": m["bf16_model"]}
    for key, row in rows.items():
        print(f"| {key} | {row['seeds']} | {row['median_rel_err']:.3%} | {row['p90_rel_err']:.3%}"
              f" | {row['sign_agreement']:.0%} | {row['correlation']:.5f} |")
    print("\n| lr | SR landed | SR changed | RTN landed | RTN changed |\n|---|---:|---:|---:|---:|")
    for row in m["bf16_update"]:
        print(f"| {row['lr']:g} | {row['stochastic']['landed']:.3f} | "
              f"{row['stochastic']['changed']:.2%} | {row['nearest']['landed']:.3f} | "
              f"{row['nearest']['changed']:.2%} |")
    for v in result["verdicts"]:
        print(f"{v['verdict']}: {v['target']} ({v['value']:.2%})")


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "zo_signal.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "zo_signal.md").write_text(write_markdown(result))
    log(f"wrote {out}/zo_signal.{{json,md}}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=50,
                        help="seeds of the reference and the bf16 difference wire")
    parser.add_argument("--side-seeds", type=int, default=25,
                        help="seeds of the other wires and of the bf16 model")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="re-derive verdicts and zo_signal.md from a saved zo_signal.json")
    args = parser.parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["verdicts"] = verdicts(result)
        write_results(result, args.out)
        return 0
    torch.set_num_threads(args.threads)
    side = min(args.side_seeds, args.seeds)
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 1)
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "command": command,
        "settings": {"model": MODEL, "split_layer": SPLIT, "batch": BATCH, "task": TASK,
                     "max_length": MAX_LENGTH, "eps": EPS, "seeds_main": args.seeds,
                     "seeds_side": side, "lrs": list(LRS)},
    }
    result["measurements"] = measure(args.seeds, side)
    result["verdicts"] = verdicts(result)
    result["wall_seconds"] = round(time.perf_counter() - started)
    result["load_average"] = {"start": load_start, "end": round(os.getloadavg()[0], 1)}
    print_table(result)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
