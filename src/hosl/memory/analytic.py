"""Analytic per-party memory model of one training step in every hosl mode.

`estimate(model, split_layer=k, batch=B, length=L, mode=...)` returns, for each party, the bytes of
each component and a modelled peak (`total`). The components are not all alive at the same time,
so the total is not their sum: each party's step is modelled as a few phases, and

    total = resident (parameters + optimizer state) + the largest phase's working bytes.

Phases (compare `total` with `PartyMeter.peak_bytes`; a training loop may split or name its
meter phases differently, e.g. one "forward_backward" phase covers forward and backward here):
- forward   — a forward pass; FO parties end it holding every stored activation (plus the scored
              logits on the server), forward-only parties hold one block's working set at a time.
- backward  — walks the blocks from the top down: at each block the activations below it, the
              gradients above it, the block's new gradients and its backward working set are live.
- perturb   — ZO parties only: one parameter-sized noise tensor z (the largest tensor; z is drawn
              and applied one tensor at a time, in place), also used by the ZO update. The token
              embedding's z is drawn per row: a forward makes only the looked-up rows, the update
              one chunk of rows at a time (unless a head in the same party needs all of it).
- eval      — the HOSL server's forward-only evaluation of the 2Q perturbed losses.
- estimate  — the HOSL client with the cut-gradient estimator: the float64 dot products.
- update    — an FO optimizer step: gradients, state, and for AdamW two temporaries the size of
              the largest tensor (single-tensor AdamW as PyTorch runs it on CPU; the multi-tensor
              path it uses on CUDA makes them for all tensors at once).

Parties: the client owns the embeddings (learned positions, OPT's project_in) and blocks 0..k-1;
the server owns blocks k..N-1, the final norm, project_out and the output head (its own copy when
the model ties the head to the input embedding). `fo-full`, `zo-full` and `inference` without a
split layer have a single party, "model". Gradients are freed between steps (zero_grad with
set_to_none); ZO parties use plain SGD on the projected gradient, so they hold no optimizer state
whatever `optimizer` says.

Boundary activations are the (B, L, H) tensors crossing the cut that a party holds, counted
separately for its forward passes and for the rest of its step, as the split loops hold them
(one round trip per step; both transports stream the perturbed activations, each computed when
it is sent and freed once encoded):
- HOSL, `estimator="losses"`: the client holds its clean h (1) through its perturbed forwards and
  its update, one perturbed output at a time beyond it (that output is the forward's own); the
  server holds the 2Q+1 it received throughout.
- HOSL, `estimator="cut-grad"`: the client sends its clean h and frees it, then runs each pair's
  forwards holding dL/dh and h⁺_q (2); the server is an FO-FO server (1).
- FO-FO: the client's own output is one of its stored activations; it holds dL/dh (1) through
  backward. The server holds the h it received (1); the dL/dh it returns is made at the very end
  of its backward, when most activations are freed.
- ZO-ZO: the client holds h⁺_q while it runs h⁻_q (1; its clean forward only produces the masks
  the server needs); the server holds the 2Q it received.
- inference: the client's output is made after its last block's working set is freed (0); the
  server holds what it received (1).
`boundary_copies` replaces all of these with one count for every party and phase. Serialised
wire buffers (bytes, not tensors) are not counted.

Kernels assumed: `attention="eager"` (the default: the (B, heads, L, L) probabilities are
stored, as transformers' eager attention does) or `attention="sdpa"` (fused, nothing quadratic
stored); no KV cache, dropout off, transformers 5.x modelling code, CPU kernels. hosl loads
models with transformers' default, sdpa; `hosl memory` assumes it. Calibrated against
`PartyMeter` on whole-model inference and FO steps (see `hosl.memory.families`) and checked
against the real split training loops of every mode, per party (tests/test_memory_split.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from transformers import PretrainedConfig

from hosl.dtypes import BYTES as DTYPE_BYTES
from hosl.errors import ConfigError
from hosl.memory.adapters import LoraSpec, adapter_stored_per_token, adapter_tensor_bytes
from hosl.memory.families import (
    ATTENTION_KERNELS,
    ActivationTable,
    ModelShapes,
    Term,
    activation_table,
    model_shapes,
)
from hosl.memory.phases import PartPlan, party_phases
from hosl.zo.seeds import ROW_CHUNK_ELEMENTS

MODES = ("hosl", "fo", "zo", "frozen", "fo-full", "zo-full", "inference")
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adamw": 2}  # state tensors per parameter
LOGITS = ("scored", "full")
ESTIMATORS = ("losses", "cut-grad")  # how a HOSL client reads its projected gradients
COMPONENTS = (
    "parameters",
    "gradients",
    "optimizer_state",
    "stored_activations",
    "transient",
    "perturbation",
    "boundary",
    "scores",
)

# What each party does in each mode: "fo" (backprop), "zo" (forward-only with perturbations),
# "inference" (forward-only, no training).
_ROLES = {
    "hosl": {"client": "zo", "server": "fo"},
    "fo": {"client": "fo", "server": "fo"},
    "zo": {"client": "zo", "server": "zo"},
    "frozen": {"client": "inference", "server": "fo"},
    "fo-full": {"model": "fo"},
    "zo-full": {"model": "zo"},
    "inference": {"client": "inference", "server": "inference"},
}


@dataclass(frozen=True)
class PartyEstimate:
    """One party's modelled memory: components in bytes, phase peaks and the overall peak."""

    role: str
    components: dict[str, int]
    phases: dict[str, int]
    total: int
    peak_phase: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Result of `estimate`: the inputs it was computed for and one `PartyEstimate` per party."""

    model: str
    mode: str
    split_layer: int | None
    n_layers: int
    batch: int
    length: int
    dtype: str
    optimizer: str
    positions: int
    logits: str
    q: int
    attention: str
    parties: dict[str, PartyEstimate] = field(default_factory=dict)
    checkpointing: tuple[str, ...] = ()
    fused_update: bool = False
    adapters: dict[str, LoraSpec] = field(default_factory=dict)
    client_optimizer: str | None = None
    estimator: str = "losses"

    @property
    def client(self) -> PartyEstimate | None:
        return self.parties.get("client")

    @property
    def server(self) -> PartyEstimate | None:
        return self.parties.get("server")


def _resolve_config(model: PretrainedConfig | str) -> tuple[str, PretrainedConfig]:
    if isinstance(model, str):
        # Imported here so that passing a config object never imports the models package.
        from hosl.models.configs import builtin_config

        return model, builtin_config(model)
    name = getattr(model, "name_or_path", "") or getattr(model, "model_type", "model")
    return name, model


def _check(choice: str, allowed: tuple[str, ...], what: str) -> None:
    if choice not in allowed:
        raise ConfigError(f"unknown {what} {choice!r}; choose one of: {', '.join(allowed)}")


def _default_boundary_copies(mode: str, party: str, q: int,
                             estimator: str = "losses") -> tuple[int, int]:
    """(held during the party's forward passes, held during the rest of its step)."""
    if mode == "hosl" and estimator == "cut-grad":
        # the rest of the client's step: the ZO noise of h⁻_q's forward is drawn beside both
        return {"client": (2, 2), "server": (1, 1)}[party]
    copies = {
        ("hosl", "client"): (1, 1),
        ("hosl", "server"): (2 * q + 1, 2 * q + 1),
        ("fo", "client"): (0, 1),
        ("fo", "server"): (1, 1),
        ("frozen", "client"): (0, 1),
        ("frozen", "server"): (1, 1),
        ("zo", "client"): (1, 1),
        ("zo", "server"): (2 * q, 2 * q),
        ("inference", "client"): (0, 0),
        ("inference", "server"): (1, 1),
    }
    return copies.get((mode, party), (0, 0))


def _terms_bytes(terms: tuple[Term, ...], shapes: ModelShapes, tokens: int, length: int,
                 act_bytes: int) -> int:
    widths = shapes.widths(length)
    return round(tokens * sum(t.bytes_per_token(widths, act_bytes) for t in terms))


def _plan(shapes: ModelShapes, table: ActivationTable, party: str, split_layer: int | None, *,
          batch: int, length: int, act_bytes: int, param_bytes: int, positions: int, logits: str,
          boundary: tuple[int, int], checkpointing: bool = False, fused: bool = False,
          lora: LoraSpec | None = None) -> PartPlan:
    """Bytes of everything one party holds, before the role decides which of it is live when."""
    n_layers = shapes.n_layers
    if party == "client":
        layers, has_embedding, has_head = split_layer, True, False
    elif party == "server":
        layers, has_embedding, has_head = n_layers - split_layer, False, True
    else:
        layers, has_embedding, has_head = n_layers, True, True
    tokens = batch * length
    hidden = tokens * shapes.hidden * act_bytes  # one (B, L, H) tensor
    embedding_tensors = list(shapes.embedding_tensors) if has_embedding else []
    head_tensors = list(shapes.head_tensors) if has_head else []
    # A tied head shares the embedding's storage when one party owns both.
    if has_embedding and has_head and shapes.tied:
        head_tensors = head_tensors[:-1]
    scored = batch * (positions if logits == "scored" else length) * shapes.vocab
    # ZO noise of the token embedding, drawn per row in float32: in a forward, one row per
    # distinct token plus its (B, L, E) gather; in the update, one chunk of rows.
    row_wise = has_embedding and not (has_head and shapes.tied)
    rows_per_chunk = max(1, ROW_CHUNK_ELEMENTS // shapes.embed_dim)
    row_noise = max(
        min(tokens, shapes.vocab) * shapes.embed_dim * 4 + tokens * shapes.embed_dim * act_bytes,
        min(rows_per_chunk, shapes.vocab) * shapes.embed_dim * 4,
    ) if row_wise else 0

    def nbytes(terms: tuple[Term, ...]) -> int:
        return _terms_bytes(terms, shapes, tokens, length, act_bytes)

    def largest(alternatives: tuple[tuple[Term, ...], ...]) -> int:
        return max(nbytes(terms) for terms in alternatives)

    return PartPlan(
        layers=layers,
        act_bytes=act_bytes,
        embedding_params=[n * param_bytes for n in embedding_tensors],
        layer_params=[n * param_bytes for n in shapes.layer_tensors],
        head_params=[n * param_bytes for n in head_tensors],
        tied_in_party=has_embedding and has_head and shapes.tied,
        embedding_vocab_bytes=shapes.vocab * shapes.embed_dim * param_bytes,
        hidden=hidden,
        layer_stored=nbytes(table.layer_stored),
        layer_work=largest(table.forward_work),
        layer_backward_work=largest(table.backward_work),
        embedding_stored=nbytes(table.embedding_stored) if has_embedding else 0,
        embedding_held=nbytes(table.embedding_held) if has_embedding else 0,
        embedding_held_graph=nbytes(table.embedding_held_graph) if has_embedding else 0,
        head_stored=nbytes(table.head_stored) if has_head else 0,
        mask=nbytes(table.mask) if layers else 0,
        # Logits in the activation dtype plus the float32 log-softmax the loss is taken from.
        scores=scored * (act_bytes + 4) if has_head else 0,
        score_grads=scored * 8 if has_head else 0,
        # what crosses the cut is decoded in float32 whatever the model's dtype
        boundary_forward=boundary[0] * tokens * shapes.hidden * 4,
        boundary=boundary[1] * tokens * shapes.hidden * 4,
        row_wise_embedding=row_wise,
        row_noise=row_noise,
        param_bytes=param_bytes,
        adapter_params=adapter_tensor_bytes(shapes, lora) if lora else [],
        # A x per adapted layer, less what the frozen base no longer keeps for its gradients
        adapter_stored=(tokens * adapter_stored_per_token(shapes, lora) * act_bytes
                        - nbytes(table.frozen_unsaved)) if lora else 0,
        checkpointing=checkpointing,
        fused=fused,
        # a sparse gradient per embedding table (token, learned positions): a value row and an
        # int64 index per looked-up token
        sparse_embedding_grads=(
            tokens * (shapes.embed_dim * param_bytes + 8)
            + (tokens * (shapes.hidden * param_bytes + 8) if len(embedding_tensors) > 1 else 0)
        ) if has_embedding and fused else 0,
    )


def estimate(
    model: PretrainedConfig | str,
    *,
    split_layer: int | None = None,
    batch: int = 1,
    length: int = 128,
    mode: str = "hosl",
    dtype: str = "float32",
    optimizer: str = "sgd",
    positions: int = 1,
    logits: str = "scored",
    q: int = 1,
    boundary_copies: int | None = None,
    attention: str = "eager",
    client_optimizer: str | None = None,
    checkpointing: Collection[str] = (),
    fused_update: bool = False,
    adapters: Mapping[str, LoraSpec] | None = None,
    estimator: str = "losses",
) -> MemoryEstimate:
    """Model each party's memory for one step of `mode` (see the module docstring).

    `model` is a transformers config or a built-in name (`hosl.models.configs`). `positions` is
    the number of scored positions per sequence; `logits="full"` models a server that
    materialises (B, L, V) logits instead. `q` is the number of perturbation pairs.
    `attention` is the attention kernel the model runs: "eager" (stores (B, heads, L, L)
    probabilities) or "sdpa" (PyTorch's fused scaled_dot_product_attention).

    The memory-saving choices: `client_optimizer` is the `fo` client's own optimizer
    (`client.optimizer`; default `optimizer`); `checkpointing` names the parties ("client",
    "server", "model") whose blocks are checkpointed (`client.checkpointing`,
    `server.checkpointing`); `fused_update` is the `fo` client's fused SGD step
    (`client.fused_update`); `adapters` maps a party to the LoRA adapters it trains instead of
    its parameters (`hosl.memory.adapters`).

    `estimator` is how a HOSL client reads its projected gradients (`zo.estimator`): "losses"
    (the server evaluates the 2Q perturbed activations) or "cut-grad" (the server returns dL/dh
    and backpropagates once, as an FO-FO server; the client takes the pairs' differences).
    """
    _check(mode, MODES, "mode")
    _check(dtype, tuple(DTYPE_BYTES), "dtype")
    _check(optimizer, tuple(OPTIMIZER_STATES), "optimizer")
    _check(logits, LOGITS, "logits setting")
    _check(attention, ATTENTION_KERNELS, "attention kernel")
    _check(estimator, ESTIMATORS, "estimator")
    if estimator != "losses" and mode != "hosl":
        raise ConfigError(f"estimator {estimator!r} is hosl's; mode {mode} has none")
    if min(batch, length, positions, q) < 1:
        raise ConfigError("batch, length, positions and q must all be at least 1")
    if client_optimizer is not None:
        _check(client_optimizer, tuple(OPTIMIZER_STATES), "client optimizer")
    name, config = _resolve_config(model)
    shapes = model_shapes(config)
    table = activation_table(shapes.family, attention)
    roles = dict(_ROLES[mode])
    if mode == "inference" and split_layer is None:
        roles = {"model": "inference"}
    if "client" in roles:
        if split_layer is None or not 0 <= split_layer <= shapes.n_layers:
            raise ConfigError(
                f"mode {mode!r} needs a split layer between 0 and {shapes.n_layers}; "
                f"got {split_layer!r}"
            )
    else:
        split_layer = None
    adapters = dict(adapters or {})
    checkpointing = tuple(dict.fromkeys(checkpointing))
    _check_savings(mode, roles, checkpointing, fused_update, adapters,
                   client_optimizer or optimizer)
    param_bytes = DTYPE_BYTES[dtype]
    parties: dict[str, PartyEstimate] = {}
    for party, role in roles.items():
        # A ZO party computes in float32 whatever its parameters' dtype (hosl.zo.engine).
        act_bytes = 4 if role == "zo" else param_bytes
        copies = _default_boundary_copies(mode, party, q, estimator)
        if boundary_copies is not None and party != "model":
            copies = (boundary_copies, boundary_copies)
        plan = _plan(
            shapes, table, party, split_layer, batch=batch, length=length, act_bytes=act_bytes,
            param_bytes=param_bytes, positions=positions, logits=logits, boundary=copies,
            checkpointing=party in checkpointing, fused=fused_update and party == "client",
            lora=adapters.get(party),
        )
        own = client_optimizer if party == "client" and client_optimizer else optimizer
        state_per_param = OPTIMIZER_STATES[own] if role == "fo" else 0
        evaluates = mode == "hosl" and estimator == "losses" and party == "server"
        components, phases = party_phases(plan, role, state_per_param, evaluates=evaluates)
        if mode == "hosl" and estimator == "cut-grad" and party == "client":
            # g_q = ⟨∂L/∂h, h⁺_q − h⁻_q⟩ summed in float64: both (B, L, H) and their float64
            # copies (hosl.zo.estimate.directional_derivative), after the forward passes
            phases["estimate"] = components["parameters"] + 6 * plan.hidden
        peak_phase = max(phases, key=phases.get)
        parties[party] = PartyEstimate(role, components, phases, phases[peak_phase], peak_phase)
    return MemoryEstimate(
        model=name, mode=mode, split_layer=split_layer, n_layers=shapes.n_layers, batch=batch,
        length=length, dtype=dtype, optimizer=optimizer, positions=positions, logits=logits, q=q,
        attention=attention, parties=parties, checkpointing=checkpointing,
        fused_update=fused_update, adapters=adapters, client_optimizer=client_optimizer,
        estimator=estimator,
    )


def _check_savings(mode: str, roles: dict[str, str], checkpointing: tuple[str, ...],
                   fused_update: bool, adapters: dict[str, LoraSpec],
                   client_optimizer: str) -> None:
    """Refuse memory-saving choices that the mode's parties cannot make (as hosl.config does)."""
    backprop = ", ".join(p for p, r in roles.items() if r == "fo") or "none"
    for party in checkpointing:
        if roles.get(party) != "fo":
            raise ConfigError(
                f"checkpointing {party!r}: only a party that backpropagates stores activations "
                f"to checkpoint; in mode {mode}: {backprop}"
            )
    if fused_update and roles.get("client") != "fo":
        raise ConfigError(f"fused_update is the fo client's; mode {mode} has none")
    if fused_update and client_optimizer != "sgd":
        raise ConfigError("fused_update needs the client optimizer sgd (a step with no state)")
    for party, spec in adapters.items():
        if party not in roles:
            raise ConfigError(f"adapters on {party!r}: mode {mode} has no such party "
                              f"({', '.join(roles)})")
        if not isinstance(spec, LoraSpec):
            raise ConfigError(f"adapters[{party!r}] must be a LoraSpec, got {spec!r}")


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def format_estimate(est: MemoryEstimate) -> str:
    """A table with one column per party and one row per component, then the modelled peaks."""
    split = "" if est.split_layer is None else f", split at layer {est.split_layer}/{est.n_layers}"
    lines = [
        f"{est.model}: mode {est.mode}{split}, batch {est.batch} x length {est.length}, "
        f"{est.dtype}, optimizer {est.optimizer}, {est.positions} scored position(s), "
        f"{est.logits} logits, q={est.q}, {est.attention} attention",
    ]
    names = list(est.parties)
    rows = [(c.replace("_", " "), [est.parties[p].components[c] for p in names])
            for c in COMPONENTS]
    rows.append(("total (peak)", [est.parties[p].total for p in names]))
    width = max(len(label) for label, _ in rows)
    lines.append(" " * width + "".join(f"{p:>14}" for p in names))
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{human_bytes(v):>14}" for v in values))
    lines.append(
        "peak phase".ljust(width) + "".join(f"{est.parties[p].peak_phase:>14}" for p in names)
    )
    lines.append("total = parameters + optimizer state + the largest phase's working bytes; "
                 "the other components are not all live at once.")
    return "\n".join(lines)
