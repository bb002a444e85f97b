#!/usr/bin/env bash
# Create .venv in the repository and install hosl with its test tools. Idempotent: a second run
# only checks that the environment is complete.
#
# The exact versions come from requirements.lock (torch pinned to the 2.13.0 CPU build, so nothing
# pulls a multi-GB CUDA build); hosl itself is then installed editable without resolving anything.
# To refresh the lock after changing dependencies in pyproject.toml: in a fresh venv run
#   pip install "torch==2.13.0" && pip install -e ".[dev]"
#   pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$/torch==2.13.0/' > requirements.lock
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hosl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" -r requirements.lock
  "${pip[@]}" --no-deps -e .
  # The lock must satisfy pyproject.toml's ranges (a range changed without refreshing it fails).
  check=$(.venv/bin/python -m pip check) || { echo "$check" >&2; exit 1; }
  touch "$stamp"
fi
