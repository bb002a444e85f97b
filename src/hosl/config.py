"""Run configuration: frozen dataclasses, YAML files, dotted overrides, strict validation.

`hosl train --config run.yaml --set zo.q=4 --q 2`: the YAML file is read first, then `--set`
dotted overrides, then the explicit flags. Unknown keys are an error, never silently ignored. The
resolved configuration is written into every run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hosl.dtypes import DTYPES, canonical_name
from hosl.errors import ConfigError
from hosl.optim import OPTIMIZERS, SCHEDULES

# The split modes (a client and a server) and the unsplit baselines. `frozen` is HOSL with a client
# that never trains: the baseline that says what the ZO client buys.
SPLIT_MODES = ("hosl", "fo", "zo", "frozen")
MODES = (*SPLIT_MODES, "fo-full", "zo-full")
# The modes with a ZO party: what Q, ε and the embedding noise can change.
ZO_MODES = ("hosl", "zo", "zo-full")
# How the hosl client's projected gradients are read: `losses`, the paper's 2Q server losses, or
# `cut-grad`, ⟨∂L/∂h, h⁺ − h⁻⟩/2ε from the server's one ∂L/∂h at the clean h.
ESTIMATORS = ("losses", "cut-grad")
# Where an embedding's z is drawn for the update: on every row, or on the rows the step's batch
# looked up (the gradient is zero on the others, so the estimate stays unbiased; see README).
# `auto`, the default, is `batch` wherever it is valid (a hosl client whose embedding trains) and
# `all` elsewhere: `TrainConfig.embedding_noise()`.
EMBEDDING_NOISE = ("auto", "all", "batch")
# How many clients take their steps (see hosl.federated): one client's batch per step, in turn.
CLIENT_SCHEDULES = ("sequential", "parallel")
# Built-in evaluation splits are sampled to this many examples unless data.eval_examples says
# otherwise; a user's --eval-file is read whole and in order.
DEFAULT_EVAL_EXAMPLES = 500


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    split_layer: int = 4  # k: the client holds the embeddings and blocks 0..k-1
    dtype: str = "float32"


@dataclass(frozen=True)
class DataConfig:
    task: str = "rt"
    train_file: str | None = None
    eval_file: str | None = None
    # None: 1000 train / 500 eval examples of a built-in split, every row of a user's file.
    train_examples: int | None = None
    eval_examples: int | None = None
    eval_split: str = "test"
    max_length: int = 64
    padding_side: str = "right"

    def eval_sample_size(self) -> int | None:
        """n for the evaluation examples: as asked, else every row of a file, else 500."""
        if self.eval_examples is not None or self.eval_file is not None:
            return self.eval_examples
        return DEFAULT_EVAL_EXAMPLES


@dataclass(frozen=True)
class ZoConfig:
    q: int = 1  # perturbation pairs per step
    eps: float = 1e-3  # perturbation scale ε
    # ZO learning rate (--zo-lr): the client's in hosl/zo, the server's too in zo, the whole
    # model's in zo-full. 1e-4 won the ZO rate search (experiments/lr_zo.yaml).
    lr: float = 1e-4
    estimator: str = "losses"  # hosl only: see ESTIMATORS
    embedding_noise: str = "auto"  # batch: hosl only; see EMBEDDING_NOISE


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # FO optimizer of the server (and of the client in `fo`)
    # FO learning rate (--fo-lr): the server's in hosl/fo, the client's too in fo, the whole
    # model's in fo-full. 3e-5 won the AdamW rate search (experiments/lr_fo.yaml).
    lr: float = 3e-5
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"


# A party's adapter: none (every parameter of its part trains) or LoRA (only the adapters train).
ADAPTERS = ("none", "lora")


@dataclass(frozen=True)
class AdapterConfig:
    """A party's adapter (`client.*`, `server.*`; in fo-full and zo-full `client.*` adapts the
    whole model, which that one party trains). See `hosl.models.lora`."""

    adapter: str = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # must stay 0: every part runs in eval mode
    # module names, comma-separated (a YAML list is accepted); None: the family's default
    lora_targets: str | None = None

    def lora(self) -> bool:
        return self.adapter == "lora"



@dataclass(frozen=True)
class ClientConfig(AdapterConfig):
    """The client's adapter, and the `fo` client's own choices: what a memory-conscious
    first-order client reaches for."""

    optimizer: str | None = None  # None: optim.optimizer (the server's)
    lr: float | None = None  # None: optim.lr
    checkpointing: bool = False  # recompute each block's activations in the backward
    fused_update: bool = False  # step each tensor as its gradient arrives (needs sgd, no accum)


# The split modes whose server backpropagates (and so stores activations for a backward).
FO_SERVER_MODES = ("hosl", "fo", "frozen")


@dataclass(frozen=True)
class ServerConfig(AdapterConfig):
    """The server's adapter and memory choices (in process; a `hosl serve` reads its own config).
    Checkpointing applies in every split mode whose server backpropagates."""

    checkpointing: bool = False  # recompute each server block's activations in the backward


@dataclass(frozen=True)
class ClientsConfig:
    """Many clients sharing one client model, in process (see docs/many_clients.md)."""

    n: int = 1  # clients; 1 is the ordinary single-client run
    partition: str = "iid"  # how the training set is shared: iid | dirichlet:ALPHA
    # sequential: one client's batch per step, clients in turn, each on the θ_c its predecessor
    # left; parallel: every client of a round steps on the θ_c the round began with
    schedule: str = "sequential"
    order: str = "round-robin"  # which clients step in a round: round-robin | sampled
    fraction: float = 1.0  # share of the clients that step in each round


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "hosl"
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 1
    memory_steps: int = 3         # steps whose per-party memory is measured (peaks are per step)
    seed: int = 0
    output: str | None = None  # run directory; default runs/<mode>-<task>-<time>
    wire_dtype: str = "float32"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zo: ZoConfig = field(default_factory=ZoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)

    def embedding_noise(self) -> str:
        """`all` or `batch`: zo.embedding_noise with `auto` resolved. Row-sparse noise needs a
        ZO client whose embedding trains and is only looked up: a hosl client without adapters
        (in zo and zo-full the ZO side also perturbs a head that reads every row)."""
        if self.zo.embedding_noise != "auto":
            return self.zo.embedding_noise
        return "batch" if self.mode == "hosl" and not self.client.lora() else "all"


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-6` as a string (YAML 1.1); learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Safe YAML (no arbitrary objects) that also reads `1e-6` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Parse a YAML or command-line value into the field's type, or explain why not."""
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    target = base[0]
    if key.endswith(".lora_targets"):
        value = _module_names(value, key)
    if isinstance(value, str) and hint is not str:
        if value.lower() in ("null", "none") and type(None) in typing.get_args(hint):
            return None
        if target is not str:  # an optional string is taken as written (q_proj,v_proj)
            value = load_yaml(value)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {target.__name__}, got {value!r}")
    return value


def _module_names(value: Any, key: str) -> Any:
    """`lora_targets` as a YAML list (`[q_proj, v_proj]`, also in `--set`) -> the comma-separated
    string the field holds (`q_proj,v_proj`); any other value is left to the usual checks."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = load_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: {value!r} is not a YAML list of module names") from None
    if not isinstance(value, list):
        return value
    if not all(isinstance(name, str) and name.strip() and "," not in name for name in value):
        raise ConfigError(f"{key}: expected module names (e.g. [q_proj, v_proj]), got {value!r}")
    return ",".join(name.strip() for name in value)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: " + ", ".join(sorted(names))
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of its keys")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


# What a key missing from a run directory's config.yaml meant when that file was written: a run
# from before zo.embedding_noise existed drew noise on every row (today's default is `auto`).
_SAVED_RUN_DEFAULTS = {"zo.embedding_noise": "all"}


def _has_dotted(tree: dict[str, Any], key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_run_config(path: str | Path) -> TrainConfig:
    """A run directory's config.yaml, read as the run ran (see _SAVED_RUN_DEFAULTS)."""
    return load_config(path, saved_run=True)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    saved_run: bool = False,
) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> validated TrainConfig, `auto` values resolved
    (so a run's config.yaml says what it ran, and a saved config compares with a planned one).
    `saved_run`: the file is a run directory's config.yaml (use load_run_config)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys")
        tree = loaded
    for key, value in (_SAVED_RUN_DEFAULTS if saved_run else {}).items():
        if not _has_dotted(tree, key):
            _set_dotted(tree, key, value)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = canonical_dtypes(_build(TrainConfig, tree, ""))
    validate(cfg)
    noise = dataclasses.replace(cfg.zo, embedding_noise=cfg.embedding_noise())
    return dataclasses.replace(cfg, zo=noise)


def validate(cfg: TrainConfig) -> None:
    """Check every value whose meaning does not depend on the model (k is checked at split time)."""
    checks: list[tuple[bool, str]] = [
        (cfg.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}"),
        (cfg.steps >= 0, f"steps must be >= 0, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.eval_every >= 0, "eval_every must be >= 0"),
        (cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
        (cfg.log_every >= 1, "log_every must be >= 1"),
        (cfg.memory_steps >= 0, "memory_steps must be >= 0"),
        (
            cfg.zo.q >= 1,
            f"zo.q (the number of perturbation pairs, --q) must be >= 1, got {cfg.zo.q}",
        ),
        (cfg.zo.eps > 0, f"zo.eps (the perturbation scale, --eps) must be > 0, got {cfg.zo.eps}"),
        (
            cfg.zo.lr > 0,
            f"zo.lr (the ZO learning rate, --zo-lr) must be > 0, got {cfg.zo.lr}",
        ),
        (
            cfg.zo.estimator in ESTIMATORS,
            f"zo.estimator must be one of {', '.join(ESTIMATORS)}, got {cfg.zo.estimator!r}",
        ),
        (
            cfg.zo.estimator == "losses" or cfg.mode == "hosl",
            f"zo.estimator cut-grad needs mode hosl (a ZO client and a server that backpropagates "
            f"to the cut), not {cfg.mode}",
        ),
        (
            cfg.zo.embedding_noise in EMBEDDING_NOISE,
            f"zo.embedding_noise must be one of {', '.join(EMBEDDING_NOISE)}, "
            f"got {cfg.zo.embedding_noise!r}",
        ),
        (
            cfg.zo.embedding_noise != "batch" or cfg.mode == "hosl",
            f"zo.embedding_noise batch needs mode hosl, where the client's embedding is only "
            f"looked up; in {cfg.mode} the ZO side also perturbs the output head, which reads "
            "every row of a tied embedding, so its gradient is not zero off the batch's rows",
        ),
        (
            cfg.client.optimizer is None or cfg.client.optimizer in OPTIMIZERS,
            f"client.optimizer must be one of {', '.join(OPTIMIZERS)}, "
            f"got {cfg.client.optimizer!r}",
        ),
        (cfg.client.lr is None or cfg.client.lr > 0, "client.lr must be > 0"),
        (
            cfg.mode == "fo" or _fo_client_defaults(cfg.client),
            f"client.optimizer, client.lr, client.checkpointing and client.fused_update configure "
            f"the first-order client of mode fo; mode {cfg.mode} has none",
        ),
        (
            not cfg.client.fused_update
            or (cfg.client.optimizer or cfg.optim.optimizer) == "sgd",
            "client.fused_update needs client.optimizer sgd: a tensor's step may use nothing but "
            "its own gradient (no optimizer state)",
        ),
        (
            not cfg.client.fused_update or cfg.grad_accum == 1,
            "client.fused_update steps each tensor during the backward: it cannot accumulate "
            "micro-batches (grad_accum must be 1)",
        ),
        (
            not cfg.server.checkpointing or cfg.mode in FO_SERVER_MODES,
            f"server.checkpointing recomputes what a server's backward pass needs; mode "
            f"{cfg.mode} has no server that backpropagates (a ZO server stores no activations): "
            f"drop it, or use mode {', '.join(FO_SERVER_MODES)}",
        ),
        (
            cfg.optim.lr > 0,
            f"optim.lr (the FO learning rate, --fo-lr) must be > 0, got {cfg.optim.lr}",
        ),
        (
            cfg.optim.optimizer in OPTIMIZERS,
            f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, "
            f"got {cfg.optim.optimizer!r}",
        ),
        (
            cfg.optim.schedule in SCHEDULES,
            f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}",
        ),
        (cfg.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)} "
                                   f"(or bf16, fp16, fp32), got {cfg.model.dtype!r}"),
        (cfg.wire_dtype in DTYPES, f"wire_dtype must be one of {', '.join(DTYPES)}"),
        (
            cfg.model.dtype != "float16",
            "model.dtype float16 is not supported: its 5-bit exponent overflows in training "
            "(AdamW gives NaN in one step); use bfloat16 for half the memory, or float32",
        ),
        (cfg.data.max_length >= 2, "data.max_length must be >= 2"),
        (cfg.data.padding_side in ("left", "right"), "data.padding_side must be left or right"),
        (
            cfg.data.train_examples != 0 and cfg.data.eval_examples != 0,
            "train_examples and eval_examples must be positive, or -1 for the whole set",
        ),
    ]
    for ok, message in checks + _adapter_checks(cfg):
        if not ok:
            raise ConfigError(message)
    validate_clients(cfg)
    check_split_layer(cfg.model.split_layer)
    for key in ("train_file", "eval_file"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"--{key.replace('_', '-')} {value}: no such file")


def _fo_client_defaults(client: ClientConfig) -> bool:
    return (client.optimizer, client.lr, client.checkpointing, client.fused_update) == (
        None, None, False, False
    )


def _adapter_fields(config: AdapterConfig) -> dict[str, Any]:
    """The adapter settings of a party's section (client.* and server.* hold others too)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(AdapterConfig)}


def _adapter_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """The adapter settings of both parties, and the modes and settings they combine with."""
    checks: list[tuple[bool, str]] = []
    for who in ("client", "server"):
        a: AdapterConfig = getattr(cfg, who)
        checks += [
            (a.adapter in ADAPTERS,
             f"{who}.adapter must be one of {', '.join(ADAPTERS)}, got {a.adapter!r}"),
            (a.lora_rank >= 1, f"{who}.lora_rank must be >= 1, got {a.lora_rank}"),
            (a.lora_alpha > 0, f"{who}.lora_alpha must be > 0, got {a.lora_alpha}"),
            (a.lora_dropout == 0,
             f"{who}.lora_dropout must be 0: hosl runs every part in eval mode (a ZO difference "
             "must see one function), so dropout is off everywhere"),
            (a.lora_targets is None or bool(a.lora_targets.strip(" ,")),
             f"{who}.lora_targets names no module; give e.g. q_proj,v_proj or leave it unset"),
            (a.lora() or _adapter_fields(a) == _adapter_fields(AdapterConfig()),
             f"{who}.lora_* settings need {who}.adapter lora (it is {a.adapter})"),
        ]
    full = cfg.mode.endswith("-full")
    checks += [
        (cfg.mode != "frozen" or not cfg.client.lora(),
         "mode frozen's client never trains: drop client.adapter (server.adapter is allowed)"),
        (not full or cfg.server == ServerConfig(),
         f"mode {cfg.mode} has no server: client.adapter adapts the whole model; drop server.*"),
        (cfg.zo.embedding_noise != "batch" or not cfg.client.lora(),
         "zo.embedding_noise batch makes the client's embedding noise row-sparse, but with "
         "client.adapter lora the embedding is frozen and has no noise; drop one of the two"),
    ]
    return checks


def validate_clients(cfg: TrainConfig) -> None:
    """The `clients.*` section: values, and the modes whose client a record can describe."""
    from hosl.federated.partition import parse_partition
    from hosl.federated.schedule import ORDERS, ClientSchedule

    c = cfg.clients
    parse_partition(c.partition)
    checks = [
        (c.n >= 1, f"clients.n (--clients) must be >= 1, got {c.n}"),
        (c.schedule in CLIENT_SCHEDULES,
         f"clients.schedule must be one of {', '.join(CLIENT_SCHEDULES)}, got {c.schedule!r}"),
        (c.order in ORDERS, f"clients.order must be one of {', '.join(ORDERS)}, got {c.order!r}"),
        (0 < c.fraction <= 1, f"clients.fraction must be in (0, 1], got {c.fraction}"),
        (c.n == 1 or cfg.mode in SPLIT_MODES,
         f"clients.n > 1 needs a split mode ({', '.join(SPLIT_MODES)}): mode {cfg.mode} has no "
         "client part to share"),
        # SplitFed (fo) swaps each client's model in and out of one float32 part; bf16 parameters
        # carry float32 master weights (hosl.master_weights) that such a swap would leave stale
        (c.n == 1 or cfg.mode != "fo" or cfg.model.dtype == "float32",
         f"clients.n > 1 with mode fo (SplitFed, FedAvg of the client models) needs model.dtype "
         f"float32, got {cfg.model.dtype}"),
    ]
    per_round = ClientSchedule(max(1, c.n), fraction=min(max(c.fraction, 1e-9), 1.0)).per_round
    checks.append((
        c.schedule != "parallel" or cfg.steps % per_round == 0,
        f"clients.schedule parallel applies a round's updates when the round ends: steps "
        f"({cfg.steps}) must be a multiple of the {per_round} client steps of a round",
    ))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_split_layer(k: int, n_layers: int | None = None, model: str = "") -> int:
    """The one check of a split layer k: 0 <= k <= N (N known once the model's config is)."""
    if n_layers is None:
        if k < 0:
            raise ConfigError(f"split_layer must be >= 0, got {k}")
    elif not 0 <= k <= n_layers:
        where = f" for {model}" if model else ""
        raise ConfigError(
            f"split_layer must be between 0 and {n_layers}{where}, got {k}: choose an integer "
            f"from 0 to {n_layers}"
        )
    return k


def canonical_dtypes(cfg: TrainConfig) -> TrainConfig:
    """Accept every spelling hosl.dtypes knows (bf16, fp16, ...); store the canonical name."""
    model_dtype = canonical_name(cfg.model.dtype) or cfg.model.dtype
    wire_dtype = canonical_name(cfg.wire_dtype) or cfg.wire_dtype
    return dataclasses.replace(
        cfg, wire_dtype=wire_dtype, model=dataclasses.replace(cfg.model, dtype=model_dtype)
    )


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
