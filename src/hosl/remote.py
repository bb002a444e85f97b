"""The client's side of a networked run: connect to `hosl serve`, and keep in step with it.

The server's committed step is the truth. At connect, and whenever the transport reports that the
server is somewhere else (`ResyncNeeded`), the client brings its own parameters to that step:

    base = the client's current step if it is behind the server, else its newest local
           checkpoint at or before the server's step, else the pretrained weights (step 0)
    replay steps base .. committed-1 from the server's journal

Replaying runs the unchanged training step with a transport that answers from the journal, so the
client applies exactly the ZO updates it would have applied live (same seeds, same losses, same
order) without a server forward pass; with lazy perturbed activations the client runs only the
clean forward pass of each replayed micro-batch. An interrupted run, on either side, therefore
ends with the same parameters as an uninterrupted one. `fo` updates need ∂L/∂h tensors, which the
journal does not keep: an `fo` client can only continue from the server's exact step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hosl.build import Run, split_parts
from hosl.checkpoint import is_checkpoint, read_checkpoint
from hosl.config import SPLIT_MODES, ServerConfig, TrainConfig
from hosl.dtypes import DTYPES
from hosl.errors import ConfigError, HoslError
from hosl.models.loading import load_pretrained
from hosl.transport.address import split_address
from hosl.transport.base import WireStats
from hosl.transport.grpc_client import GrpcTransport
from hosl.transport.handshake import identity_for
from hosl.transport.ledger import reply_from_entry
from hosl.transport.messages import (
    EvalReply,
    EvalRequest,
    FoStepReply,
    FoStepRequest,
    HoslStepReply,
    HoslStepRequest,
    ZoStepReply,
    ZoStepRequest,
)
from hosl.transport.security import channel_credentials


@dataclass(frozen=True)
class RemoteOptions:
    address: str  # HOST:PORT of `hosl serve`
    token: str | None = None
    tls: bool = False
    tls_ca: str | None = None  # PEM root certificate that signed the server's (implies TLS)
    reconnect_timeout: float = 120.0  # how long to wait for a server that is down or restarting
    step_timeout: float = 3600.0  # how long one reply may take (a slow CPU server is not dead)
    client_id: int | None = None  # one of many clients of the server (hosl.federated.networked)

    def __post_init__(self) -> None:
        split_address(self.address)
        if not 0 <= self.reconnect_timeout < math.inf:
            raise ConfigError(
                f"--reconnect-timeout {self.reconnect_timeout}: must be 0 or more seconds"
            )
        if not 0 < self.step_timeout < math.inf:
            raise ConfigError(f"--step-timeout {self.step_timeout}: must be more than 0 seconds")
        if self.client_id is not None and not 0 <= self.client_id < 1 << 20:
            raise ConfigError(f"--client-id {self.client_id}: must be 0..{(1 << 20) - 1}")


def run_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What decides the client's trajectory besides the model: a server with committed steps only
    serves clients whose fingerprint matches, since they will replay its journal (and a
    many-client server only clients of one fingerprint: they replay each other's records)."""
    run: dict[str, Any] = {
        "seed": cfg.seed,
        "q": cfg.zo.q,
        "eps": cfg.zo.eps,
        "client_lr": cfg.zo.lr,
        "batch_size": cfg.batch_size,
        "task": cfg.data.task,
        "max_length": cfg.data.max_length,
    }
    if cfg.embedding_noise() == "batch":  # (hosl only)
        # a journal replay draws the embedding's z on the looked-up rows only; absent: every
        # row (a server from before the setting recorded no key, and its runs drew on every row)
        run["embedding_noise"] = "batch"
    if cfg.client.lora():  # what θ_c is (and, with the seed, where it starts); absent: no adapter
        a = cfg.client
        run.update(client_adapter=a.adapter, client_lora_rank=a.lora_rank,
                   client_lora_alpha=a.lora_alpha, client_lora_targets=a.lora_targets)
    return run


def make_transport(
    cfg: TrainConfig,
    model: PreTrainedModel,
    opts: RemoteOptions,
    client: dict[str, int] | None = None,
) -> GrpcTransport:
    if cfg.mode not in SPLIT_MODES:
        raise ConfigError(
            f"--server needs a split mode ({', '.join(SPLIT_MODES)}), not {cfg.mode!r}"
        )
    if cfg.server != ServerConfig():
        raise ConfigError(
            "server.* configures an in-process server; a `hosl serve` process takes its adapter "
            "from its own config (hosl serve --set server.adapter=lora): drop server.* here"
        )
    identity = identity_for(
        cfg.model.name,
        model.config,
        cfg.model.split_layer,
        cfg.mode,
        cfg.model.dtype,
        cfg.grad_accum,
    )
    return GrpcTransport(
        opts.address,
        identity,
        wire_dtype=DTYPES[cfg.wire_dtype],
        token=opts.token,
        credentials=channel_credentials(opts.tls_ca, opts.tls),
        run_fingerprint=run_fingerprint(cfg),
        reconnect_timeout=opts.reconnect_timeout,
        step_timeout=opts.step_timeout,
        client=client,
    )


class ReplayTransport:
    """Answers steps from journal entries; counts their recorded bytes as the live run did."""

    def __init__(self, entries: list[dict[str, Any]], stats: WireStats) -> None:
        self._replies = {(e["step"], e["micro"]): e for e in entries}
        self.stats = stats

    def _reply(self, req: Any) -> Any:
        entry = self._replies[(req.step, req.micro)]
        self.stats.record(False, int(entry["up"]), int(entry["down"]))
        return reply_from_entry(entry)

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        return self._reply(req)

    def zo_step(self, req: ZoStepRequest) -> ZoStepReply:
        return self._reply(req)

    def fo_step(self, req: FoStepRequest) -> FoStepReply:
        raise HoslError("fo steps cannot be replayed from the server's journal")

    def evaluate(self, req: EvalRequest) -> EvalReply:
        raise HoslError("evaluation is never replayed")


def _checkpoint_at_or_before(run_dir: Path, step: int) -> tuple[int, dict, dict] | None:
    root = run_dir / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        try:
            n = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if n <= step and is_checkpoint(path):
            found.append((n, path))
    if not found:
        return None
    n, path = max(found)
    return n, read_checkpoint(path), json.loads((path / "meta.json").read_text())


@dataclass
class RemoteSession:
    """Keeps a client `Run` at the server's step. `batches(step)` gives a step's micro-batches."""

    run: Run
    cfg: TrainConfig
    transport: GrpcTransport
    run_dir: Path
    batches: Callable[[int], list]
    echo: Callable[[str], None] = print
    on_replayed: Callable[[int, float], None] = lambda step, loss: None

    def resync(self, at_step: int, committed: int) -> int:
        """Bring the client from `at_step` to the server's `committed` step; returns it."""
        self.transport.committed = committed
        client = self.run.client
        assert client is not None
        client.part.zero_grad(set_to_none=True)  # an fo step cut short left gradients behind
        if committed == at_step:
            return committed
        base = at_step if at_step < committed else self._restore(committed)
        # fo and cut-grad steps move the client by ∂L/∂h, which the server's journal does not keep
        kind = {"fo": "fo"}.get(self.cfg.mode) or {"cut-grad": "cut-grad"}.get(
            self.cfg.zo.estimator if self.cfg.mode == "hosl" else ""
        )
        if kind is not None and base != committed:
            raise HoslError(
                f"the server is at step {committed} and this {kind} client at step {at_step}, "
                f"with no checkpoint at step {committed}; {kind} steps cannot be replayed. "
                "Restart both sides from checkpoints of the same step"
            )
        if base < committed:
            self.echo(f"replaying steps {base}..{committed - 1} from the server's journal")
            self._replay(base, committed)
        return committed

    def _restore(self, step: int) -> int:
        """Load the newest local state at or before `step`; returns its step."""
        client = self.run.client
        assert client is not None
        found = _checkpoint_at_or_before(self.run_dir, step)
        if found is not None:
            base, state, meta = found
            client.load_state_dict(state["client"])
            self.transport.stats.load(meta.get("wire", {}))
            return base
        model, _ = load_pretrained(self.cfg.model.name, dtype=DTYPES[self.cfg.model.dtype])
        fresh, _ = split_parts(self.cfg, model, server=False)  # its adapter: a function of the seed
        client.part.load_state_dict(fresh.state_dict())
        if client.optimizer is not None:
            client.optimizer.state.clear()
        self.transport.stats.load({})
        return 0

    def _replay(self, start: int, stop: int) -> None:
        entries = self.transport.journal(start, stop)
        runner = self.run.runner
        live = runner.transport
        runner.transport = ReplayTransport(entries, self.transport.stats)
        try:
            for step in range(start, stop):
                self.on_replayed(step, self.run.train_step(self.batches(step), step))
        finally:
            runner.transport = live
