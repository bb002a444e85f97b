"""`hosl` command line: train, eval, serve, client, models.

Every user mistake (bad value, unknown key, missing file, unreachable hub) ends with one line on
stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hosl.dtypes import canonical_name
from hosl.errors import HoslError

# flag -> dotted config key; the flag's value overrides the YAML file and --set.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--mode": ("mode", str, "hosl | fo | zo | fo-full | zo-full"),
    "--model": ("model.name", str, "alias (smollm2-135m), local directory, .gguf file or hub name"),
    "--task": ("data.task", str, "rt, sst2, cb, boolq, rte, wic, wsc, multirc, copa"),
    "--train-file": ("data.train_file", str, "JSONL/CSV training data with the task's fields"),
    "--eval-file": ("data.eval_file", str, "JSONL/CSV evaluation data with the task's fields"),
    "--train-examples": ("data.train_examples", int, "training examples sampled (-1: all)"),
    "--eval-examples": ("data.eval_examples", int, "evaluation examples sampled (-1: all)"),
    "--split-layer": ("model.split_layer", int, "k: the client holds blocks 0..k-1"),
    "--q": ("zo.q", int, "ZO perturbation pairs per step"),
    "--eps": ("zo.eps", float, "ZO perturbation scale"),
    "--client-lr": ("zo.lr", float, "ZO learning rate (client in hosl/zo, whole model in zo-full)"),
    "--server-lr": ("optim.lr", float, "FO learning rate (server; client too in fo, fo-full)"),
    "--optimizer": ("optim.optimizer", str, "FO optimizer: sgd | momentum | adamw"),
    "--schedule": ("optim.schedule", str, "learning-rate schedule: constant | linear"),
    "--steps": ("steps", int, "optimizer steps"),
    "--batch-size": ("batch_size", int, "examples per micro-batch"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "--max-length": ("data.max_length", int, "tokens per sequence (prompts truncated on the left)"),
    "--eval-every": ("eval_every", int, "evaluate every N steps (0: start and end only)"),
    "--checkpoint-every": ("checkpoint_every", int, "checkpoint every N steps (0: end only)"),
    "--seed": ("seed", int, "seed for data order, sampling and perturbations"),
    "--dtype": ("model.dtype", str, "float32 | bfloat16 | float16"),
    "--wire-dtype": ("wire_dtype", str, "dtype of activations on the wire (float32, bf16, fp16)"),
    "--output": ("output", str, "run directory"),
}


# The flags `hosl serve` takes from TRAIN_FLAGS: what shapes the server's part and optimizer.
SERVE_FLAGS = (
    "--mode", "--model", "--split-layer", "--dtype", "--server-lr", "--optimizer", "--schedule",
    "--steps", "--grad-accum", "--checkpoint-every", "--seed", "--output",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hosl: error: {message} (see `{self.prog} --help`)\n")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HoslError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        out[key.strip()] = value
    return out


def _train_overrides(
    args: argparse.Namespace, flags: Sequence[str] = tuple(TRAIN_FLAGS)
) -> dict[str, Any]:
    overrides = _parse_set(args.set or [])
    for flag in flags:
        key = TRAIN_FLAGS[flag][0]
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[key] = value
    for key in ("wire_dtype", "model.dtype"):
        if isinstance(overrides.get(key), str):
            overrides[key] = canonical_name(overrides[key]) or overrides[key]
    return overrides


def _remote(args: argparse.Namespace) -> Any:
    """RemoteOptions from --server and its companions, or None for an in-process run."""
    if not args.server:
        return None
    from hosl.remote import RemoteOptions
    from hosl.transport.security import load_token

    return RemoteOptions(
        address=args.server,
        token=load_token(args.token_file),
        tls=args.tls or bool(args.tls_ca),
        tls_ca=args.tls_ca,
        reconnect_timeout=args.reconnect_timeout,
        step_timeout=args.step_timeout,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from hosl.config import load_config
    from hosl.trainer import resume_config, train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise HoslError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        extra = set(_train_overrides(args)) - {"steps"}
        if extra or args.config:
            raise HoslError(
                "--resume continues a run with its saved config; only --steps may change"
            )
        cfg = resume_config(run_dir, args.steps)
        train(cfg, resume_dir=run_dir, progress=not args.no_progress, remote=_remote(args))
        return 0
    cfg = load_config(args.config, _train_overrides(args))
    train(cfg, progress=not args.no_progress, remote=_remote(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hosl.config import load_config
    from hosl.serve import ServeOptions, serve
    from hosl.transport.security import load_token

    opts = ServeOptions(
        host=args.host,
        port=args.port,
        token=load_token(args.token_file),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_frame_mb=args.max_frame_mb,
    )
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise HoslError(f"--resume {run_dir}: not a server directory (no config.yaml)")
        if args.config or set(_train_overrides(args, SERVE_FLAGS)):
            raise HoslError("--resume continues a server with its saved config; drop the flags")
        serve(load_config(run_dir / "config.yaml"), opts, resume_dir=run_dir)
        return 0
    serve(load_config(args.config, _train_overrides(args, SERVE_FLAGS)), opts)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hosl.eval_cmd import run_eval

    result = run_eval(
        model=args.model,
        run_dir=Path(args.run) if args.run else None,
        task=args.task,
        eval_file=args.eval_file,
        split_layer=args.split_layer,
        eval_examples=args.eval_examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        output=Path(args.output) if args.output else None,
        dtype=args.dtype,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hosl.models.loading import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from hosl.memory.report import run_memory_command

    print(run_memory_command(
        model=args.model, split_layer=args.split_layer, batch_size=args.batch_size,
        max_length=args.max_length, mode=args.mode, dtype=args.dtype, optimizer=args.optimizer,
        logits=args.logits, q=args.q, as_json=args.json,
    ))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hosl.sweep import parse_shard, run_sweep

    results = run_sweep(
        Path(args.sweep_file), dry_run=args.dry_run,
        output_root=Path(args.output_root) if args.output_root else None,
        overrides=_parse_set(args.set or []), progress=not args.no_progress,
        shard=parse_shard(args.shard),
    )
    print(f"results: {results}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hosl.report import default_out, find_runs, make_report

    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else default_out(find_runs(dirs))
    for path in make_report(dirs, out):
        print(path)
    print(out / "report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hosl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, help_text in (
        ("train", "fine-tune a model (in-process server, or a remote one with --server)"),
        ("client", "fine-tune as the edge client of a `hosl serve` process"),
    ):
        train = sub.add_parser(name, help=help_text)
        _config_flags(train, TRAIN_FLAGS)
        train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
        train.add_argument("--no-progress", action="store_true", help="no progress bar")
        _client_flags(train, required=name == "client")
        train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="hold the server's part of a split model for clients")
    _config_flags(serve, SERVE_FLAGS)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    serve.add_argument("--token-file", help="file holding the bearer token (or set HOSL_TOKEN)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve with TLS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--max-frame-mb", type=int, default=1024, help="largest message accepted, in MiB"
    )
    serve.add_argument("--resume", metavar="DIR", help="continue a server from its directory")
    serve.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="accuracy and predictions.jsonl for a model or a run")
    ev.add_argument("--model", help="model to evaluate (default: the run's, else smollm2-135m)")
    ev.add_argument("--run", metavar="RUN_DIR", help="evaluate a trained run's latest checkpoint")
    ev.add_argument("--task", default=None)
    ev.add_argument("--eval-file")
    ev.add_argument("--split-layer", type=int, help="split at k (default: unsplit, or the run's)")
    ev.add_argument("--eval-examples", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-length", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--output", help="directory for predictions.jsonl and eval.json")
    ev.set_defaults(func=cmd_eval)

    models = sub.add_parser("models", help="list model aliases and what is cached")
    models.set_defaults(func=cmd_models)

    mem = sub.add_parser("memory", help="analytic per-party memory: components and totals")
    mem.add_argument("--model", default="smollm2-135m",
                     help="built-in config (opt-125m, opt-1.3b, smollm2-135m), model directory "
                     "or config.json")
    mem.add_argument("--split-layer", type=int, default=None, help="k (required for split modes)")
    mem.add_argument("--batch-size", type=int, default=16)
    mem.add_argument("--max-length", type=int, default=64)
    mem.add_argument("--mode", default="hosl", help="hosl, fo, zo, fo-full, zo-full, inference")
    mem.add_argument("--dtype", default="float32")
    mem.add_argument("--optimizer", default="adamw", help="sgd | momentum | adamw")
    mem.add_argument("--logits", default="scored", choices=["scored", "full"],
                     help="full: what a server that materialises (B x L x V) logits needs")
    mem.add_argument("--q", type=int, default=1)
    mem.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem.set_defaults(func=cmd_memory)

    sweep = sub.add_parser("sweep", help="run a grid or list of configurations, collect a table")
    sweep.add_argument("sweep_file", help="sweep YAML: base config plus grid: or runs:")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    sweep.add_argument("--output-root", help="where run directories go (default: the file's)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="dotted override for every run (not part of run names)")
    sweep.add_argument("--shard", default="1/1", metavar="I/N",
                       help="train only runs I, I+N, ... (run N of these side by side)")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="PNG plots of runs: loss, accuracy vs step, k, Q")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders searched for them (a sweep root)")
    report.add_argument("--out", help="output folder (default: beside the runs)")
    report.set_defaults(func=cmd_report)
    return parser


def _config_flags(parser: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted config override, e.g. --set zo.q=4 (repeatable)",
    )
    for flag in flags:
        _, kind, help_text = TRAIN_FLAGS[flag]
        parser.add_argument(flag, type=kind, help=help_text)


def _client_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--server",
        required=required,
        metavar="HOST:PORT",
        help="train against this `hosl serve` instead of in-process",
    )
    parser.add_argument("--token-file", help="file holding the bearer token (or set HOSL_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument("--tls-ca", help="PEM root certificate to verify the server (implies TLS)")
    parser.add_argument(
        "--reconnect-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for a server that is down or restarting",
    )
    parser.add_argument(
        "--step-timeout", type=float, default=3600.0, help="seconds one server reply may take"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HoslError as err:
        print(f"hosl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hosl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `hosl memory --json | head`: the reader left; say nothing more, as cat and ls do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
