"""The handshake: what client and server must agree on before a single activation crosses.

At connect the client sends its `Identity`; the server compares it with its own and either
welcomes the client (telling it the last committed step) or refuses with one message that names
every difference and both values, e.g.

    split layer differs: server 2, client 1; mode differs: server hosl, client fo

Model identity is the model's name (its last path component, so the same model stored in
different directories on the two machines still matches) and a hash of its architecture config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import PurePath
from typing import Any

from transformers import PretrainedConfig

# 2: perturbed activations travel as differences (hosl.protocol); ZO-ZO steps carry weight decay.
# 3: many clients: the hello carries the update log's chain digest, turn and commit answers carry
#    (log length, digest), and a lagging client gets catch-up answers outside its turn.
# 4: turn answers say `deferred` (parallel rounds: the client keeps θ_c through its own step); a
#    version-3 client would apply its update at once and part from the log.
PROTOCOL_VERSION = 4

# Config entries that describe how a model was saved or is run, not what it computes.
_VOLATILE_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "architectures",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def config_hash(config: PretrainedConfig) -> str:
    """16 hex digits over the architecture config, independent of file location and dtype."""
    values = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS}
    canonical = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_name(name: str) -> str:
    """The user's model name without its directory: `/data/tiny-llama/` -> `tiny-llama`."""
    stripped = name.rstrip("/\\")
    return PurePath(stripped).name or stripped


@dataclass(frozen=True)
class Identity:
    """What both sides compare at connect."""

    protocol: int
    model: str
    config_hash: str
    split_layer: int
    mode: str
    dtype: str
    grad_accum: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Any) -> Identity:
        """Parse a peer's identity; raises ValueError on a missing or mistyped field."""
        if not isinstance(values, dict):
            raise ValueError("identity must be an object")
        out: dict[str, Any] = {}
        for f in fields(cls):
            value = values.get(f.name)
            kind = int if f.type in (int, "int") else str
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"identity field {f.name!r} is missing or not a {kind.__name__}")
            out[f.name] = value
        return cls(**out)


_LABELS = {
    "protocol": "protocol version",
    "model": "model",
    "config_hash": "model config hash",
    "split_layer": "split layer",
    "mode": "mode",
    "dtype": "dtype",
    "grad_accum": "grad_accum",
}


def mismatches(server: Identity, client: Identity) -> str | None:
    """None when the two sides agree, else one line naming every difference with both values."""
    problems = [
        f"{_LABELS[f.name]} differs: server {getattr(server, f.name)}, "
        f"client {getattr(client, f.name)}"
        for f in fields(Identity)
        if getattr(server, f.name) != getattr(client, f.name)
    ]
    return "; ".join(problems) if problems else None


def identity_for(
    name: str, config: PretrainedConfig, split_layer: int, mode: str, dtype: str, grad_accum: int
) -> Identity:
    return Identity(
        protocol=PROTOCOL_VERSION,
        model=model_name(name),
        config_hash=config_hash(config),
        split_layer=split_layer,
        mode=mode,
        dtype=dtype,
        grad_accum=grad_accum,
    )
