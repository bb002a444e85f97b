"""`hosl export`: one Hugging Face model from a finished run, loadable with plain transformers.

    the run's config -> its newest checkpoint (a networked client's: plus the `hosl serve`
    directory's checkpoint of the same step) -> the pretrained model, split and adapted as in
    training -> the checkpoint loaded into the parts -> adapters merged -> save_pretrained + the
    tokenizer

The parts are built from the model's own modules (see `hosl.models.split`), so loading the
checkpoint into them writes the trained values into the model itself; what remains is to merge
each LoRA layer into its base weight (W += (α/r)·B·A) and to give the model the server's head.

Tied embeddings. A model whose output head is its input embedding (SmolLM2, OPT, GPT-2) has one
matrix used at both ends. A split gives the client the embedding and the server its own copy of
the head (the server never sees the client's parameters), and each side trains its copy: after
training they differ. The export keeps both, untied: the client's trained embedding as the input
embedding, the server's trained head as `lm_head`, and `tie_word_embeddings: false` in the
config, so the exported model computes exactly what the split model computed. An unsplit run
(fo-full, zo-full) trained one tied matrix and is exported tied.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hosl.build import Run, build_run
from hosl.config import load_run_config
from hosl.dtypes import DTYPES
from hosl.errors import HoslError
from hosl.eval_cmd import _split_state
from hosl.models.loading import load_pretrained
from hosl.models.lora import merge_adapters
from hosl.rundir import check_empty


def export_run(
    run_dir: Path, output: Path, server_run: Path | None = None
) -> dict[str, Any]:
    """Write the trained model of `run_dir` to `output`; returns what export.json records."""
    if not (run_dir / "config.yaml").is_file():
        raise HoslError(f"{run_dir}: not a run directory (no config.yaml)")
    check_empty(output, "export directory")
    cfg = load_run_config(run_dir / "config.yaml")
    loaded = _split_state(cfg, run_dir, server_run, command="hosl export")
    if loaded is None:
        raise HoslError(f"{run_dir} has no checkpoint: let the run finish (or resume it) first")
    step, state = loaded
    if "server_config" in state:  # a networked run: the server's adapter is set on its side
        cfg = replace(cfg, server=state.pop("server_config"))
    model, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    run = build_run(cfg, model)
    run.load_state_dict(state)
    untied = _give_server_head(model, run)
    merged = merge_adapters(model)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    record = {
        "run": str(run_dir),
        "server_run": str(server_run) if server_run is not None else None,
        "step": step,
        "mode": cfg.mode,
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "merged_lora_layers": merged,
        "untied_embedding_and_head": untied,
        "output": str(output),
    }
    (output / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _give_server_head(model: Any, run: Run) -> bool:
    """Put the server's head in the model; True when that unties a tied embedding and head."""
    if run.server is None:
        return False  # unsplit: the model's own head (tied or not) is what trained
    head = run.server.part.head
    if model.get_output_embeddings() is head:
        return False  # an untied model: the server trained the model's own head
    model.set_output_embeddings(head)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True
