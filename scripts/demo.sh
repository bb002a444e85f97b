#!/usr/bin/env bash
# Set up .venv (first run only) and fine-tune the offline demo model with HOSL: SmolLM2-135M split
# at layer 4 (the client keeps the embeddings and 4 blocks and trains them forward-only), on the
# offline Rotten Tomatoes task. Prints zero-shot and final accuracy and each party's peak memory.
# Extra arguments override the config, e.g. `bash scripts/demo.sh --steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hosl train --config configs/demo.yaml "$@"
