"""`hosl serve` and `hosl client` as real processes on 127.0.0.1: equivalence with in-process
training, refusals that leave the server serving, and faults on either side that lose nothing.

Every process runs under a deadline and is killed in a `finally`, so a hung server cannot hang
the test run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch

from hosl.checkpoint import read_checkpoint
from hosl.cli import main
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_server import FULL_METHOD
from hosl.transport.security import call_metadata

SRC = Path(__file__).resolve().parents[1] / "src"
DEADLINE_S = 240  # a safety net for a loaded machine; a normal run needs a few seconds
STEPS = 40  # long enough to kill a process mid-run, short enough for a quick test


def _env(token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HOSL_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # a tiny model gains nothing from threads; two processes share
    if token:
        env["HOSL_TOKEN"] = token
    return env


def _hosl(*args: str, token: str | None = None, log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "hosl.cli", *args]
    if log is None:
        return subprocess.Popen(command, env=_env(token), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    # The child writes through its own copy of the descriptor; ours is closed at once.
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=_env(token), stdout=out, stderr=out)


def _wait(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _committed(server_dir: Path) -> int:
    log = server_dir / "server.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    steps = [int(x.rsplit(" ", 1)[1]) for x in lines if " committed step " in x]
    return max(steps, default=0)


@contextmanager
def server(
    model: Path, out: Path, *extra: str, token: str | None = None, resume: bool = False,
    port: int = 0
) -> Iterator[tuple[subprocess.Popen, int]]:
    (out / "server.json").unlink(missing_ok=True)
    args = ["--resume", str(out)] if resume else [
        "--model", str(model), "--split-layer", "1", "--mode", "hosl", "--server-lr", "0.1",
        "--optimizer", "adamw", "--output", str(out), *extra,
    ]
    out.mkdir(parents=True, exist_ok=True)
    proc = _hosl("serve", *args, "--port", str(port), token=token, log=out.parent / "serve.out")
    try:
        _wait(lambda: (out / "server.json").is_file() or proc.poll() is not None, "the server")
        assert proc.poll() is None, (out.parent / "serve.out").read_text()[-3000:]
        yield proc, json.loads((out / "server.json").read_text())["port"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _train_args(model: Path, files: tuple[Path, Path], out: Path, steps: int) -> list[str]:
    return [
        "--model", str(model), "--task", "sst2", "--train-file", str(files[0]),
        "--eval-file", str(files[1]), "--split-layer", "1", "--batch-size", "8",
        "--max-length", "16", "--q", "2", "--client-lr", "5e-3", "--server-lr", "0.1",
        "--optimizer", "adamw", "--steps", str(steps), "--output", str(out), "--no-progress",
        "--eval-examples", "8",
    ]


def _state(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return read_checkpoint(run / "checkpoints" / latest)


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def _assert_same_model(reference: Path, client: Path, server_dir: Path) -> None:
    expected = _state(reference)
    got = {"client": _state(client)["client"], "server": _state(server_dir)["server"]}
    for side in ("client", "server"):
        a, b = expected[side]["part"], got[side]["part"]
        assert a.keys() == b.keys() and len(a) > 5
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{side} {key}")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, sentiment_files, tmp_path_factory) -> Callable[[int], Path]:
    """In-process runs of the same config, one per number of steps."""
    runs: dict[int, Path] = {}

    def get(steps: int) -> Path:
        if steps not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            assert main(["train", *_train_args(tiny_model_dir, sentiment_files, out, steps)]) == 0
            runs[steps] = out
        return runs[steps]

    return get


def test_two_clients_one_after_another_equal_one_in_process_run(
    tiny_model_dir, sentiment_files, tmp_path, reference
) -> None:
    srv = tmp_path / "server"
    with server(tiny_model_dir, srv) as (proc, port):
        first, second = tmp_path / "first", tmp_path / "second"
        address = f"127.0.0.1:{port}"
        assert main(["client", "--server", address,
                     *_train_args(tiny_model_dir, sentiment_files, first, 3)]) == 0
        # a fresh client continues the same run: it replays steps 0..2 from the journal
        assert main(["client", "--server", address,
                     *_train_args(tiny_model_dir, sentiment_files, second, 6)]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    ref = reference(6)
    first_three = {step: loss for step, loss in _losses(ref).items() if step <= 3}
    assert _losses(first) == pytest.approx(first_three, abs=1e-6)
    assert _losses(second) == pytest.approx(_losses(ref), abs=1e-6)
    _assert_same_model(ref, second, srv)
    # both sides count the same encoded frames: the server's journal records each step's bytes
    journal = [json.loads(x) for x in (srv / "journal.jsonl").read_text().splitlines()]
    sent = [e["up"] + e["down"] for e in journal]
    summary = json.loads((first / "summary.json").read_text())
    assert summary["round_trips"] == 3 and summary["wire_bytes"] == sum(sent[:3])
    full = json.loads((second / "summary.json").read_text())
    assert full["round_trips"] == 6 and full["wire_bytes"] == sum(sent) > sum(sent[:3])
    log = (srv / "server.log").read_text()
    assert log.count("connected at step") == 2
    # The server process measured its own peak and sent it: the client's summary has it, phase
    # by phase, close to the in-process run's server.
    local = json.loads((ref / "summary.json").read_text())
    for networked in (summary, full):
        assert networked["server_peak_bytes"] > 0
        phases, local_phases = networked["server_phase_peaks"], local["server_phase_peaks"]
        # the server also meters the client's zero-shot evaluation, before the first step
        assert set(phases) - {"eval"} == set(local_phases)
        for name in set(phases) & set(local_phases):
            # both transports stream the perturbed activations and decode each in "receive"
            assert phases[name] == local_phases[name], name
    assert "server peak memory" in log


def _raw_call(port: int, messages: list[bytes], token: str | None) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(64 << 20)) as channel:
        call = channel.stream_stream(FULL_METHOD)(iter(messages), metadata=call_metadata(token),
                                                  timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    return err.value


def test_refused_clients_leave_the_server_serving(
    tiny_model_dir, sentiment_files, tmp_path, capsys
) -> None:
    srv = tmp_path / "server"
    with server(tiny_model_dir, srv, token="right-token") as (proc, port):
        address = f"127.0.0.1:{port}"
        args = _train_args(tiny_model_dir, sentiment_files, tmp_path / "c", 2)
        token_file = tmp_path / "token"
        token_file.write_text("wrong-token\n")
        assert main(["client", "--server", address, "--token-file", str(token_file), *args]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()  # refused before anything was written
        assert _raw_call(port, [b"\0hello"], None).code() == grpc.StatusCode.UNAUTHENTICATED
        bad = _raw_call(port, [b"\0HOSL\xff\xff\0\0garbage"], "right-token")
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in bad.details()
        huge = _raw_call(port, [b"\0" + bytes(20 << 20)], "right-token")
        assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        token_file.write_text("right-token\n")
        mismatch = _train_args(tiny_model_dir, sentiment_files, tmp_path / "c2", 2)
        mismatch[mismatch.index("--split-layer") + 1] = "2"
        assert main(["client", "--server", address, "--token-file", str(token_file),
                     *mismatch]) == 2
        assert "split layer differs: server 1, client 2" in capsys.readouterr().err
        assert proc.poll() is None
        # the server still trains a well-behaved client
        ok = tmp_path / "ok"
        args = _train_args(tiny_model_dir, sentiment_files, ok, 2)
        assert main(["client", "--server", address, "--token-file", str(token_file), *args]) == 0
        assert json.loads((ok / "summary.json").read_text())["round_trips"] == 2
    log = (srv / "server.log").read_text()
    assert "a wrong token" in log and "no token" in log and "malformed" in log
    assert "handshake refused" in log


def test_a_killed_client_resumes_to_the_uninterrupted_result(
    tiny_model_dir, sentiment_files, tmp_path, reference
) -> None:
    srv, cli = tmp_path / "server", tmp_path / "client"
    steps = STEPS
    with server(tiny_model_dir, srv) as (proc, port):
        args = ["--server", f"127.0.0.1:{port}", "--checkpoint-every", "7",
                *_train_args(tiny_model_dir, sentiment_files, cli, steps)]
        client = _hosl("client", *args, log=tmp_path / "client.out")
        try:
            _wait(lambda: _committed(srv) >= 8 or client.poll() is not None, "a few steps")
            client.send_signal(signal.SIGKILL)
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
        assert not (cli / "summary.json").exists(), "the client finished before it was killed"
        # A killed client's stream ends either as a cancelled call ("disconnected") or, when the
        # socket closed between messages, as an ended request stream ("closed its session").
        _wait(lambda: any(word in (srv / "server.log").read_text()
                          for word in ("disconnected", "closed its session")),
              "the server to notice")
        resumed = _hosl("client", "--resume", str(cli), "--server", f"127.0.0.1:{port}",
                        "--no-progress", log=tmp_path / "client.out")
        try:
            assert resumed.wait(DEADLINE_S) == 0, (tmp_path / "client.out").read_text()[-3000:]
        finally:
            if resumed.poll() is None:
                resumed.kill()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    ref = reference(steps)
    _assert_same_model(ref, cli, srv)
    assert _losses(cli) == pytest.approx(_losses(ref), abs=1e-6)
    assert json.loads((cli / "summary.json").read_text())["round_trips"] == steps


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_server_restarted_with_resume_loses_nothing(
    tiny_model_dir, sentiment_files, tmp_path, reference, how
) -> None:
    srv, cli = tmp_path / "server", tmp_path / "client"
    steps = STEPS
    with server(tiny_model_dir, srv, "--checkpoint-every", "5") as (proc, port):
        args = ["--server", f"127.0.0.1:{port}", "--reconnect-timeout", "60",
                *_train_args(tiny_model_dir, sentiment_files, cli, steps)]
        client = _hosl("client", *args, log=tmp_path / "client.out")
        try:
            _wait(lambda: _committed(srv) >= 8 or client.poll() is not None, "a few steps")
            proc.send_signal(how)
            proc.wait(30)
            assert client.poll() is None, "the client finished before the server was killed"
            with server(tiny_model_dir, srv, resume=True, port=port) as (again, _):
                assert client.wait(DEADLINE_S) == 0, (tmp_path / "client.out").read_text()[-3000:]
                again.send_signal(signal.SIGTERM)
                assert again.wait(30) == 0
        finally:
            if client.poll() is None:
                client.kill()
    ref = reference(steps)
    _assert_same_model(ref, cli, srv)
    assert _losses(cli) == pytest.approx(_losses(ref), abs=1e-6)
    log = (srv / "server.log").read_text()
    resumed_at = int(log.split(" at committed step ")[1].split()[0])
    assert 0 < resumed_at < steps
    if how == signal.SIGTERM:
        # SIGTERM checkpoints the committed state before exiting: the restart loses no step
        stopped_at = int(log.split("stopped at committed step ")[1].split()[0])
        assert resumed_at == stopped_at
