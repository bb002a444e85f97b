"""Assemble a run from its config: split the model, build the parties, optimizers and transport."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from hosl.algos.full_modes import FULL_STEPS, FullRunner
from hosl.algos.split_modes import SPLIT_STEPS, SplitRunner, run_concurrently, run_in_turn
from hosl.batching import Batch
from hosl.config import AdapterConfig, TrainConfig
from hosl.dtypes import DTYPES
from hosl.fused_sgd import FusedSgd
from hosl.master_weights import MasterWeights
from hosl.models.blocks import use_checkpointing
from hosl.models.lora import attach_lora
from hosl.models.split import ClientPart, ServerPart, split_model, unsplit_model
from hosl.optim import build_optimizer, build_scheduler, lr_factor
from hosl.parties.client import ClientParty
from hosl.parties.server import ServerParty
from hosl.sampler import step_indices
from hosl.transport.base import Transport
from hosl.transport.local import LocalTransport


@dataclass
class Run:
    """What the training loop drives: one step function and the objects it needs."""

    mode: str
    runner: SplitRunner | FullRunner
    step_fn: Callable[[Any, Sequence[Batch], int], float]
    client: ClientParty | None = None  # split modes
    server: ServerParty | None = None  # split modes, in-process (None when the server is remote)
    transport: Transport | None = None

    def train_step(self, micro_batches: Sequence[Batch], step: int) -> float:
        return self.step_fn(self.runner, micro_batches, step)

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.runner.scores(batch)

    def example_indices(
        self, num_examples: int, step: int, batch_size: int, grad_accum: int, seed: int
    ) -> list[list[int]]:
        """Training-set indices of `step`'s micro-batches (many clients: the stepping client's)."""
        return step_indices(num_examples, step, batch_size, grad_accum, seed)

    def state_dict(self) -> dict[str, Any]:
        if self.client is None:
            return {"full": self.runner.state_dict()}
        state = {"client": self.client.state_dict()}
        if self.server is not None:
            state["server"] = self.server.state_dict()
        return state

    def parties(self) -> dict[str, Any]:
        """The parties whose memory is measured here; an unsplit run is one party, the client,
        and a client of a remote server measures only itself."""
        if self.client is None:
            return {"client": self.runner}
        parties: dict[str, Any] = {"client": self.client}
        if self.server is not None:
            parties["server"] = self.server
        return parties

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.client is None:
            self.runner.load_state_dict(state["full"])
            return
        self.client.load_state_dict(state["client"])
        if self.server is not None:
            self.server.load_state_dict(state["server"])


def fo_optimizer(cfg: TrainConfig, params: Any) -> tuple[Any, Any]:
    """The FO optimizer and schedule of `cfg` over `params`; float32 master weights (see
    `hosl.master_weights`) when the parameters are stored in bf16."""
    params = [p for p in params if p.requires_grad]

    def make(tensors: list) -> torch.optim.Optimizer:
        return build_optimizer(
            tensors,
            cfg.optim.optimizer,
            cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )

    low_precision = any(p.dtype != torch.float32 for p in params)
    opt = MasterWeights(params, make) if low_precision else make(params)
    return opt, build_scheduler(opt, cfg.steps, cfg.optim.schedule)


def fo_client(cfg: TrainConfig, part: torch.nn.Module) -> tuple[Any, Any, FusedSgd | None]:
    """(optimizer, schedule, fused update) of an `fo` client, from `client.*` over `optim.*`."""
    if cfg.client.checkpointing:
        use_checkpointing(part)
    optim = dataclasses.replace(
        cfg.optim,
        optimizer=cfg.client.optimizer or cfg.optim.optimizer,
        lr=cfg.client.lr if cfg.client.lr is not None else cfg.optim.lr,
    )
    if cfg.client.fused_update:

        def lr_at(step: int) -> float:
            return optim.lr * lr_factor(step, cfg.steps, optim.schedule)

        return None, None, FusedSgd(part, lr_at, optim.weight_decay)
    opt, sched = fo_optimizer(dataclasses.replace(cfg, optim=optim), part.parameters())
    return opt, sched, None


def prepare_server_part(cfg: TrainConfig, part: torch.nn.Module) -> None:
    """The server's memory choices (`server.*`), the same in process and in `hosl serve`."""
    if cfg.server.checkpointing:
        use_checkpointing(part)


def with_adapter(part: torch.nn.Module, cfg: TrainConfig, who: str) -> torch.nn.Module:
    """`part` with the LoRA adapters `cfg.client` / `cfg.server` asks for (in place), if any."""
    spec: AdapterConfig = getattr(cfg, who)
    if spec.lora():
        attach_lora(part, rank=spec.lora_rank, alpha=spec.lora_alpha, targets=spec.lora_targets,
                    seed=cfg.seed, who=who)
    return part


def split_parts(
    cfg: TrainConfig, model: PreTrainedModel, *, client: bool = True, server: bool = True
) -> tuple[ClientPart, ServerPart]:
    """The model cut at `cfg.model.split_layer`, each kept part with its party's adapter; a
    `frozen` run's client has no trainable parameter (`requires_grad` off)."""
    client_part, server_part = split_model(model, cfg.model.split_layer)
    if client:
        with_adapter(client_part, cfg, "client")
        if cfg.mode == "frozen":  # nothing of it trains, so its checkpoint stores nothing of it
            client_part.requires_grad_(False)
    if server:
        with_adapter(server_part, cfg, "server")
    return client_part, server_part


def build_run(
    cfg: TrainConfig, model: PreTrainedModel, transport: Transport | None = None
) -> Run:
    """The run of `cfg`. Split modes talk to an in-process server unless `transport` reaches a
    remote one, in which case only the client's part is kept."""
    def zo_lr(step: int) -> float:
        return cfg.zo.lr * lr_factor(step, cfg.steps, cfg.optim.schedule)

    if cfg.mode in FULL_STEPS:
        part = with_adapter(unsplit_model(model), cfg, "client")  # the one party's adapter
        opt, sched = (
            fo_optimizer(cfg, part.parameters()) if cfg.mode == "fo-full" else (None, None)
        )
        runner = FullRunner(
            part=part,
            q=cfg.zo.q,
            eps=cfg.zo.eps,
            zo_lr=zo_lr,
            run_seed=cfg.seed,
            weight_decay=cfg.optim.weight_decay,
            optimizer=opt,
            scheduler=sched,
        )
        return Run(mode=cfg.mode, runner=runner, step_fn=FULL_STEPS[cfg.mode])

    client_part, server_part = split_parts(cfg, model, server=transport is None)
    client_opt, client_sched, fused = fo_client(cfg, client_part) if cfg.mode == "fo" else (
        None, None, None
    )
    # Both transports stream: each perturbed activation is computed when it is sent, and freed
    # before the next (the client holds one at a time, not 2Q).
    client = ClientParty(
        client_part, client_opt, client_sched, lazy_pairs=True,
        row_sparse=cfg.embedding_noise() == "batch", fused=fused,
    )
    server = None
    if transport is None:
        prepare_server_part(cfg, server_part)
        server_opt, server_sched = (
            fo_optimizer(cfg, server_part.parameters())
            if cfg.mode in ("hosl", "fo", "frozen")
            else (None, None)
        )
        server = ServerParty(server_part, server_opt, server_sched, grad_accum=cfg.grad_accum)
        # Both parties take what they receive in float32: a ZO party computes in float32 whatever
        # its parameters' dtype, and an FO party casts to its own dtype where it needs to.
        transport = LocalTransport(server, wire_dtype=DTYPES[cfg.wire_dtype], client=client,
                                   hidden_size=int(server_part.config.hidden_size))
    runner = SplitRunner(
        client=client,
        transport=transport,
        q=cfg.zo.q,
        eps=cfg.zo.eps,
        zo_lr=zo_lr,
        run_seed=cfg.seed,
        grad_accum=cfg.grad_accum,
        weight_decay=cfg.optim.weight_decay,
        # a remote server answers while the client computes (cut-grad's perturbed forwards)
        overlap=run_in_turn if server is not None else run_concurrently,
    )
    return Run(
        mode=cfg.mode,
        runner=runner,
        step_fn=SPLIT_STEPS[cfg.mode, cfg.zo.estimator],
        client=client,
        server=server,
        transport=transport,
    )
