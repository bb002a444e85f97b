"""The analytic memory model of the memory-saving choices against the real training code.

Server activation checkpointing (`server.checkpointing`), the lean first-order client
(`client.checkpointing`, `client.fused_update`) and LoRA adapters each change which bytes a
party holds. As in tests/test_memory_split.py, real steps run through `build_run` (or, for
LoRA, a server part wrapped by peft itself) with each party metered, on tiny Llama- and
OPT-shaped models whose activations are of the order of their parameters, and
`estimate(...)` with the same choices must land within 15% of each party's measured peak.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

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
from hosl.errors import ConfigError
from hosl.memory.adapters import LoraSpec
from hosl.memory.analytic import estimate
from hosl.memory.measure import PartyMeter
from hosl.models.split import Activations, split_model
from hosl.optim import build_optimizer
from hosl.scoring import classification_loss
from test_memory_split import BATCH, HIDDEN, _batch, _config, assert_within_tolerance

LENGTH, SPLIT, Q = 64, 2, 1
# peft's get_peft_model asks transformers a deprecated question (neither is hosl's call)
PEFT_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
LEAN = ClientConfig(optimizer="sgd", checkpointing=True, fused_update=True)
FUSED = ClientConfig(optimizer="sgd", fused_update=True)
# (mode, client choices, server checkpointing, length). At 8 tokens parameters and gradients
# outweigh activations, so what a fused update saves shows.
SETUPS = {
    "hosl-server-ckpt": ("hosl", ClientConfig(), True, LENGTH),
    "fo-server-ckpt": ("fo", ClientConfig(), True, LENGTH),
    "fo-client-ckpt": ("fo", ClientConfig(checkpointing=True), False, LENGTH),
    "fo-client-fused": ("fo", FUSED, False, LENGTH),
    "fo-client-fused-short": ("fo", FUSED, False, 8),
    "fo-client-lean": ("fo", LEAN, False, LENGTH),
    "fo-both-lean": ("fo", LEAN, True, LENGTH),
}


def _measured(family: str, mode: str, client: ClientConfig, server_ckpt: bool,
              length: int = LENGTH) -> dict[str, int]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa")
    cfg = TrainConfig(
        mode=mode, steps=2, batch_size=BATCH, seed=0, wire_dtype="bfloat16",
        model=ModelConfig(name="tiny", split_layer=SPLIT),
        data=DataConfig(task="sst2", max_length=length),
        zo=ZoConfig(q=Q, eps=1e-3, lr=1e-4), optim=OptimConfig(optimizer="adamw", lr=1e-3),
        client=client, server=ServerConfig(checkpointing=server_ckpt),
    )
    run = build_run(cfg, model)
    meters = {name: party.start_metering(name) for name, party in run.parties().items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        run.train_step([_batch(length, generator)], step)
    peaks = {name: meter.peak_bytes for name, meter in meters.items()}
    if mode == "fo":  # ∂L/∂h, decoded where the client's meter cannot see it
        peaks["client"] += BATCH * length * HIDDEN * 4
    return peaks


def _modelled(family: str, mode: str, client: ClientConfig, server_ckpt: bool,
              length: int = LENGTH, **kw) -> dict[str, int]:
    checkpointing = [p for p, on in (("client", client.checkpointing), ("server", server_ckpt))
                     if on]
    est = estimate(
        _config(family), mode=mode, split_layer=SPLIT, batch=BATCH, length=length, q=Q,
        optimizer="adamw", client_optimizer=client.optimizer, checkpointing=checkpointing,
        fused_update=client.fused_update, attention="sdpa", **kw,
    )
    return {name: party.total for name, party in est.parties.items()}


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], tuple[dict[str, int], dict[str, int]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_memory_split.py
    try:
        return {
            (family, name): (_measured(family, *setup), _modelled(family, *setup))
            for family in ("llama", "opt")
            for name, setup in SETUPS.items()
        }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_analytic_total_is_within_15_percent_of_each_measured_party(results, family, setup):
    assert_within_tolerance(*results[family, setup])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_each_saving_saves_where_the_code_says_it_does(results, family):
    """Measured and modelled alike: checkpointing lowers the server's peak, the lean client's
    peak is below the plain FO client's, and a fused update below an AdamW client's."""
    plain = {
        "hosl": (_measured(family, "hosl", ClientConfig(), False),
                 _modelled(family, "hosl", ClientConfig(), False)),
        "fo": (_measured(family, "fo", ClientConfig(), False),
               _modelled(family, "fo", ClientConfig(), False)),
    }
    for side in (0, 1):
        assert results[family, "hosl-server-ckpt"][side]["server"] < plain["hosl"][side]["server"]
        assert results[family, "fo-server-ckpt"][side]["server"] < plain["fo"][side]["server"]
        lean = results[family, "fo-client-lean"][side]["client"]
        assert lean < results[family, "fo-client-fused"][side]["client"]
        assert results[family, "fo-client-fused"][side]["client"] < plain["fo"][side]["client"]


def _lora_server(family: str, spec: LoraSpec, checkpointing: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa")
    wrapped = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=spec.rank, target_modules=list(spec.targets),
                                         lora_dropout=0.0),
    )
    _, server = split_model(wrapped.base_model.model, SPLIT)
    if checkpointing:
        from hosl.models.blocks import use_checkpointing

        use_checkpointing(server)
    return server.eval()


@pytest.mark.filterwarnings(PEFT_WARNING)
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_server_estimate_matches_a_metered_peft_server_step(family, checkpointing):
    """A server part with peft's LoRA layers, trained with AdamW on its adapters only."""
    spec = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    server = _lora_server(family, spec, checkpointing)
    trainable = [p for p in server.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, "adamw", 1e-3)
    for p in trainable:  # the AdamW state every step after the first holds
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = _batch(LENGTH, torch.Generator().manual_seed(0))
    spec_ = batch.spec
    meter = PartyMeter("server")
    meter.set_resident_state(server, optimizer)
    wire = torch.randn(BATCH, LENGTH, HIDDEN).to(torch.bfloat16)
    with meter.phase("receive"):
        hidden = wire.float()  # (B, L, H) as received
    positions = torch.arange(LENGTH).expand(BATCH, LENGTH)
    with meter.phase("forward_backward"):
        final = server(Activations(hidden, batch.attention_mask, positions))  # (B, L, H)
        from hosl.scoring import candidate_scores

        scores = candidate_scores(final, server.head, spec_)  # (B, C)
        classification_loss(scores, spec_.labels).backward()
        del final, scores
    with meter.phase("update"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    est = estimate(
        _config(family), mode="hosl", split_layer=SPLIT, batch=BATCH, length=LENGTH, q=Q,
        optimizer="adamw", attention="sdpa", adapters={"server": spec},
        checkpointing=["server"] if checkpointing else [], boundary_copies=1,
    ).server
    assert_within_tolerance({"server": meter.peak_bytes}, {"server": est.total})
    # the trainable bytes are peft's own count of trainable parameters
    assert est.components["gradients"] == 4 * sum(p.numel() for p in trainable)
    assert est.components["optimizer_state"] == 2 * est.components["gradients"]


@pytest.mark.filterwarnings(PEFT_WARNING)
def test_lora_parameter_count_follows_rank_and_targets():
    """A (r x in) and B (out x r) per adapted layer and block, against peft's own count."""
    for targets in (("q_proj",), ("q_proj", "v_proj", "fc1")):
        spec = LoraSpec(rank=4, targets=targets)
        model = AutoModelForCausalLM.from_config(_config("opt"))
        wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
        peft_count = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        est = estimate(_config("opt"), mode="fo", split_layer=SPLIT, batch=1, length=8,
                       adapters={"client": spec, "server": spec})
        ours = sum(p.components["gradients"] for p in est.parties.values()) // 4
        assert ours == peft_count, (targets, ours, peft_count)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "zo", "checkpointing": ["server"]}, "only a party that backpropagates"),
        ({"mode": "hosl", "checkpointing": ["client"]}, "only a party that backpropagates"),
        ({"mode": "hosl", "fused_update": True}, "fo client's"),
        ({"mode": "fo", "fused_update": True, "optimizer": "adamw"}, "needs the client optimizer"),
        ({"mode": "fo", "adapters": {"client": LoraSpec(targets=("wq",))}}, "no LoRA target"),
        ({"mode": "fo-full", "adapters": {"server": LoraSpec()}}, "has no such party"),
        ({"mode": "fo", "estimator": "cut-grad"}, "is hosl's"),
        ({"mode": "hosl", "estimator": "grads"}, "unknown estimator"),
    ],
)
def test_savings_a_mode_cannot_make_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        estimate(_config("opt"), split_layer=SPLIT, **kwargs)


def test_hosl_memory_flags_reach_the_model(capsys):
    """`hosl memory --checkpointing/--lora/--fused-update/--client-optimizer/--estimator` model
    what `estimate` models with the same choices, and each changes the party it names."""
    import json

    from hosl import cli

    base = ["memory", "--model", "opt-125m", "--split-layer", "5", "--max-length", "512",
            "--json"]
    runs = {
        "plain": ([], {}),
        "server": (["--mode", "hosl", "--checkpointing", "server", "--lora", "server",
                    "--lora-rank", "4", "--lora-targets", "q_proj,fc1"],
                   dict(mode="hosl", checkpointing=["server"],
                        adapters={"server": LoraSpec(4, ("q_proj", "fc1"))})),
        "client": (["--mode", "fo", "--checkpointing", "client", "--fused-update",
                    "--client-optimizer", "sgd"],
                   dict(mode="fo", checkpointing=["client"], fused_update=True,
                        client_optimizer="sgd")),
        "cut-grad": (["--mode", "hosl", "--estimator", "cut-grad"],
                     dict(mode="hosl", estimator="cut-grad")),
    }
    totals = {}
    for name, (flags, kwargs) in runs.items():
        assert cli.main(base + flags) == 0
        printed = json.loads(capsys.readouterr().out)
        totals[name] = {p: v["total"] for p, v in printed["parties"].items()}
        est = estimate("opt-125m", split_layer=5, batch=16, length=512, optimizer="adamw",
                       attention="sdpa", **{"mode": "hosl", **kwargs})
        assert totals[name] == {p: v.total for p, v in est.parties.items()}, name
    assert totals["server"]["server"] < totals["plain"]["server"] / 2
    assert totals["server"]["client"] == totals["plain"]["client"]
    # cut-grad: the server backpropagates h alone, the client holds dL/dh beside h⁺_q
    assert totals["cut-grad"]["server"] < totals["plain"]["server"]
    assert totals["cut-grad"]["client"] > totals["plain"]["client"]
