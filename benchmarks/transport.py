"""What loopback gRPC (float32 and bf16 wire) adds to a HOSL step over in-process.

    python benchmarks/transport.py [--model smollm2-135m] [--steps 3] [--qs 1 4]

For each Q, three runs start from the same weights and train on the same synthetic batches
(batch 16, length 64, a SmolLM2-135M-shaped activation of 16 x 64 x 576): in-process
(`LocalTransport`), and against a `hosl serve` subprocess on 127.0.0.1 with a float32 and a
bfloat16 wire. The three runs take their steps in turn; after one warm-up step, `--steps` steps
follow. Reported per run: encoded bytes and round trips per step, for bf16 the largest change of
a step's loss against the float32 wire, and the seconds the transport alone takes per step
(against a server that only decodes), also as a share of the in-process step's median seconds.

Whole-step seconds of the gRPC runs are not reported: on a small machine shared with other jobs a
step's time swings by more than the transport's share (seconds against hundredths), so the
difference of two runs' step times measures the load, not the network. Writes
benchmarks/results/transport.{json,md}; `--render JSON` rewrites them from an earlier result
without measuring.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from contextlib import ExitStack, nullcontext
from pathlib import Path

import grpc
import torch
from machine_info import machine

from hosl.batching import Batch, random_batch
from hosl.build import build_run
from hosl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ZoConfig
from hosl.models.loading import load_pretrained
from hosl.remote import RemoteOptions, make_transport
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_client import GrpcTransport
from hosl.transport.grpc_server import ServerState, SplitServicer
from hosl.transport.handshake import PROTOCOL_VERSION, Identity
from hosl.transport.ledger import StepLedger
from hosl.transport.local import LocalTransport
from hosl.transport.messages import CutBatch, HoslStepReply, HoslStepRequest

ROOT = Path(__file__).resolve().parent
BATCH, LENGTH, HIDDEN = 16, 64, 576
SPLIT = 4  # --split-layer; the default of hosl's config


def synthetic_batches(vocab: int, count: int, seed: int = 0) -> list[Batch]:
    """Full-length sequences; each example scores two single-token candidates at its last token."""
    gen = torch.Generator().manual_seed(seed)
    return [random_batch(BATCH, LENGTH, vocab, gen) for _ in range(count)]


def config(model: str, q: int, wire: str, steps: int, split: int) -> TrainConfig:
    return TrainConfig(
        mode="hosl",
        steps=steps,
        batch_size=BATCH,
        wire_dtype=wire,
        model=ModelConfig(name=model, split_layer=split),
        data=DataConfig(max_length=LENGTH),
        # every-row embedding noise: what results/ were measured with
        # (row-sparse noise, the hosl default since, is measured against it in embedding_noise.py)
        zo=ZoConfig(q=q, eps=1e-3, lr=1e-6, embedding_noise="all"),
        optim=OptimConfig(optimizer="adamw", lr=1e-5),
    )


def start_server(model: str, split: int, out: Path) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable, "-m", "hosl.cli", "serve", "--model", model, "--mode", "hosl",
        "--split-layer", str(split), "--server-lr", "1e-5", "--optimizer", "adamw",
        "--port", "0", "--output", str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "server.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("hosl serve did not start")
        time.sleep(0.2)
    return proc, json.loads((out / "server.json").read_text())["port"]


TRANSPORTS = ("in-process", "grpc float32", "grpc bfloat16")


def bench(model_name: str, qs: list[int], steps: int, split: int) -> list[dict]:
    """Per Q: the three runs step in turn (in-process, gRPC float32, gRPC bf16, then again). Only
    the in-process steps are timed: their median is what the transport's share is taken of."""
    base, _ = load_pretrained(model_name)
    batches = synthetic_batches(base.config.vocab_size, steps + 1)
    rows = []
    with ExitStack() as stack:
        for q in qs:
            runs = {}
            for transport in TRANSPORTS:
                wire = "bfloat16" if transport.endswith("bfloat16") else "float32"
                cfg = config(model_name, q, wire, steps + 1, split)
                model = copy.deepcopy(base)
                if transport == "in-process":
                    runs[transport] = build_run(cfg, model)
                    continue
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                proc, port = start_server(model_name, split, tmp / "server")
                stack.callback(proc.wait, 60)
                stack.callback(proc.terminate)
                remote = make_transport(cfg, model, RemoteOptions(f"127.0.0.1:{port}"))
                stack.callback(remote.close)
                remote.connect()
                runs[transport] = build_run(cfg, model, remote)
            before = {}
            times: list[float] = []  # the in-process run's
            losses: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            for step in range(steps + 1):  # step 0 warms up
                for transport, run in runs.items():
                    if step == 1:
                        before[transport] = copy.deepcopy(run.transport.stats.train)
                    t0 = time.perf_counter()
                    losses[transport].append(run.train_step([batches[step]], step))
                    if step and transport == "in-process":
                        times.append(time.perf_counter() - t0)
            for transport, run in runs.items():
                after, start = run.transport.stats.train, before[transport]
                row = {
                    "q": q,
                    "transport": transport,
                    "bytes_per_step": (after.wire_bytes - start.wire_bytes) / steps,
                    "round_trips_per_step": (after.round_trips - start.round_trips) / steps,
                    "losses": losses[transport],
                }
                if transport == "in-process":
                    row["seconds_per_step"] = statistics.median(times)
                    row["step_seconds"] = times
                if transport == "grpc bfloat16":
                    row["max_abs_loss_change_vs_float32_wire"] = max(
                        abs(a - b) for a, b in zip(losses[transport], losses["grpc float32"])
                    )
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            runs.clear()
    return rows


class NullParty:
    """A server party that only decodes what it receives: what remains of a step is transport."""

    def phase(self, _name: str) -> nullcontext:
        return nullcontext()

    def hosl_step(self, req: HoslStepRequest) -> HoslStepReply:
        losses = [float(h[0, 0, 0]) for h in req.perturbed]  # receive every part
        return HoslStepReply(losses=losses, loss=float(req.clean[0, 0, 0]))

    def discard_partial_step(self) -> None:
        pass


NULL_IDENTITY = Identity(PROTOCOL_VERSION, "null", "0", 0, "hosl", "float32", 1)


def null_server(out: Path) -> None:
    """Serve NullParty on a free port (written to `out`) until terminated."""
    state = ServerState(
        NullParty(), NULL_IDENTITY, StepLedger(), HIDDEN, logging.getLogger("null")  # type: ignore[arg-type]
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        handlers=[SplitServicer(state).handler()],
        options=grpc_options(server=True),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    out.write_text(str(port))
    server.wait_for_termination()


def _request(q: int, step: int) -> HoslStepRequest:
    gen = torch.Generator().manual_seed(step)
    hidden = [torch.randn(BATCH, LENGTH, HIDDEN, generator=gen) for _ in range(2 * q + 1)]
    batch = synthetic_batches(100, 1)[0]
    mask = batch.attention_mask
    cut = CutBatch(mask, mask.cumsum(-1) - 1, batch.spec)
    return HoslStepRequest(step, 0, True, cut, hidden[1:], hidden[0])


def transport_cost(qs: list[int], reps: int) -> list[dict]:
    """Seconds per step spent in the transport alone (encode, send, decode, reply), against a
    server that does nothing: in-process vs a separate process over loopback gRPC."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--null-server", str(port_file)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not port_file.is_file() or not port_file.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the null server did not start")
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text()}"
            step = 0
            for q in qs:
                for transport in TRANSPORTS:
                    if transport == "in-process":
                        link = LocalTransport(NullParty())  # type: ignore[arg-type]
                    else:
                        wire = torch.bfloat16 if transport.endswith("bfloat16") else torch.float32
                        link = GrpcTransport(address, NULL_IDENTITY, wire_dtype=wire)
                        link.connect()
                    times = []
                    for i in range(reps + 2):  # two warm-up calls
                        req = _request(q, step)
                        t0 = time.perf_counter()
                        link.hosl_step(req)
                        if i >= 2:
                            times.append(time.perf_counter() - t0)
                        step += transport != "in-process"  # the server's ledger counts steps
                    if isinstance(link, GrpcTransport):
                        link.close()
                    row = {"q": q, "transport": transport,
                           "transport_seconds_per_step": statistics.median(times)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


# Fields of earlier results that are no longer reported: whole-step timings of the gRPC runs and
# the comparison of whole steps across runs.
WHOLE_STEP_FIELDS = ("seconds_per_step", "step_seconds", "overhead_vs_in_process")


def drop_whole_step_comparison(row: dict) -> dict:
    """`row` without the fields that compared whole-step times across runs (earlier results)."""
    row = {k: v for k, v in row.items() if k != "overhead_vs_in_process"}
    if row["transport"] != "in-process":
        row = {k: v for k, v in row.items() if k not in WHOLE_STEP_FIELDS}
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| Q | transport | transport alone s/step | network adds | MB/step | round trips/step | "
        "max abs loss change vs float32 wire |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = r.get("max_abs_loss_change_vs_float32_wire")
        added = r.get("network_added_vs_in_process_step")
        lines.append(
            f"| {r['q']} | {r['transport']} | "
            f"{r.get('transport_seconds_per_step', float('nan')):.4f} | "
            f"{'' if added is None else f'{100 * added:+.2f}%'} | "
            f"{r['bytes_per_step'] / 1e6:.2f} | {r['round_trips_per_step']:.0f} | "
            f"{'' if change is None else f'{change:.2e}'} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m, setup = result["machine"], result["setup"]
    rows = result["rows"]
    step_times = ", ".join(
        f"{r['seconds_per_step']:.2f} s at Q = {r['q']}"
        for r in rows
        if r["transport"] == "in-process"
    )
    whole = result.get("whole_steps_command")
    fold = max(
        max(r["step_seconds"]) / min(r["step_seconds"])
        for r in rows
        if r["transport"] == "in-process"
    )
    return (
        "# Transport benchmark: in-process vs loopback gRPC\n\n"
        f"Command: `{result['command']}`\n\n"
        + (
            f"Runs of whole steps (bytes, round trips, losses, in-process step time) from an "
            f"earlier run of `{whole}` on the same machine.\n\n"
            if whole
            else ""
        )
        + f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']} "
        f"({m['torch_threads']} threads), grpcio {m['grpcio']}, Python {m['python']}.\n\n"
        f"Model {setup['model']}, split at layer {setup['split_layer']}, mode hosl, batch "
        f"{setup['batch']} x length {setup['length']} (activation {setup['batch']} x "
        f"{setup['length']} x hidden); one warm-up step, {setup['timed_steps']} steps after it, "
        "the three runs stepping in turn; client and server are separate processes for gRPC. "
        f"In-process step (median): {step_times}.\n\n"
        f"Transport alone: the same step's messages ({BATCH} x {LENGTH} x {HIDDEN} activations) "
        "against a server party that only decodes them (in-process, or a separate process over "
        f"loopback gRPC), median of {setup.get('reps', 20)} calls. Network adds = (gRPC transport "
        "alone - in-process transport alone) / in-process step.\n\n"
        "Whole-step seconds of the gRPC runs are not reported. The machine was shared with "
        f"other jobs: single in-process steps of one run differed up to {fold:.1f}-fold, far "
        "more than the transport's share, and an earlier version of this table showed gRPC "
        "steps 46-74% faster than in-process, which the network cannot cause. A difference of "
        "two runs' step times measures the load, so it is left out; the transport-alone timing "
        "isolates what the network adds. The in-process step is load-inflated too, so network "
        f"adds may be up to {fold:.1f} times larger on an idle machine.\n\n" + table(rows) + "\n"
    )


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "transport.md").write_text(md)
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="steps after one warm-up")
    parser.add_argument("--qs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--split-layer", type=int, default=SPLIT)
    parser.add_argument("--reps", type=int, default=20, help="calls per transport-only timing")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument(
        "--whole-steps-from",
        metavar="JSON",
        help="take the whole-step rows from an earlier transport.json; time the transport only",
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="rewrite transport.{json,md} from an earlier transport.json without measuring",
    )
    parser.add_argument("--null-server", help=argparse.SUPPRESS)  # internal: the null server
    args = parser.parse_args()
    if args.null_server:
        null_server(Path(args.null_server))
        return
    out = Path(args.out)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result["rows"] = [drop_whole_step_comparison(r) for r in result["rows"]]
        result["setup"].setdefault("reps", 20)
        print(write(result, out))
        return
    if args.whole_steps_from:
        earlier = json.loads(Path(args.whole_steps_from).read_text())
        rows = [drop_whole_step_comparison(r) for r in earlier["rows"] if r["q"] in args.qs]
        args.steps = earlier["setup"]["timed_steps"]
        whole_steps_command = earlier.get("whole_steps_command") or earlier["command"]
    else:
        rows = bench(args.model, args.qs, args.steps, args.split_layer)
        whole_steps_command = None
    cost = {(r["q"], r["transport"]): r for r in transport_cost(args.qs, args.reps)}
    for row in rows:
        own = cost[(row["q"], row["transport"])]["transport_seconds_per_step"]
        local = cost[(row["q"], "in-process")]["transport_seconds_per_step"]
        step = next(
            r["seconds_per_step"]
            for r in rows
            if r["q"] == row["q"] and r["transport"] == "in-process"
        )
        row["transport_seconds_per_step"] = own
        row["network_added_seconds"] = own - local
        row["network_added_vs_in_process_step"] = (own - local) / step
    command = "python benchmarks/transport.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "whole_steps_command": whole_steps_command,
        "machine": machine(grpcio=grpc.__version__),
        "setup": {
            "model": args.model,
            "batch": BATCH,
            "length": LENGTH,
            "split_layer": args.split_layer,
            "mode": "hosl",
            "timed_steps": args.steps,
            "warmup_steps": 1,
            "reps": args.reps,
        },
        "rows": rows,
    }
    print(write(result, out))


if __name__ == "__main__":
    main()
