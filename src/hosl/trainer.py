"""The training loop behind `hosl train`: one readable loop for every mode.

    check the config, data and run directory -> load model -> build the run -> evaluate
    zero-shot -> for each step: micro-batches, one step of the mode, log -> evaluate ->
    summary.json

Everything a run produces lands in its run directory: config.yaml, metrics.jsonl (one line per
logged step), predictions.jsonl, checkpoints/, summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hosl.batching import collate
from hosl.build import Run, build_run
from hosl.checkpoint import latest_step, load_latest, save_checkpoint
from hosl.config import TrainConfig, check_split_layer, dump_config, load_run_config
from hosl.dtypes import DTYPES
from hosl.errors import ConfigError, Diverged, check_finite_update
from hosl.evaluation import evaluate
from hosl.federated.partition import write_partition
from hosl.federated.run import FederatedRun, client_partition, federate
from hosl.models.loading import load_pretrained
from hosl.models.split import num_layers
from hosl.remote import RemoteOptions, RemoteSession, make_transport
from hosl.rundir import check_empty, claim_dir, stamp
from hosl.summary import StepTimes, build_summary, closing_lines
from hosl.tasks import load_examples
from hosl.transport.base import ResyncNeeded
from hosl.transport.grpc_client import GrpcTransport


def _examples(cfg: TrainConfig) -> tuple[list, list]:
    d = cfg.data
    # -1 asks for a whole split (hosl.tasks.ALL)
    train = load_examples(d.task, "train", file=d.train_file, n=d.train_examples, seed=cfg.seed)
    evals = load_examples(
        d.task, d.eval_split, file=d.eval_file, n=d.eval_sample_size(), seed=cfg.seed
    )
    return train, evals


def make_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory: `output` (which must be empty), else a unique default name."""
    if cfg.output:
        path = check_empty(Path(cfg.output))
        path.mkdir(parents=True, exist_ok=True)
        return path
    return claim_dir(Path("runs"), f"{cfg.mode}-{cfg.data.task}-{stamp()}")


def resume_config(run_dir: Path, steps: int | None) -> TrainConfig:
    """The saved config of a run, with only `steps` allowed to change, and only forward.

    A schedule other than `constant` is defined over the run's total steps, which the steps
    already taken followed; changing the total would make the resumed run differ from one
    trained straight to the new total, so it is refused.
    """
    cfg = load_run_config(run_dir / "config.yaml")
    done = latest_step(run_dir) or 0
    new = cfg.steps if steps is None else steps
    if new < done:
        raise ConfigError(
            f"--resume {run_dir}: the run is already at step {done}; --steps {new} would go "
            f"back (give --steps above {done} to extend it)"
        )
    if new == done and (run_dir / "summary.json").is_file():
        raise ConfigError(
            f"--resume {run_dir}: the run already finished its {done} steps, nothing to do "
            f"(give --steps above {done} to extend it)"
        )
    if new != cfg.steps and done > 0 and cfg.optim.schedule != "constant":
        raise ConfigError(
            f"--resume {run_dir}: its {cfg.optim.schedule} schedule runs over its "
            f"{cfg.steps} steps; only a constant-schedule run can change --steps"
        )
    return replace(cfg, steps=new)


def train(
    cfg: TrainConfig,
    *,
    resume_dir: Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    remote: RemoteOptions | None = None,
) -> dict[str, Any]:
    """Train `cfg`; with `remote`, against a `hosl serve` process instead of in-process."""
    # Every check that needs no model comes first: a mistake costs no model load.
    if remote is not None and remote.client_id is not None:  # one of many networked clients
        from hosl.federated.networked import check_networked, train_networked

        check_networked(cfg)
        train_set, eval_set = _examples(cfg)
        return train_networked(cfg, remote, train_set, eval_set, resume_dir=resume_dir,
                               progress=progress, echo=echo)
    train_set, eval_set = _examples(cfg)
    if remote is not None and cfg.clients.n > 1:
        raise ConfigError("--clients N runs N clients in process only; over the network start N "
                          "`hosl client --client-id I` processes, each with its own --train-file")
    labels = [ex.label for ex in train_set]
    # many clients: their data partition (which can fail for too few examples) before the model
    parts = client_partition(cfg, labels) if cfg.clients.n > 1 else None
    if resume_dir is None and cfg.output:
        check_empty(Path(cfg.output))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    if cfg.mode not in ("fo-full", "zo-full"):
        check_split_layer(cfg.model.split_layer, num_layers(model), cfg.model.name)
    transport = None
    try:
        if remote is not None:
            transport = make_transport(cfg, model, remote)
            transport.connect()  # a refused token or handshake fails here, before any file
        run = build_run(cfg, model, transport)
        del model  # the parts hold what they need; a remote client keeps only its own part
        if parts is not None:  # many clients sharing the client model (hosl.federated)
            run = federate(cfg, run, labels, parts=parts)
        run_dir = resume_dir or make_run_dir(cfg)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        if isinstance(run, FederatedRun):
            write_partition(run_dir, train_set, run.parts, cfg.clients.partition, cfg.seed)
        loop = _Loop(cfg, run, run_dir, tokenizer, train_set, eval_set, echo)
        return loop.train(resume_dir is not None, transport, progress)
    finally:
        if transport is not None:
            transport.close()


class _Loop:
    """One run's training: its data, metrics file, clock and checkpoints, then `train`."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: Run,
        run_dir: Path,
        tokenizer: Any,
        train_set: list,
        eval_set: list,
        echo: Callable[[str], None],
    ) -> None:
        self.cfg, self.run, self.run_dir, self.echo = cfg, run, run_dir, echo
        self.tokenizer, self.train_set, self.eval_set = tokenizer, train_set, eval_set
        self.metrics_path = run_dir / "metrics.jsonl"
        self.logged = _logged_steps(self.metrics_path)
        self.elapsed, self.t0 = 0.0, time.perf_counter()  # wall time of earlier sessions, now
        self.zero_shot: float | None = None

    def train(
        self, resume: bool, transport: GrpcTransport | None, progress: bool
    ) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        start = self.restore() if resume else 0
        session = self.connect(transport, start) if transport is not None else None
        if session is not None:
            start = session.resync(start, transport.committed)  # type: ignore[union-attr]
            self.echo(f"connected to {transport.address}; training from step {start}")
        if self.zero_shot is None and start == 0:
            self.zero_shot = self.accuracy()
            self.echo(f"zero-shot accuracy: {self.zero_shot:.4f} on {len(self.eval_set)} examples")
        self.t0 = time.perf_counter()
        bar = tqdm(initial=start, total=cfg.steps, disable=not progress,
                   desc=f"{cfg.mode} k={cfg.model.split_layer}", unit="step")
        meters = {name: party.start_metering(name) for name, party in run.parties().items()}
        times = StepTimes()
        step, loss, final = start, float("nan"), None
        while final is None:
            try:
                while step < cfg.steps:
                    if step == start + cfg.memory_steps:
                        for party in run.parties().values():
                            party.stop_metering()  # peaks repeat every step; tracking costs time
                    tick = time.perf_counter()
                    try:
                        loss = run.train_step(self.batches(step), step)
                        check_finite_update("the training loss", [loss])
                    except Diverged as err:
                        raise Diverged(
                            f"training diverged at step {step + 1}: {err}. The run directory "
                            "keeps everything up to its last checkpoint; lower the learning rate "
                            "(--fo-lr, --zo-lr) and start again"
                        ) from None
                    times.add(time.perf_counter() - tick, metered=step < start + cfg.memory_steps)
                    step += 1
                    bar.update(1)
                    self.after_step(step, loss, bar)
                train_seconds = self.clock()
                self.checkpoint(cfg.steps)
                final = self.accuracy(self.run_dir / "predictions.jsonl")
            except ResyncNeeded as lost:
                if session is None:
                    raise
                self.echo(f"the server is at step {lost.committed}, this client at step {step}; "
                          "resyncing")
                step = session.resync(step, lost.committed)
                bar.n = step
                bar.refresh()
        bar.close()
        self.log({"step": cfg.steps, "eval_accuracy": final})
        summary = build_summary(
            cfg, run, self.run_dir, meters, n_eval=len(self.eval_set), zero_shot=self.zero_shot,
            final=final, loss=loss, wall_seconds=train_seconds, times=times,
            server_address=transport.address if transport is not None else None,
        )
        if isinstance(run, FederatedRun):
            summary["clients"] = run.report(cfg.steps, [ex.label for ex in self.train_set],
                                            self.run_dir / "predictions.jsonl")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for line in closing_lines(summary):
            self.echo(line)
        return summary

    def after_step(self, done: int, loss: float, bar: tqdm) -> None:
        """Log, evaluate and checkpoint after step `done` (1-based), as the config asks."""
        cfg = self.cfg
        if done % cfg.log_every == 0 or done == cfg.steps:
            self.log({"step": done, "loss": loss, "wall_seconds": self.clock()})
            bar.set_postfix(loss=f"{loss:.4f}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            acc = self.accuracy()
            self.log({"step": done, "eval_accuracy": acc})
            self.echo(f"step {done}: eval accuracy {acc:.4f}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            self.checkpoint(done)

    def batches(self, step: int) -> list:
        cfg = self.cfg
        idx = self.run.example_indices(
            len(self.train_set), step, cfg.batch_size, cfg.grad_accum, cfg.seed
        )
        return [
            collate([self.train_set[i] for i in micro], self.tokenizer, cfg.data.max_length,
                    cfg.data.padding_side)
            for micro in idx
        ]

    def accuracy(self, predictions: Path | None = None) -> float:
        return evaluate(
            self.run.scores,
            self.eval_set,
            self.tokenizer,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.data.max_length,
            padding_side=self.cfg.data.padding_side,
            predictions_path=predictions,
        )

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line and close the file: a crash never loses a logged step."""
        if "loss" in record:
            if record["step"] in self.logged:
                return  # a step replayed or redone after a fault: already logged
            self.logged.add(record["step"])
        with open(self.metrics_path, "a") as metrics:
            metrics.write(json.dumps(record) + "\n")

    def clock(self) -> float:
        """Wall seconds of training so far, over every session of the run."""
        return self.elapsed + time.perf_counter() - self.t0

    def checkpoint(self, step: int) -> None:
        wire = self.run.transport.stats.dump() if self.run.transport is not None else {}
        meta = {"wall_seconds": self.clock(), "wire": wire, "zero_shot_accuracy": self.zero_shot}
        save_checkpoint(self.run_dir, step, self.run.state_dict(), meta)

    def restore(self) -> int:
        """Load the newest checkpoint, if any; returns its step."""
        loaded = load_latest(self.run_dir)
        if loaded is None:
            return 0
        start, state, meta = loaded
        self.run.load_state_dict(state)
        self.elapsed = float(meta.get("wall_seconds", 0.0))
        self.zero_shot = meta.get("zero_shot_accuracy")
        if self.run.transport is not None:
            self.run.transport.stats.load(meta.get("wire", {}))
        self.echo(f"resumed {self.run_dir} at step {start}")
        return start

    def connect(self, transport: GrpcTransport, start: int) -> RemoteSession:
        """The session that keeps this client at the server's step (replays are logged)."""
        return RemoteSession(
            self.run, self.cfg, transport, self.run_dir, self.batches, self.echo,
            on_replayed=lambda step, loss: self.log(
                {"step": step + 1, "loss": loss, "replayed": True}
            ),
        )


def _logged_steps(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    lines = (json.loads(x) for x in path.read_text().splitlines() if x.strip())
    return {x["step"] for x in lines if "loss" in x}
