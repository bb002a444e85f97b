"""`hosl client --client-id I`: one of many client processes training with one `hosl serve`.

Each client process reads only its own data (`--train-file`). All of them hold the same client
model θ_c, kept identical by update records, never by weights (see docs/many_clients.md and
`hosl.transport.sessions` for the server's side):

    connect, saying how many log records this θ_c already holds (0: the base model) and their
    chain digest (`hosl.federated.records.chain`)
    loop: ask for a turn -> replay the records it brings (everyone else's updates, in log order)
          and check the log's length and digest -> a catch-up (records, no turn)? ask again :
          done? stop : one ordinary split step on this client's next batch, at the server's
          global step -> upload the step's update record (the server appends it to the log)
    evaluate, save the checkpoint (θ_c and its log position), summary.json

The server decides when training ends (its --steps); the last turn answer (`done`) brings the
records this client still lacks, so every client ends holding the whole log: bit-identical θ_c.
A client that joins late starts from the base model and its first turn brings the whole log; a
client restarted with --resume starts from its checkpoint (θ_c after the log's first `cursor`
records, saved only once the server had confirmed them, with their digest) and catches up with
the tail; the server refuses it if the log no longer starts with those records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hosl.batching import collate
from hosl.build import build_run
from hosl.checkpoint import load_latest, save_checkpoint
from hosl.config import TrainConfig, check_split_layer, dump_config
from hosl.dtypes import DTYPES
from hosl.errors import ConfigError, Diverged, HoslError, check_finite_update
from hosl.evaluation import evaluate
from hosl.federated.records import LOG_GENESIS, ClientUpdate, chain, replay
from hosl.models.loading import load_pretrained
from hosl.models.lora import trainable_bytes
from hosl.models.split import num_layers
from hosl.remote import RemoteOptions, make_transport
from hosl.rundir import check_empty
from hosl.sampler import step_indices
from hosl.summary import StepTimes, build_summary, closing_lines
from hosl.transport.sessions import unpack_records

# A turn may wait for every other client's step; a server that goes away ends the wait at once
# (the stream breaks), so this only bounds a server that is alive and never answers.
TURN_WAIT_S = 7 * 24 * 3600.0
RECORD_MODES = ("hosl", "zo", "frozen")  # a ZO client's update is a record; fo's is not


def check_networked(cfg: TrainConfig) -> None:
    """What a networked many-client run refuses, before any model loads."""
    if cfg.clients.n > 1:
        raise ConfigError(
            "--client-id makes this process one client of a many-client `hosl serve`, holding "
            "its own data (--train-file); drop --clients"
        )
    c = cfg.clients
    if (c.schedule, c.order, c.fraction) != ("sequential", "round-robin", 1.0):
        raise ConfigError(
            f"clients.schedule {c.schedule} / clients.order {c.order} / clients.fraction "
            f"{c.fraction}: the server hands out the turns, so set them on `hosl serve` "
            "(--client-schedule, --set clients.order=..., --set clients.fraction=...), not on "
            "a client"
        )
    if cfg.mode not in RECORD_MODES:
        raise ConfigError(
            f"--client-id needs a client whose update is a record ({', '.join(RECORD_MODES)}), "
            f"not {cfg.mode!r}: an fo client's update is a gradient the size of its model"
        )


def train_networked(
    cfg: TrainConfig,
    remote: RemoteOptions,
    train_set: list,
    eval_set: list,
    *,
    resume_dir: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train as client `remote.client_id` of a many-client server (see the module doc)."""
    cid = remote.client_id
    assert cid is not None
    check_networked(cfg)
    if resume_dir is None and cfg.output:
        check_empty(Path(cfg.output))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    check_split_layer(cfg.model.split_layer, num_layers(model), cfg.model.name)
    transport = make_transport(cfg, model, remote)
    try:
        run = build_run(cfg, model, transport)
        del model
        party = run.client
        assert party is not None
        cursor, sync, elapsed = 0, {"down_bytes": 0, "up_bytes": 0, "steps": 0}, 0.0
        digest = LOG_GENESIS  # the chain digest of the `cursor` records θ_c holds
        loaded = load_latest(resume_dir) if resume_dir is not None else None
        if loaded is not None:
            _, state, meta = loaded
            if meta.get("client_id") != cid:
                raise ConfigError(f"--resume {resume_dir} is client {meta.get('client_id')}'s "
                                  f"run, not client {cid}'s: give --client-id "
                                  f"{meta.get('client_id')}")
            run.load_state_dict(state)
            cursor, sync = int(meta["log_cursor"]), dict(meta["sync"])
            if cursor and "log_digest" not in meta:
                raise ConfigError(f"--resume {resume_dir}: this checkpoint does not name the "
                                  "update records it holds (no log digest); start the client "
                                  "afresh from the base model (a new --output)")
            digest = bytes.fromhex(meta["log_digest"]) if cursor else LOG_GENESIS
            elapsed = float(meta.get("wall_seconds", 0.0))
            transport.stats.load(meta.get("wire", {}))
            echo(f"resumed {resume_dir} holding {cursor} update records")
        theta_bytes = trainable_bytes(party.part)
        transport.client = {"id": cid, "cursor": cursor, "digest": digest.hex(),
                            "examples": len(train_set), "theta_bytes": theta_bytes}
        transport.connect()  # a refused token, id or handshake fails here, before any file
        run_dir = resume_dir or _make_run_dir(cfg, cid)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        echo(f"client {cid} connected to {transport.address}")

        def batches(local_step: int) -> list:
            # this client's own data in its own shuffled epochs (seeded by seed + id, as in
            # process: client c of `hosl train --clients N` draws its file the same way)
            idx = step_indices(len(train_set), local_step, cfg.batch_size, cfg.grad_accum,
                               cfg.seed + cid)
            return [collate([train_set[i] for i in micro], tokenizer, cfg.data.max_length,
                            cfg.data.padding_side) for micro in idx]

        metrics = run_dir / "metrics.jsonl"
        meters = {name: p.start_metering(name) for name, p in run.parties().items()}
        if cfg.memory_steps == 0:  # measuring costs time on every tensor operation
            for p in run.parties().values():
                p.stop_metering()
        times, loss, report, step = StepTimes(), math.nan, None, 0
        t0 = time.perf_counter()
        bar = tqdm(disable=not progress, desc=f"client {cid}", unit="step")

        def save(step: int) -> None:
            meta = {"log_cursor": cursor, "log_digest": digest.hex(), "sync": sync,
                    "client_id": cid,
                    "wall_seconds": elapsed + time.perf_counter() - t0,
                    "wire": transport.stats.dump()}
            save_checkpoint(run_dir, step, run.state_dict(), meta)

        while True:
            turn, tensors = transport.turn(TURN_WAIT_S)
            raw = _raw_records(turn, tensors)
            records = _decoded(raw)
            replay(party.zo, records)  # everyone else's updates since this client's last turn
            cursor += len(records)
            for encoded in raw:
                digest = chain(digest, encoded)
            sync["down_bytes"] += sum(map(len, raw))
            _check_log(turn.get("log"), turn.get("digest"), cursor, digest)
            if turn.get("catch_up"):
                continue  # a late joiner's catch-up, in pieces: the turn comes after it
            if turn.get("done"):
                report = turn.get("report")
                step = _count(turn.get("committed"), "step count")  # the server's last step
                break
            step, local = _count(turn.get("step"), "step"), _count(turn.get("local_step"), "step")
            if local == cfg.memory_steps > 0:
                for p in run.parties().values():
                    p.stop_metering()
            tick = time.perf_counter()
            party.last_update = None
            # parallel rounds: θ_c stays the round's; this step's record comes back in the log
            deferred = party.defer_updates = turn.get("deferred") is True
            try:
                loss = run.train_step(batches(local), step)
                check_finite_update("the training loss", [loss])
            except Diverged as err:
                raise Diverged(f"training diverged at step {step + 1}: {err}; lower the "
                               "learning rate and start again") from None
            update = party.last_update
            record = None
            if update is not None:
                record = dataclasses.replace(update, step=step, client=cid).encode()
            length, logged = transport.commit(record)
            if record is not None and not deferred:
                cursor += 1
                digest = chain(digest, record)
            _check_log(length, logged, cursor, digest)
            sync["up_bytes"] += len(record or b"")
            sync["steps"] += 1
            times.add(time.perf_counter() - tick, metered=local < cfg.memory_steps)
            bar.update(1)
            with open(metrics, "a") as out:
                out.write(json.dumps({"step": step + 1, "local_step": local + 1, "loss": loss,
                                      "log_records": cursor}) + "\n")
            if cfg.checkpoint_every and (local + 1) % cfg.checkpoint_every == 0:
                save(step + 1)  # after the server confirmed the record: θ_c = log[:cursor]
        bar.close()
        wall = elapsed + time.perf_counter() - t0
        final = evaluate(run.scores, eval_set, tokenizer, batch_size=cfg.batch_size,
                         max_length=cfg.data.max_length, padding_side=cfg.data.padding_side,
                         predictions_path=run_dir / "predictions.jsonl")
        save(step)
        with open(metrics, "a") as out:
            out.write(json.dumps({"step": step, "eval_accuracy": final}) + "\n")
        summary = build_summary(
            cfg, run, run_dir, meters, n_eval=len(eval_set), zero_shot=None, final=final,
            loss=loss, wall_seconds=wall, times=times, server_address=transport.address,
        )
        summary["steps"] = step  # the server's steps, taken by all its clients together
        summary["clients"] = {
            **(report or {}),
            "client_id": cid,
            "log_cursor": cursor,
            "this_client": {"examples": len(train_set), **sync},
            "fedavg_bytes_per_client_round": 2 * theta_bytes,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for line in closing_lines(summary):
            echo(line)
        return summary
    finally:
        transport.close()


def _make_run_dir(cfg: TrainConfig, cid: int) -> Path:
    from hosl.rundir import claim_dir, stamp

    if cfg.output:
        path = check_empty(Path(cfg.output))
        path.mkdir(parents=True, exist_ok=True)
        return path
    return claim_dir(Path("runs"), f"client{cid}-{cfg.mode}-{cfg.data.task}-{stamp()}")


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HoslError(f"the server sent a turn with a bad {what}: {value!r:.40}")
    return value


def _raw_records(turn: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[bytes]:
    """The catch-up records of a turn reply, as the wire carried them."""
    try:
        return unpack_records(turn.get("sizes"), tensors.get("records"))
    except ValueError as err:
        raise HoslError(f"the server sent update records this client cannot read: {err}") \
            from None


def _decoded(raw: list[bytes]) -> list[ClientUpdate]:
    """`raw` records decoded; one line of error for anything broken."""
    try:
        return [ClientUpdate.decode(record) for record in raw]
    except Exception as err:  # struct.error, ValueError, ...: a record that does not parse
        raise HoslError(f"the server sent an update record this client cannot read: {err}") \
            from None


def _check_log(length: Any, logged: Any, cursor: int, digest: bytes) -> None:
    """This client's θ_c holds `cursor` records with chain digest `digest`: the server's log
    must say the same (its length and digest there), or the two have parted."""
    if length != cursor or logged != digest.hex():
        raise HoslError(
            f"this client holds {cursor} update records and the server's log {length!r:.20}, "
            "or their chain digests differ: the two client models have parted; start the client "
            "afresh from the base model (a new --output)"
        )
