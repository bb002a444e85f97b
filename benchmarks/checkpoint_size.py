"""Checkpoint size on disk: a party that trains LoRA adapters, or nothing, against one that
trains its part.

    python benchmarks/checkpoint_size.py --out benchmarks/results [--models tiny,smollm2-135m]

For each model (a tiny Llama, 3 blocks of width 32 as in the tests, and the demo model
SmolLM2-135M, float32) and each configuration (hosl split at k, with and without
`client.adapter lora` + `server.adapter lora`; fo-full with and without `client.adapter lora`;
hosl and frozen (a client that trains nothing, so stores nothing) at k and at a deep split, most
of the model on the client, as the frozen baseline runs in experiments/client_share),
the run is built with `build_run`, every optimizer's state is created (an AdamW step at learning
rate 0 on zero gradients, so the moments exist as after any real step), and `save_checkpoint`
writes a checkpoint; the table gives the bytes of each file. Sizes depend on shapes alone, so no
data and no real training step are needed. `legacy state.pt` is the same state written the
earlier way (one torch.save file), for comparison. Writes <out>/checkpoint_size.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from machine_info import machine
from memory import materialise_state
from transformers import AutoModelForCausalLM, LlamaConfig

from hosl.build import build_run
from hosl.checkpoint import save_checkpoint
from hosl.config import load_config
from hosl.models.loading import load_pretrained

CONFIGS = {
    "hosl": {"mode": "hosl"},
    "hosl + LoRA both sides": {"mode": "hosl", "client.adapter": "lora",
                               "server.adapter": "lora"},
    "fo-full": {"mode": "fo-full"},
    "fo-full + LoRA": {"mode": "fo-full", "client.adapter": "lora"},
    "frozen": {"mode": "frozen"},
}
SPLIT = {"tiny": 1, "smollm2-135m": 4}
DEEP_SPLIT = {"tiny": 2, "smollm2-135m": 24}
DEEP = {"hosl, deep split": {"mode": "hosl"}, "frozen, deep split": {"mode": "frozen"}}


def tiny_llama() -> torch.nn.Module:
    """The tests' tiny model (tests/conftest.py): vocabulary 40, width 32, 3 blocks, tied."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def measure(model: torch.nn.Module, name: str, sets: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(None, {"model.split_layer": SPLIT[name], "optim.optimizer": "adamw",
                             **sets})
    run = build_run(cfg, copy.deepcopy(model))
    for party in run.parties().values():
        materialise_state(party.optimizer)
    state = run.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), 1, state, {})
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
        torch.save(state, Path(tmp) / "legacy.pt")
        legacy = (Path(tmp) / "legacy.pt").stat().st_size
    trainable = sum(p.numel() for party in run.parties().values()
                    for p in party.part.parameters() if p.requires_grad)
    del run, state
    gc.collect()
    return {"k": None if cfg.mode.endswith("-full") else cfg.model.split_layer, "files": files,
            "total": sum(files.values()), "legacy_state_pt": legacy,
            "trainable_params": trainable}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Checkpoint size", "", f"Command: `{result['command']}`  ",
             f"Date: {result['date']}", "",
             "| model | configuration | k | trainable params | files (bytes) | total "
             "| legacy state.pt |",
             "|---|---|---:|---:|---|---:|---:|"]
    for model, rows in result["models"].items():
        for label, row in rows.items():
            files = ", ".join(f"{n} {b:,}" for n, b in row["files"].items() if n != "meta.json")
            k = "-" if row["k"] is None else row["k"]
            lines.append(f"| {model} | {label} | {k} | {row['trainable_params']:,} | {files} | "
                         f"{row['total']:,} | {row['legacy_state_pt']:,} |")
    for model, rows in result["models"].items():
        for base, lora in (("hosl", "hosl + LoRA both sides"), ("fo-full", "fo-full + LoRA")):
            ratio = rows[base]["total"] / rows[lora]["total"]
            lines.append(f"\n{model}: {lora} is {ratio:,.0f}x smaller than {base}.")
        for hosl, frozen in (("hosl", "frozen"), ("hosl, deep split", "frozen, deep split")):
            # the same server and no client optimizer either way: the difference is the client
            saved = rows[hosl]["total"] - rows[frozen]["total"]
            client = (rows[frozen]["files"]["client.safetensors"],
                      rows[hosl]["files"]["client.safetensors"])
            lines.append(f"\n{model}, k = {rows[frozen]['k']}: frozen's checkpoint is {saved:,} "
                         f"bytes smaller than hosl's: its client.safetensors holds no tensor "
                         f"({client[0]:,} bytes, against {client[1]:,}).")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="tiny,smollm2-135m")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
        "machine": machine(), "models": {},
    }
    for name in args.models.split(","):
        model = tiny_llama() if name == "tiny" else load_pretrained(name)[0]
        result["models"][name] = {
            **{label: measure(model, name, sets) for label, sets in CONFIGS.items()},
            **{label: measure(model, name, {"model.split_layer": DEEP_SPLIT[name], **sets})
               for label, sets in DEEP.items()},
        }
        print(json.dumps({name: {k: v["total"] for k, v in result["models"][name].items()}}))
        del model
        gc.collect()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "checkpoint_size.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
