#!/usr/bin/env bash
# Every study of this folder, in order, two runs side by side (one thread each; on a 2-core CPU
# that trains 1.3x faster than one run on both cores), then the tables and plots that
# experiments/README.md quotes. About 2 h on a 2-core CPU. Rerunning skips finished runs.
#
#   bash experiments/run_all.sh                 # all studies
#   bash experiments/run_all.sh main q          # some of them (names of the .yaml files)
#   bash experiments/run_all.sh --collect client_share   # train nothing: commit what has finished
#                                               # (a study that takes several sessions)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
HOSL=.venv/bin/hosl
export OMP_NUM_THREADS=1
collect_only=false
if [ "${1:-}" = --collect ]; then collect_only=true; shift; fi
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(lr_fo lr_zo lr_hosl main split_layer q)

for study in "${studies[@]}"; do
  sweep="experiments/$study.yaml"
  # A fresh clone has no runs/: the runs committed under experiments/results count as finished
  # (they hold summary.json), so a study that spans sessions neither trains them again nor, in
  # the copy below, loses them.
  for run in experiments/results/"$study"/runs/*/; do
    [ -d "$run" ] || continue
    name=$(basename "$run")
    if [ ! -e "runs/sweeps/$study/$name" ]; then
      mkdir -p "runs/sweeps/$study" && cp -r "$run" "runs/sweeps/$study/$name"
    fi
  done
  if [ "$study" = split_layer ] && [ ! -e runs/sweeps/split_layer/mode=hosl,model.split_layer=4 ] \
      && [ -f "runs/sweeps/main/mode=hosl,optim.lr=3e-05,seed=0,zo.lr=1e-05/summary.json" ]; then
    # main's hosl seed-0 run has exactly this configuration: reuse it instead of training it again
    mkdir -p runs/sweeps/split_layer
    cp -r "runs/sweeps/main/mode=hosl,optim.lr=3e-05,seed=0,zo.lr=1e-05" \
      runs/sweeps/split_layer/mode=hosl,model.split_layer=4
  fi
  if [ "$study" = lora ]; then
    # its first four runs are client_share's k = 24 frozen and full-ZO-client runs, identical
    # configurations: reuse the finished ones instead of training them again
    for run in "mode=frozen,model.split_layer=24,seed=0" "mode=frozen,model.split_layer=24,seed=1" \
        "mode=hosl,model.split_layer=24,seed=0,zo.estimator=losses,zo.lr=1e-05" \
        "mode=hosl,model.split_layer=24,seed=1,zo.estimator=losses,zo.lr=1e-05"; do
      if [ -f "runs/sweeps/client_share/$run/summary.json" ] && [ ! -e "runs/sweeps/lora/$run" ]; then
        mkdir -p runs/sweeps/lora && cp -r "runs/sweeps/client_share/$run" "runs/sweeps/lora/$run"
      fi
    done
  fi
  if $collect_only; then
    $HOSL sweep "$sweep" --table | tail -n 1   # the runs finished so far; nothing trains
  else
    echo "== $study: two shards side by side (logs in runs/sweeps/$study.shard-*.log)"
    mkdir -p runs/sweeps
    $HOSL sweep "$sweep" --shard 1/2 --no-progress >"runs/sweeps/$study.shard-1.log" 2>&1 & one=$!
    $HOSL sweep "$sweep" --shard 2/2 --no-progress >"runs/sweeps/$study.shard-2.log" 2>&1 & two=$!
    wait $one && wait $two
    $HOSL sweep "$sweep" --no-progress | tail -n 1   # everything finished: the complete table
  fi

  # What is committed: each run's config, metrics and summary (no checkpoints), the table, plots.
  out="experiments/results/$study"
  rm -rf "$out" && mkdir -p "$out/runs"
  for run in runs/sweeps/"$study"/*/; do
    [ -f "$run/summary.json" ] || continue
    mkdir -p "$out/runs/$(basename "$run")"
    cp "$run"/config.yaml "$run"/metrics.jsonl "$run"/summary.json "$out/runs/$(basename "$run")/"
  done
  cp runs/sweeps/"$study"/results.csv runs/sweeps/"$study"/results.md "$out/"
  $HOSL report "$out/runs" --out "$out/plots" | tail -n 1
done
