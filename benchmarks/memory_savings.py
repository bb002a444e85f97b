"""Memory-saving configurations of OPT-125M, measured beside the analytic model.

    python benchmarks/memory.py --savings [--rows KEY,KEY] --out benchmarks/results

Each row is one real training step through `build_run` (or the full-logits baseline server of
benchmarks/memory.py) with every party metered, as in the main table: server activation
checkpointing (`server.checkpointing`), the lean first-order client (`client.checkpointing`,
`client.fused_update` with SGD) and LoRA adapters. Rows are written into <out>/memory.json
(key "savings") as each finishes, so an interrupted run keeps what it measured; the analytic
column, the ratios and the verdicts are derived when the report is written (`--render`).

LoRA rows need hosl's adapters (`client.adapter` / `server.adapter`); on a build without them
they are recorded as skipped, with the reason, and measured by the same command once present.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from hosl.batching import Batch
from hosl.build import build_run
from hosl.config import (
    ClientConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ServerConfig,
    TrainConfig,
    ZoConfig,
)
from hosl.memory.adapters import LoraSpec
from hosl.memory.analytic import estimate

# The adapters' settings: the analytic model's, and what the measured runs ask for.
LORA = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
# How a run asks for adapters on a party: dotted config keys (`hosl train --set ...`).
LORA_KEYS = {
    party: {f"{party}.adapter": "lora", f"{party}.lora_rank": LORA.rank,
            f"{party}.lora_targets": ",".join(LORA.targets)}
    for party in ("client", "server")
}
LEANEST = ClientConfig(optimizer="sgd", checkpointing=True, fused_update=True)


@dataclass(frozen=True)
class Saving:
    """One configuration: a split mode (or the "full-logits" baseline server) and its choices."""

    key: str
    label: str
    mode: str
    task: str
    server_checkpointing: bool = False
    client: ClientConfig = ClientConfig()
    lora: tuple[str, ...] = ()  # parties with LoRA adapters
    estimator: str = "losses"  # hosl's zo.estimator

    @property
    def client_checkpointing(self) -> bool:
        return self.client.checkpointing


SAVINGS = (
    # The lean FO client against HOSL's, at both lengths, each pair from one run.
    Saving("hosl-64", "HOSL", "hosl", "sst2-like"),
    Saving("fo-64", "FO-FO (AdamW client)", "fo", "sst2-like"),
    Saving("fo-ckpt-64", "FO-FO, client checkpointing", "fo", "sst2-like",
           client=ClientConfig(checkpointing=True)),
    Saving("fo-fused-64", "FO-FO, client fused SGD update", "fo", "sst2-like",
           client=ClientConfig(optimizer="sgd", fused_update=True)),
    Saving("fo-lean-64", "FO-FO, client checkpointing + fused SGD", "fo", "sst2-like",
           client=LEANEST),
    # Server checkpointing at the BoolQ-like shape, where stored activations dominate.
    Saving("hosl-ckpt-512", "HOSL, server checkpointing", "hosl", "boolq-like",
           server_checkpointing=True),
    Saving("full-ckpt-512", "full-logits server, checkpointing", "full-logits", "boolq-like",
           server_checkpointing=True),
    Saving("fo-lean-512", "FO-FO, client checkpointing + fused SGD", "fo", "boolq-like",
           client=LEANEST),
    Saving("fo-ckpt-512", "FO-FO, client checkpointing", "fo", "boolq-like",
           client=ClientConfig(checkpointing=True)),
    Saving("fo-fused-512", "FO-FO, client fused SGD update", "fo", "boolq-like",
           client=ClientConfig(optimizer="sgd", fused_update=True)),
    # The HOSL client at both lengths, with each estimator (cut-grad: the server returns ∂L/∂h).
    Saving("hosl-512", "HOSL", "hosl", "boolq-like"),
    Saving("hosl-cut-grad-64", "HOSL, cut-grad estimator", "hosl", "sst2-like",
           estimator="cut-grad"),
    Saving("hosl-cut-grad-512", "HOSL, cut-grad estimator", "hosl", "boolq-like",
           estimator="cut-grad"),
    # LoRA (needs hosl's adapters).
    Saving("hosl-lora-client-512", "HOSL, LoRA client", "hosl", "boolq-like", lora=("client",)),
    Saving("hosl-lora-server-512", "HOSL, LoRA server", "hosl", "boolq-like", lora=("server",)),
    Saving("hosl-lora-ckpt-512", "HOSL, LoRA client + server, server checkpointing", "hosl",
           "boolq-like", server_checkpointing=True, lora=("client", "server")),
    Saving("full-lora-ckpt-512", "full-logits server, LoRA + checkpointing", "full-logits",
           "boolq-like", server_checkpointing=True, lora=("server",)),
)
BY_KEY = {s.key: s for s in SAVINGS}


def adapters_available() -> str | None:
    """None when this build has hosl's adapters, else why the LoRA rows cannot run."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    if "adapter" in names:
        return None
    return ("needs hosl's LoRA adapters (server.adapter / client.adapter), which this build "
            "does not have: rerun `python benchmarks/memory.py --savings` on a build with them")


def train_config(row: Saving, k: int, batch: int, length: int, q: int) -> TrainConfig:
    """The TrainConfig of `row` (full-logits rows: the fo server it steps with full logits)."""
    mode = "fo" if row.mode == "full-logits" else row.mode
    cfg = TrainConfig(
        mode=mode, steps=1, batch_size=batch, seed=0, wire_dtype="bfloat16",
        model=ModelConfig(name="bench", split_layer=k),
        data=DataConfig(task="sst2", max_length=length),
        # every-row embedding noise: what results/ were measured with
        # (row-sparse noise, the hosl default since, is measured against it in embedding_noise.py)
        zo=ZoConfig(q=q, eps=1e-3, lr=1e-6, estimator=row.estimator, embedding_noise="all"),
        optim=OptimConfig(optimizer="adamw", lr=1e-5),
        client=row.client if mode == "fo" else ClientConfig(),
        server=ServerConfig(checkpointing=row.server_checkpointing),
    )
    if row.lora:
        from hosl.config import load_config, to_dict
        from hosl.results import flatten

        overrides = flatten(to_dict(cfg))
        for party in row.lora:
            overrides.update(LORA_KEYS[party])
        cfg = load_config(None, overrides)
    return cfg


def analytic(config: PretrainedConfig, row: Saving, k: int, batch: int, length: int,
             q: int) -> dict[str, int]:
    """The analytic model's per-party peaks for `row` (and the client's inference peak)."""
    mode = "fo" if row.mode == "full-logits" else row.mode
    checkpointing = tuple(p for p, on in (("client", row.client_checkpointing and mode == "fo"),
                                          ("server", row.server_checkpointing)) if on)
    client_optimizer = row.client.optimizer or "adamw"
    kw = dict(split_layer=k, batch=batch, length=length, q=q, attention="sdpa")
    est = estimate(
        config, mode=mode, optimizer="adamw", client_optimizer=client_optimizer,
        logits="full" if row.mode == "full-logits" else "scored", checkpointing=checkpointing,
        fused_update=row.client.fused_update, adapters={p: LORA for p in row.lora},
        estimator=row.estimator, **kw,
    )
    out = {f"{name}_peak": party.total for name, party in est.parties.items()}
    if row.mode == "full-logits":
        out.pop("client_peak")
    if mode == "hosl":
        inference = estimate(config, mode="inference",
                             adapters={p: LORA for p in row.lora if p == "client"}, **kw)
        out["inference_peak"] = inference.client.total
    return out


def measure(row: Saving, model: torch.nn.Module, k: int, data: Batch, q: int,
            materialise_state: Any, full_logits_step: Any) -> dict[str, Any]:
    """One metered step of `row` on a copy of `model` (a fused update hooks the parameters)."""
    model = copy.deepcopy(model)
    length = data.input_ids.shape[1]
    run = build_run(train_config(row, k, data.input_ids.shape[0], length, q), model)
    if row.mode == "full-logits":
        server = run.server
        assert server is not None
        materialise_state(server.optimizer)
        out = full_logits_step(server.part, server.optimizer, data)
    else:
        for party in run.parties().values():
            materialise_state(party.optimizer)
        meters = {name: party.start_metering(name) for name, party in run.parties().items()}
        start = time.perf_counter()
        run.train_step([data], 0)
        out = {"seconds": round(time.perf_counter() - start, 1)}
        for name, meter in meters.items():
            out[f"{name}_peak"] = meter.peak_bytes
            out[f"{name}_phases"] = meter.phase_peaks()
        if row.mode == "hosl":
            meter = run.client.start_metering("client")
            run.client.activations(data)  # inference_mode, metered as the client's "forward"
            out["inference_peak"] = meter.peak_bytes
    del run, model
    gc.collect()
    return out


def run_rows(result: dict[str, Any], keys: list[str], model: torch.nn.Module, *, k: int,
             batch: int, lengths: dict[str, int], q: int, synthetic_batch: Any,
             materialise_state: Any, full_logits_step: Any, save: Any, log: Any,
             machine: dict[str, Any], command: str) -> None:
    """Measure the rows `keys` into result["savings"]["rows"], saving after each one."""
    import datetime
    import os

    section = result.setdefault("savings", {"rows": {}})
    section.update({"model": "opt-125m", "batch": batch, "split_layer": k, "q": q,
                    "machine": machine})
    section.setdefault("commands", [])
    if command not in section["commands"]:
        section["commands"].append(command)
    missing = adapters_available()
    for key in keys:
        row = BY_KEY[key]
        entry: dict[str, Any] = {"date": datetime.date.today().isoformat()}
        if row.lora and missing:
            entry["skipped"] = missing
            log(f"{key}: skipped ({missing})")
        else:
            log(f"{key}: {row.label}, {row.task} ...")
            load = round(os.getloadavg()[0], 1)
            data = synthetic_batch(model.config.vocab_size, lengths[row.task])
            entry["measured"] = measure(row, model, k, data, q, materialise_state,
                                        full_logits_step)
            entry["load_average"] = {"start": load, "end": round(os.getloadavg()[0], 1)}
            peaks = {n.removesuffix("_peak"): v for n, v in entry["measured"].items()
                     if n.endswith("_peak")}
            log("  " + ", ".join(f"{n} {v / 2**20:,.0f} MiB" for n, v in peaks.items())
                + f", {entry['measured']['seconds']} s")
        section["rows"][key] = entry
        save(result)


# -- the report ------------------------------------------------------------------------------

PAPER_SERVER_GB = 45.98  # the paper's server memory for OPT-1.3B on BoolQ
MIB = 2**20


def derive(result: dict[str, Any], lengths: dict[str, int]) -> None:
    """Add each row's analytic peaks and the ratios between rows (from the saved measurements)."""
    section = result.get("savings")
    if not section:
        return
    from hosl.models.configs import builtin_config

    config = builtin_config(section["model"])
    k, batch, q = section["split_layer"], section["batch"], section["q"]
    for row in SAVINGS:  # rows not run yet get their analytic column too
        entry = section["rows"].setdefault(row.key, {})
        entry.update(label=row.label, mode=row.mode, task=row.task,
                     analytic=analytic(config, row, k, batch, lengths[row.task], q))
    section["ratios"] = ratios(section["rows"])
    section["opt_1.3b_boolq_analytic"] = paper_shape(lengths["boolq-like"], k, batch, q)


def _peaks(rows: dict[str, Any], key: str, party: str) -> tuple[int | None, int | None]:
    """(measured, analytic) peak of one party of one row."""
    entry = rows.get(key, {})
    name = f"{party}_peak"
    return entry.get("measured", {}).get(name), entry.get("analytic", {}).get(name)


def ratios(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Ratios between two rows' peaks, measured (when both were) and analytic."""
    pairs = [
        ("HOSL client ÷ leanest FO client (checkpointing + fused SGD)", "sst2-like",
         ("hosl-64", "client"), ("fo-lean-64", "client")),
        ("HOSL client ÷ leanest FO client (checkpointing + fused SGD)", "boolq-like",
         ("hosl-512", "client"), ("fo-lean-512", "client")),
        ("full-logits server ÷ HOSL server, both checkpointed", "boolq-like",
         ("full-ckpt-512", "server"), ("hosl-ckpt-512", "server")),
        ("full-logits server ÷ HOSL server, both with LoRA and checkpointed", "boolq-like",
         ("full-lora-ckpt-512", "server"), ("hosl-lora-ckpt-512", "server")),
        ("HOSL client with LoRA ÷ its inference peak", "boolq-like",
         ("hosl-lora-client-512", "client"), ("hosl-lora-client-512", "inference")),
        ("HOSL client ÷ its inference peak", "sst2-like",
         ("hosl-64", "client"), ("hosl-64", "inference")),
        ("HOSL client ÷ its inference peak", "boolq-like",
         ("hosl-512", "client"), ("hosl-512", "inference")),
        ("HOSL client, cut-grad estimator ÷ its inference peak", "sst2-like",
         ("hosl-cut-grad-64", "client"), ("hosl-cut-grad-64", "inference")),
        ("HOSL client, cut-grad estimator ÷ its inference peak", "boolq-like",
         ("hosl-cut-grad-512", "client"), ("hosl-cut-grad-512", "inference")),
    ]

    def ratio(a: int | None, b: int | None) -> float | None:
        return round(a / b, 3) if a and b else None

    out = []
    for what, task, first, second in pairs:
        (a, analytic_a), (b, analytic_b) = _peaks(rows, *first), _peaks(rows, *second)
        out.append({"what": what, "task": task, "measured": ratio(a, b),
                    "analytic": ratio(analytic_a, analytic_b)})
    return out


def _pick(r: dict[str, Any]) -> tuple[float | None, str]:
    return (r["measured"], "measured") if r["measured"] is not None else (r["analytic"],
                                                                          "analytic")


def paper_shape(length: int, k: int, batch: int, q: int) -> dict[str, int]:
    """Analytic server peaks of OPT-1.3B at the BoolQ-like shape, each saving and together."""
    kw = dict(split_layer=k, batch=batch, length=length, q=q, optimizer="adamw",
              attention="sdpa")
    configs = {
        "hosl": {},
        "hosl, server checkpointing": {"checkpointing": ["server"]},
        "hosl, LoRA server": {"adapters": {"server": LORA}},
        "hosl, LoRA server + checkpointing": {"checkpointing": ["server"],
                                              "adapters": {"server": LORA}},
    }
    out = {name: estimate("opt-1.3b", mode="hosl", **kw, **extra).server.total
           for name, extra in configs.items()}
    out["full-logits server, LoRA + checkpointing"] = estimate(
        "opt-1.3b", mode="fo", logits="full", checkpointing=["server"],
        adapters={"server": LORA}, **kw).server.total
    return out


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    section = result.get("savings")
    if not section or "ratios" not in section:
        return []
    by_what = {(r["what"], r["task"]): r for r in section["ratios"]}
    lora_server = by_what["full-logits server ÷ HOSL server, both with LoRA and checkpointed",
                          "boolq-like"]
    ckpt_server = by_what["full-logits server ÷ HOSL server, both checkpointed", "boolq-like"]
    client = by_what["HOSL client with LoRA ÷ its inference peak", "boolq-like"]
    rows = section["rows"]
    hosl_client = rows.get("hosl-lora-client-512", {}).get("analytic", {})
    boundary = section["batch"] * 512 * 768 * 4  # one float32 (B, L, H): the clean h
    server_value, server_source = _pick(lora_server)
    ckpt_value, ckpt_source = _pick(ckpt_server)
    client_value, client_source = _pick(client)
    out = [
        {"target": "full-logits server with the same LoRA adapters and checkpointing / HOSL "
                   "server >= 5x", "model": "opt-125m", "task": "boolq-like",
         "value": server_value, "source": server_source,
         "verdict": "met" if (server_value or 0) >= 5 else "missed",
         "reason": (f"with checkpointing alone (no adapters) the ratio is {ckpt_value} "
                    f"({ckpt_source}): both servers still hold parameters, gradients and AdamW "
                    "state; LoRA drops the frozen base's gradients and state, leaving the "
                    "(B x L x V) logits term to dominate the baseline")},
        {"target": "HOSL client with LoRA / its inference peak <= 1.05x", "model": "opt-125m",
         "task": "boolq-like", "value": client_value, "source": client_source,
         "verdict": "met" if (client_value or 9) <= 1.05 else "missed",
         "reason": None if (client_value or 9) <= 1.05 else (
             f"the client peaks in a perturbed forward while it holds its clean h "
             f"({boundary / MIB:.0f} MiB of float32 (B, L, H)) on top of an inference forward "
             f"({(hosl_client.get('inference_peak', 0)) / MIB:.0f} MiB); adapters change "
             "neither (a ZO client holds no gradients either way)")},
    ]
    worst = None
    for key, entry in rows.items():
        measured = entry.get("measured")
        if not measured:
            continue
        for name, value in measured.items():
            modelled = entry["analytic"].get(name)
            if name.endswith("_peak") and modelled:
                error = modelled / value - 1
                if worst is None or abs(error) > abs(worst[0]):
                    worst = (error, key, name.removesuffix("_peak"))
    if worst is not None:
        out.append({
            "target": "memory model within 15% of the meter, every measured new row and party",
            "model": "opt-125m", "task": "both", "value": f"{worst[0]:+.1%} ({worst[1]}, "
            f"{worst[2]})", "source": "largest deviation",
            "verdict": "met" if abs(worst[0]) < 0.15 else "missed", "reason": None})
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    section = result.get("savings")
    if not section or "ratios" not in section:
        return []

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / MIB:,.0f}"

    m = section["machine"]
    lines = [
        "", "## Memory-saving configurations (OPT-125M)", "",
        f"- Commands: {', '.join(f'`{c}`' for c in section['commands'])}; machine: "
        f"{m['cores']}-core CPU ({m['cpu']}), torch {m['torch']}, transformers "
        f"{m['transformers']}. Same settings as above (batch {section['batch']}, k = "
        f"{section['split_layer']}, Q = {section['q']}, AdamW unless the row says SGD, sdpa, "
        "bf16 wire); each row is one metered step on a fresh copy of the model.",
        "- Rows: server activation checkpointing (`server.checkpointing`), the lean FO client "
        "(`client.checkpointing`, `client.fused_update` with `client.optimizer: sgd`), LoRA "
        f"(rank {LORA.rank} on {', '.join(LORA.targets)}, analytic "
        "`adapters={party: LoraSpec(...)}`). The FO client's measured peak leaves out the "
        "∂L/∂h it receives (one (B, L, H) tensor, see above).",
        "- Step seconds: the machine was shared with other work (1-minute load average at each "
        "row's start and end in memory.json), indicative only.", "",
        "| configuration | task | client measured | client analytic | server measured | server "
        "analytic | client inference measured / analytic | step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in BY_KEY:
        entry = section["rows"].get(key)
        if entry is None:
            continue
        measured = entry.get("measured", {})
        est = entry["analytic"]
        inference = (f"{mib(measured.get('inference_peak'))} / {mib(est.get('inference_peak'))}"
                     if "inference_peak" in est else "")
        seconds = measured.get("seconds") or ("skipped" if "skipped" in entry else "not run")
        lines.append(
            f"| {entry['label']} | {entry['task']} | {mib(measured.get('client_peak'))} | "
            f"{mib(est.get('client_peak'))} | {mib(measured.get('server_peak'))} | "
            f"{mib(est.get('server_peak'))} | {inference} | {seconds} |")
    skipped = {e["skipped"] for e in section["rows"].values() if "skipped" in e}
    for reason in sorted(skipped):
        lines += ["", f"Skipped rows: {reason}."]
    lines += ["", "| ratio | task | measured | analytic |", "|---|---|---:|---:|"]
    for r in section["ratios"]:
        lines.append(f"| {r['what']} | {r['task']} | {r['measured'] or '-'} | "
                     f"{r['analytic']} |")
    paper = section["opt_1.3b_boolq_analytic"]
    lines += ["", f"OPT-1.3B at the BoolQ-like shape (analytic; the paper reports "
                  f"{PAPER_SERVER_GB} GB for its server):", "",
              "| server | GiB | GB |", "|---|---:|---:|"]
    for name, value in paper.items():
        lines.append(f"| {name} | {value / 2**30:.2f} | {value / 1e9:.2f} |")
    return lines
