"""Per-party peak memory of HOSL against FO-FO and ZO-ZO split learning at the paper's shapes.

    python benchmarks/memory.py --out benchmarks/results [--quick]

Randomly initialised OPT-125M- and OPT-1.3B-shaped models (hosl's built-in configs, no
download), SST-2-like (batch 16 x 64 tokens) and BoolQ-like (batch 16 x 512 tokens) synthetic
batches, split at k = 5, Q = 1, float32, sdpa attention (what hosl loads). Each configuration
runs one real training step through `build_run` with every party metered (`PartyMeter`: bytes
of the live tensors each party allocated; peaks repeat every step, and optimizer state is
created before metering, as it exists in every step after the first). FO parties use AdamW;
FO-FO with SGD is measured for OPT-125M at the SST-2-like length. Also measured:

- the client part's pure inference peak: its forward alone under `torch.inference_mode()`;
- a baseline server defined here (not library code) that applies the head at every position:
  (B x L x V) logits, a float32 log-softmax, the same candidate loss, backward and AdamW.

This machine (2 shared CPU cores, 24 GB RAM) sets the plan (`PLAN`): OPT-1.3B does not fit as
a whole with AdamW on both sides, so its client (embeddings + 5 blocks) is measured whole and its
server with its first block only (plus final norm and head), the full 19-block server being
analytic only; at 16 x 512 tokens OPT-1.3B is analytic only (one forward of its client takes
minutes here), and so is ZO-ZO. Every such cell says "analytic only". The analytic model
(`hosl.memory.analytic.estimate`) is printed next to every measurement. Writes
<out>/memory.json and <out>/memory.md. About 15 minutes here.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import memory_savings as savings
import torch
from machine_info import machine
from transformers import AutoModelForCausalLM, PretrainedConfig

from hosl.batching import Batch, random_batch
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.memory.analytic import estimate
from hosl.memory.measure import PartyMeter, peak_rss_bytes
from hosl.models.configs import builtin_config
from hosl.models.split import Activations, split_model
from hosl.optim import build_optimizer
from hosl.scoring import classification_loss

BATCH, SPLIT, Q = 16, 5, 1
TASKS = {"sst2-like": 64, "boolq-like": 512}
SERVER_BLOCKS = {"opt-125m": None, "opt-1.3b": 1}  # None: the whole server is measured
# What is measured per (model, task) — "hosl" includes the client's inference peak — within
# this machine's time budget; everything else is analytic only.
PLAN = {
    ("opt-125m", "sst2-like"): ("hosl", "fo", "fo-sgd", "zo", "full-logits"),
    ("opt-125m", "boolq-like"): ("hosl", "fo", "full-logits"),
    ("opt-1.3b", "sst2-like"): ("hosl", "fo", "zo", "full-logits"),
    ("opt-1.3b", "boolq-like"): (),
}
EXTRA_SPLITS = {("opt-125m", "sst2-like"): (2, 8)}  # other split points, measured where cheap
MIB = 2**20


def synthetic_batch(vocab: int, length: int, seed: int = 0) -> Batch:
    """Full-length sequences; each scores two single-token candidates at its last token."""
    return random_batch(BATCH, length, vocab, torch.Generator().manual_seed(seed), low=4)


def materialise_state(optimizer: torch.optim.Optimizer | None) -> None:
    """Create AdamW moments / momentum buffers with a zero-learning-rate step on zero gradients,
    so that a one-step measurement holds the state every later step holds."""
    if optimizer is None:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def measure_split(model: torch.nn.Module, mode: str, k: int, batch: Batch) -> dict[str, Any]:
    """One metered training step of a split mode; for `hosl`, also the client's inference peak."""
    optimizer = "sgd" if mode == "fo-sgd" else "adamw"
    cfg = TrainConfig(
        mode=mode.removesuffix("-sgd"), steps=1, batch_size=BATCH, seed=0,
        # A bf16 wire makes the server's float32 copies of what it receives real allocations
        # its meter sees (decoding at the wire dtype is zero-copy, from a byte buffer).
        wire_dtype="bfloat16",
        model=ModelConfig(name="bench", split_layer=k),
        data=DataConfig(task="sst2", max_length=batch.input_ids.shape[1]),
        # every-row embedding noise: what results/memory.* were measured with
        # (row-sparse noise, the hosl default since, is measured against it in embedding_noise.py)
        zo=ZoConfig(q=Q, eps=1e-3, lr=1e-6, embedding_noise="all"),
        optim=OptimConfig(optimizer=optimizer, lr=1e-5),
    )
    run = build_run(cfg, model)
    for party in run.parties().values():
        materialise_state(party.optimizer)
    meters = {name: party.start_metering(name) for name, party in run.parties().items()}
    start = time.perf_counter()
    run.train_step([batch], 0)
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1)}
    for name, meter in meters.items():
        out[f"{name}_peak"] = meter.peak_bytes
        out[f"{name}_phases"] = meter.phase_peaks()
    if mode == "hosl":
        meter = run.client.start_metering("client")
        start = time.perf_counter()
        run.client.activations(batch)  # inference_mode, metered as the client's "forward"
        out["inference_peak"] = meter.peak_bytes
        out["inference_seconds"] = round(time.perf_counter() - start, 1)
    del run, meters
    gc.collect()
    return out


def measure_full_logits_server(model: torch.nn.Module, k: int, batch: Batch) -> dict[str, Any]:
    """Baseline: an FO server step that applies the head at every position (B x L x V)."""
    _, server = split_model(model, k)
    server.eval()
    optimizer = build_optimizer(server.parameters(), "adamw", 1e-5)
    materialise_state(optimizer)
    out = full_logits_step(server, optimizer, batch)
    del server, optimizer
    gc.collect()
    return out


def full_logits_step(server: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     batch: Batch) -> dict[str, Any]:
    """One metered step of `server` (a split server part) with (B x L x V) logits."""
    meter = PartyMeter("server")
    meter.set_resident_state(server, optimizer)
    spec = batch.spec
    length = batch.input_ids.shape[1]
    hidden_size = server.config.hidden_size
    wire = torch.randn(BATCH, length, hidden_size).to(torch.bfloat16)
    position_ids = torch.arange(length).expand(BATCH, length)
    start = time.perf_counter()
    with meter.phase("receive"):
        hidden = wire.to(torch.float32)  # (B, L, H), as the server decodes a bf16 wire
    with meter.phase("forward_backward"):
        final = server(Activations(hidden, batch.attention_mask, position_ids))  # (B, L, H)
        logits = server.head(final)  # (B, L, V): the tensor hosl never makes
        log_probs = logits.float().log_softmax(dim=-1).flatten(0, 1)  # (B*L, V)
        reads = log_probs[spec.positions[spec.position_index], spec.tokens]  # (T,)
        scores = reads.view(BATCH, spec.num_candidates)  # one token per candidate
        loss = classification_loss(scores, spec.labels)
        loss.backward()
        del final, logits, log_probs, reads, scores, loss
    with meter.phase("update"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"server_peak": meter.peak_bytes, "server_phases": meter.phase_peaks(),
           "seconds": round(time.perf_counter() - start, 1)}
    del hidden
    return out


def analytic(config: PretrainedConfig, mode: str, k: int, length: int,
             logits: str = "scored") -> dict[str, int]:
    optimizer = "sgd" if mode == "fo-sgd" else "adamw"
    est = estimate(config, split_layer=k, batch=BATCH, length=length,
                   mode=mode.removesuffix("-sgd"), optimizer=optimizer, q=Q, logits=logits,
                   attention="sdpa")
    return {f"{name}_peak": party.total for name, party in est.parties.items()}


def shapes(name: str) -> tuple[PretrainedConfig, PretrainedConfig, int | None]:
    """(the full config, the config actually run, server blocks measured or None for all)."""
    full = builtin_config(name)
    blocks = SERVER_BLOCKS[name]
    run = builtin_config(name)
    if blocks is not None:
        run.num_hidden_layers = SPLIT + blocks
    return full, run, blocks


def bench_cell(name: str, task: str, model: torch.nn.Module | None,
               measure: bool) -> dict[str, Any]:
    full, run_config, blocks = shapes(name)
    length = TASKS[task]
    batch = synthetic_batch(full.vocab_size, length)
    cell: dict[str, Any] = {"model": name, "task": task, "batch": BATCH, "length": length,
                            "split_layer": SPLIT, "q": Q, "server_blocks_measured": blocks,
                            "server_blocks_total": full.num_hidden_layers - SPLIT, "runs": {}}
    modes = ("hosl", "fo", "fo-sgd", "zo")
    for mode in modes:
        entry: dict[str, Any] = {"analytic": analytic(full, mode, SPLIT, length)}
        if blocks is not None:
            entry["analytic_as_run"] = analytic(run_config, mode, SPLIT, length)
        if measure and mode in PLAN[name, task]:
            log(f"{name} {task} {mode} ...")
            entry["measured"] = measure_split(model, mode, SPLIT, batch)
            log(f"  {summary_line(entry['measured'])}")
        cell["runs"][mode] = entry
    inference = analytic(full, "inference", SPLIT, length)["client_peak"]
    cell["runs"]["inference"] = {"analytic": {"client_peak": inference}}
    if "measured" in cell["runs"]["hosl"]:
        hosl = cell["runs"]["hosl"]["measured"]
        cell["runs"]["inference"]["measured"] = {"client_peak": hosl.pop("inference_peak"),
                                                 "seconds": hosl.pop("inference_seconds")}
    baseline = {"analytic": {"server_peak": analytic(full, "fo", SPLIT, length,
                                                      "full")["server_peak"]}}
    if blocks is not None:
        baseline["analytic_as_run"] = {
            "server_peak": analytic(run_config, "fo", SPLIT, length, "full")["server_peak"]}
    if measure and "full-logits" in PLAN[name, task]:
        log(f"{name} {task} full-logits server ...")
        baseline["measured"] = measure_full_logits_server(model, SPLIT, batch)
        log(f"  {summary_line(baseline['measured'])}")
    cell["runs"]["full-logits server"] = baseline
    cell["ratios"] = ratios(cell)
    return cell


def extra_splits(name: str, task: str, model: torch.nn.Module) -> list[dict[str, Any]]:
    full, _, _ = shapes(name)
    length = TASKS[task]
    batch = synthetic_batch(full.vocab_size, length)
    rows = []
    for k in EXTRA_SPLITS.get((name, task), ()):
        log(f"{name} {task} k={k} hosl, fo ...")
        hosl, fo = measure_split(model, "hosl", k, batch), measure_split(model, "fo", k, batch)
        rows.append({
            "model": name, "task": task, "split_layer": k,
            "hosl_client": hosl["client_peak"], "fo_client": fo["client_peak"],
            "inference_client": hosl["inference_peak"],
            "fo_over_hosl": fo["client_peak"] / hosl["client_peak"],
            "hosl_over_inference": hosl["client_peak"] / hosl["inference_peak"],
            "analytic_fo_over_hosl": (analytic(full, "fo", k, length)["client_peak"]
                                      / analytic(full, "hosl", k, length)["client_peak"]),
        })
    return rows


def ratios(cell: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    runs = cell["runs"]

    def get(mode: str, key: str, source: str) -> int | None:
        return runs[mode].get(source, {}).get(key)

    def ratio(a: int | None, b: int | None) -> float | None:
        return round(a / b, 3) if a and b else None

    out = {}
    for source in ("measured", "analytic"):
        out[source] = {
            "fo_over_hosl_client": ratio(get("fo", "client_peak", source),
                                         get("hosl", "client_peak", source)),
            "fo_sgd_over_hosl_client": ratio(get("fo-sgd", "client_peak", source),
                                             get("hosl", "client_peak", source)),
            "hosl_client_over_inference": ratio(get("hosl", "client_peak", source),
                                                get("inference", "client_peak", source)),
            "full_logits_over_hosl_server": ratio(get("full-logits server", "server_peak", source),
                                                  get("hosl", "server_peak", source)),
        }
    if "analytic_as_run" in runs["hosl"]:
        out["analytic_as_run"] = {"full_logits_over_hosl_server": ratio(
            runs["full-logits server"]["analytic_as_run"]["server_peak"],
            runs["hosl"]["analytic_as_run"]["server_peak"])}
    return out


def summary_line(measured: dict[str, Any]) -> str:
    parts = [f"{key.removesuffix('_peak')} {value / MIB:,.0f} MiB"
             for key, value in measured.items() if key.endswith("_peak")]
    return ", ".join(parts) + f", {measured['seconds']} s"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_sweep() -> list[dict[str, Any]]:
    """Analytic client ratios at other split points (the memory model, no run)."""
    rows = []
    for name in ("opt-125m", "opt-1.3b"):
        full = builtin_config(name)
        for task, length in TASKS.items():
            for k in range(1, full.num_hidden_layers, max(1, full.num_hidden_layers // 6)):
                hosl = analytic(full, "hosl", k, length)
                rows.append({
                    "model": name, "task": task, "split_layer": k,
                    "fo_over_hosl_client": round(
                        analytic(full, "fo", k, length)["client_peak"] / hosl["client_peak"], 2),
                    "hosl_client_over_inference": round(
                        hosl["client_peak"]
                        / analytic(full, "inference", k, length)["client_peak"], 3),
                })
    return rows


# -- verdicts and the report ----------------------------------------------------------------


def _hosl_client_parts(name: str, length: int) -> dict[str, float]:
    """MiB of what the HOSL and FO-FO clients hold at their peaks (analytic), for the reasons."""
    kw = dict(split_layer=SPLIT, batch=BATCH, length=length, q=Q, attention="sdpa")
    hosl = estimate(name, mode="hosl", **kw).client
    fo = estimate(name, mode="fo", optimizer="adamw", **kw).client
    inference = estimate(name, mode="inference", **kw).client
    return {
        "params": hosl.components["parameters"] / MIB,
        "noise": hosl.components["perturbation"] / MIB,
        "phase": hosl.peak_phase,
        "hosl_work": (hosl.total - hosl.components["parameters"]) / MIB,
        "fo_activations": fo.components["stored_activations"] / MIB,
        "inference_work": (inference.total - inference.components["parameters"]) / MIB,
    }


def _client_reason(parts: dict[str, Any], length: int) -> str:
    fo = (f"FO-FO's client holds its parameters, gradients and AdamW state (4 x "
          f"{parts['params']:.0f} MiB) plus {parts['fo_activations']:.0f} MiB of stored "
          "activations")
    if parts["phase"] == "perturb":
        return (f"{fo}; HOSL's client peaks while it holds ZO noise: {parts['noise']:.0f} MiB "
                "(the looked-up embedding rows, or the largest other tensor drawn whole)")
    return (f"{fo}; HOSL's client peaks in its forward pass: {parts['params']:.0f} MiB of "
            f"parameters plus {parts['hosl_work']:.0f} MiB of working set at {length} tokens "
            "(one block's activations, its clean h and the perturbed output being made)")


def _pick(ratios: dict[str, Any], key: str) -> tuple[float | None, str]:
    value = ratios["measured"].get(key)
    return (value, "measured") if value is not None else (ratios["analytic"][key], "analytic")


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    # the memory-saving rows' analytic columns and ratios are derived from their measurements
    savings.derive(result, TASKS)
    out = []
    for cell in result["cells"]:
        name, task, length = cell["model"], cell["task"], cell["length"]
        parts = _hosl_client_parts(name, length)
        value, source = _pick(cell["ratios"], "fo_over_hosl_client")
        met = value >= 4
        out.append({
            "target": "FO-FO client / HOSL client >= 4x (AdamW)", "model": name, "task": task,
            "value": value, "source": source, "verdict": "met" if met else "missed",
            "reason": None if met else _client_reason(parts, length),
        })
        value, source = _pick(cell["ratios"], "hosl_client_over_inference")
        met = value <= 1.15
        out.append({
            "target": "HOSL client / client inference peak <= 1.15x", "model": name,
            "task": task, "value": value, "source": source,
            "verdict": "met" if met else "missed",
            "reason": None if met else (
                f"HOSL's client peaks in its {parts['phase']} phase with "
                f"{parts['hosl_work']:.0f} MiB over its parameters (its clean h beside a "
                f"perturbed forward, ZO noise of up to {parts['noise']:.0f} MiB), inference with "
                f"{parts['inference_work']:.0f} MiB at {length} tokens"),
        })
    for cell in result["cells"]:
        if cell["task"] != "boolq-like":
            continue
        runs = cell["runs"]
        full = runs["full-logits server"]["analytic"]["server_peak"]
        ours = runs["hosl"]["analytic"]["server_peak"]
        est = estimate(cell["model"], split_layer=SPLIT, batch=BATCH, length=cell["length"],
                       mode="hosl", optimizer="adamw", q=Q, attention="sdpa").server.components
        value, source = _pick(cell["ratios"], "full_logits_over_hosl_server")
        if cell["server_blocks_measured"] is not None:  # truncated server: full size is analytic
            value, source = cell["ratios"]["analytic"]["full_logits_over_hosl_server"], "analytic"
        met = value >= 5
        state = (est["parameters"] + est["gradients"] + est["optimizer_state"]) / 2**30
        out.append({
            "target": "full-logits server / HOSL server >= 5x (BoolQ-like)",
            "model": cell["model"], "task": cell["task"], "value": value, "source": source,
            "verdict": "met" if met else "missed",
            "reason": None if met else (
                f"the (B x L x V) logits, log-softmax and their gradients add "
                f"{(full - ours) / 2**30:.1f} GiB to what both servers hold anyway — parameters, "
                f"gradients and AdamW state ({state:.1f} GiB), the stored activations of "
                f"{cell['server_blocks_total']} blocks ({est['stored_activations'] / 2**30:.1f}"
                f" GiB) — so 5x would need them to add 4x our whole server "
                f"({4 * ours / 2**30:.1f} GiB). The logits term itself shrinks {cell['length']}x"
                " (only the scored positions)."),
        })
    return out + savings.verdicts(result)


def _cores(machine_fields: dict[str, Any]) -> int:
    # older results name the field cpu_count
    return machine_fields.get("cores", machine_fields.get("cpu_count"))


def _load_note(result: dict[str, Any]) -> str:
    loads = result.get("load_average")
    if not loads:
        return ""
    return (f" (1-minute load average {loads['start']} at the start, {loads['end']} at the "
            f"end, on {_cores(result['machine'])} cores)")


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def write_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Per-party peak memory: HOSL vs FO-FO vs ZO-ZO split learning", "",
        f"- Machine: {_cores(m)}-core CPU ({m['cpu']}), no GPU; torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}",
        f"- Date: {result['date']}; wall time {result['wall_seconds']} s; "
        f"process peak RSS {result['peak_rss_bytes'] / 2**30:.1f} GiB",
        f"- Command: `{result['command']}`"
        + (f" (this report re-derived by `{result['rendered_by']}`)"
           if "rendered_by" in result else ""),
        *[f"- {note}" for note in result.get("notes", [])],
        f"- Settings: batch {BATCH}, split k = {SPLIT}, Q = {Q}, float32, sdpa attention, "
        "bf16 wire; FO parties use AdamW (fo-sgd: SGD). Random weights with the real shapes.",
        "- Measured = `PartyMeter` peak (bytes of live tensors each party allocated) over one "
        "real training step through `build_run`, optimizer state already created. Analytic = "
        "`hosl.memory.analytic.estimate`. MiB throughout.",
        "- Step seconds are wall time of the one metered step on a machine shared with other "
        f"work{_load_note(result)}: indicative only.",
        "- The FO-FO client's measured peak leaves out the ∂L/∂h it receives (one (B, L, H) "
        "tensor, decoded by the transport outside the client's metered phases; the analytic "
        "model counts it), so measured FO-FO ÷ HOSL ratios are slightly conservative.",
        "- OPT-1.3B: the client is measured whole; the server is measured with 1 of its 19 "
        "blocks (RAM and time on this machine), so its measured server column is for that "
        "truncated server (its analytic value in brackets) and the full-size server is "
        "analytic only. OPT-1.3B at 16 x 512 tokens is analytic only (a forward of its client "
        "alone is minutes here; the rows say `analytic only`). Rows without a measurement were "
        "not run.", "",
        "| model | task | mode | client measured | client analytic | server measured "
        "| server analytic (full size) | step s |", "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for cell in result["cells"]:
        for mode, run in cell["runs"].items():
            measured = run.get("measured", {})
            as_run = run.get("analytic_as_run", {}).get("server_peak")
            server = _mib(measured.get("server_peak"))
            if as_run is not None and measured.get("server_peak") is not None:
                server += f" ({_mib(as_run)}) [{cell['server_blocks_measured']} block]"
            lines.append(
                f"| {cell['model']} | {cell['task']} | {mode} | "
                f"{_mib(measured.get('client_peak'))} | {_mib(run['analytic'].get('client_peak'))}"
                f" | {server} | {_mib(run['analytic'].get('server_peak'))} | "
                f"{measured.get('seconds', 'analytic only')} |")
    lines += ["", "## Ratios (measured / analytic)", "",
              "| model | task | FO-FO ÷ HOSL client | (SGD) | HOSL client ÷ inference "
              "| full-logits ÷ HOSL server |", "|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        r = cell["ratios"]

        def both(key: str, r: dict[str, Any] = r) -> str:
            measured = r["measured"][key]
            return f"{measured if measured is not None else '-'} / {r['analytic'][key]}"

        server = both("full_logits_over_hosl_server")
        if "analytic_as_run" in r:
            server = (f"{r['measured']['full_logits_over_hosl_server'] or '-'} (1-block server; "
                      f"analytic {r['analytic_as_run']['full_logits_over_hosl_server']}) / "
                      f"{r['analytic']['full_logits_over_hosl_server']} (19 blocks)")
        lines.append(f"| {cell['model']} | {cell['task']} | {both('fo_over_hosl_client')} | "
                     f"{both('fo_sgd_over_hosl_client')} | "
                     f"{both('hosl_client_over_inference')} | {server} |")
    lines += savings.markdown(result)
    lines += ["", "## Verdicts", ""]
    for v in result["verdicts"]:
        reason = f" — {v['reason']}" if v["reason"] else ""
        lines.append(f"- **{v['verdict']}**: {v['target']}, {v['model']} {v['task']}: "
                     f"{v['value']} ({v['source']}){reason}")
    if result["extra_splits"]:
        lines += ["", "## Other split points (measured)", "",
                  "| model | task | k | HOSL client | FO-FO client | inference | FO÷HOSL "
                  "(analytic) | HOSL÷inference |", "|---|---|---|---:|---:|---:|---|---:|"]
        for row in result["extra_splits"]:
            lines.append(
                f"| {row['model']} | {row['task']} | {row['split_layer']} | "
                f"{_mib(row['hosl_client'])} | {_mib(row['fo_client'])} | "
                f"{_mib(row['inference_client'])} | {row['fo_over_hosl']:.2f} "
                f"({row['analytic_fo_over_hosl']:.2f}) | {row['hosl_over_inference']:.3f} |")
    lines += ["", "## Split-point sweep (analytic only)", "",
              "| model | task | k | FO-FO ÷ HOSL client | HOSL client ÷ inference |",
              "|---|---|---|---:|---:|"]
    for row in result["analytic_split_sweep"]:
        lines.append(f"| {row['model']} | {row['task']} | {row['split_layer']} | "
                     f"{row['fo_over_hosl_client']} | {row['hosl_client_over_inference']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true",
                        help="measure OPT-125M at the SST-2-like length only (a smoke run)")
    parser.add_argument("--savings", action="store_true",
                        help="measure the memory-saving configurations (benchmarks/"
                             "memory_savings.py) into the memory.json already in --out")
    parser.add_argument("--rows", help="with --savings: comma-separated row keys (default all)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="re-derive verdicts and memory.md from a saved memory.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["verdicts"] = verdicts(result)
        result["rendered_by"] = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
        write_results(result, args.out)
        return 0
    if args.savings:
        return measure_savings(args, "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]))
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 1)
    result: dict[str, Any] = {
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "settings": {"batch": BATCH, "split_layer": SPLIT, "q": Q, "dtype": "float32",
                     "attention": "sdpa", "fo_optimizer": "adamw (fo-sgd: sgd)",
                     "wire_dtype": "bfloat16"},
        "cells": [], "extra_splits": [],
    }
    for name in ("opt-125m", "opt-1.3b"):
        model = None
        if any(PLAN[name, task] for task in TASKS) and (not args.quick or name == "opt-125m"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(shapes(name)[1], attn_implementation="sdpa")
        for task in TASKS:
            measure = model is not None and bool(PLAN[name, task])
            measure = measure and (not args.quick or task == "sst2-like")
            result["cells"].append(bench_cell(name, task, model, measure))
            if measure:
                result["extra_splits"] += extra_splits(name, task, model)
        del model
        gc.collect()
    result["analytic_split_sweep"] = split_sweep()
    result["verdicts"] = verdicts(result)
    result["wall_seconds"] = round(time.perf_counter() - started)
    result["load_average"] = {"start": load_start, "end": round(os.getloadavg()[0], 1)}
    result["peak_rss_bytes"] = peak_rss_bytes()
    write_results(result, args.out)
    return 0


def measure_savings(args: argparse.Namespace, command: str) -> int:
    """Add the memory-saving rows to <out>/memory.json (the main table stays as it is)."""
    path = args.out / "memory.json"
    if not path.is_file():
        raise SystemExit(f"{path}: run `python benchmarks/memory.py` first (--savings adds to it)")
    result = json.loads(path.read_text())
    keys = args.rows.split(",") if args.rows else [row.key for row in savings.SAVINGS]
    unknown = [key for key in keys if key not in savings.BY_KEY]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; rows: {', '.join(savings.BY_KEY)}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(builtin_config("opt-125m"),
                                             attn_implementation="sdpa")

    def save(partial: dict[str, Any]) -> None:
        path.write_text(json.dumps(partial, indent=2) + "\n")

    savings.run_rows(result, keys, model, k=SPLIT, batch=BATCH, lengths=TASKS, q=Q,
                     synthetic_batch=synthetic_batch, materialise_state=materialise_state,
                     full_logits_step=full_logits_step, save=save, log=log, machine=machine(),
                     command=command)
    result["verdicts"] = verdicts(result)
    (args.out / "memory.md").write_text(write_markdown(result))
    log(f"wrote {args.out}/memory.{{json,md}}")
    return 0


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "memory.md").write_text(write_markdown(result))
    log(f"wrote {out}/memory.{{json,md}} (measured in {result['wall_seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())
