"""`hosl` command line: train, eval, serve, client, export, models.

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

from hosl.config import MODES
from hosl.dtypes import ALIASES, DTYPES, canonical_name
from hosl.errors import HoslError
from hosl.optim import OPTIMIZERS, SCHEDULES

DTYPE_HELP = " | ".join(DTYPES) + " (or " + ", ".join(ALIASES) + ")"

# flag -> dotted config key; the flag's value overrides the YAML file and --set. Each help text
# ends with the config default (`_config_default`) unless DEFAULT_TEXT says it another way.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--mode": ("mode", str, " | ".join(MODES) + " (frozen: a client that never trains)"),
    "--model": ("model.name", str, "alias (smollm2-135m), local directory, .gguf file or hub name"),
    "--task": ("data.task", str, "rt, sst2, cb, boolq, rte, wic, wsc, multirc, copa"),
    "--train-file": ("data.train_file", str, "JSONL/CSV training data with the task's fields"),
    "--eval-file": ("data.eval_file", str, "JSONL/CSV evaluation data with the task's fields"),
    "--train-examples": (
        "data.train_examples", int, "training examples to sample (-1: all)"
    ),
    "--eval-examples": (
        "data.eval_examples", int, "evaluation examples to sample (-1: all)"
    ),
    "--split-layer": ("model.split_layer", int, "k: the client holds blocks 0..k-1"),
    "--q": ("zo.q", int, "ZO perturbation pairs per step"),
    "--eps": ("zo.eps", float, "ZO perturbation scale"),
    "--estimator": (
        "zo.estimator",
        str,
        "how the hosl client reads its projected gradients: losses (2Q server losses) | "
        "cut-grad (one dL/dh from the server, the same derivative up to O(eps^2))",
    ),
    "--embedding-noise": (
        "zo.embedding_noise",
        str,
        "where the hosl client draws its embeddings' noise for the update: all (every row) | "
        "batch (the rows the step's batch looked up: the gradient is zero elsewhere) | auto "
        "(the default: batch for a hosl client whose embedding trains, else all)",
    ),
    "--zo-lr": (
        "zo.lr",
        float,
        "zeroth-order learning rate: the client's in hosl and zo, the server's too in zo, the "
        "whole model's in zo-full; unused by fo and fo-full",
    ),
    "--fo-lr": (
        "optim.lr",
        float,
        "first-order learning rate (of --optimizer): the server's in hosl and fo, the client's "
        "too in fo, the whole model's in fo-full; unused by zo and zo-full",
    ),
    "--optimizer": ("optim.optimizer", str, "FO optimizer: " + " | ".join(OPTIMIZERS)),
    "--schedule": (
        "optim.schedule",
        str,
        "learning-rate schedule of both rates, over the run's --steps: " + " | ".join(SCHEDULES),
    ),
    "--steps": ("steps", int, "optimizer steps"),
    "--batch-size": ("batch_size", int, "examples per micro-batch"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "--max-length": ("data.max_length", int, "tokens per sequence (prompts truncated on the left)"),
    "--eval-every": ("eval_every", int, "evaluate every N steps (0: start and end only)"),
    "--checkpoint-every": ("checkpoint_every", int, "checkpoint every N steps (0: end only)"),
    "--seed": ("seed", int, "seed for data order, sampling and perturbations"),
    "--dtype": ("model.dtype", str, DTYPE_HELP),
    "--wire-dtype": ("wire_dtype", str, "dtype of activations on the wire: " + DTYPE_HELP),
    "--output": ("output", str, "run directory"),
    "--clients": (
        "clients.n", int, "clients sharing one client model, kept in sync by replaying each "
        "other's ZO update records (in process; mode fo: SplitFed, FedAvg of the client models)",
    ),
    "--partition": (
        "clients.partition", str, "how the clients share the training set: iid | dirichlet:ALPHA "
        "(label skew; smaller ALPHA, stronger skew)",
    ),
    "--client-schedule": (
        "clients.schedule", str, "how clients take steps, one client's batch per step: "
        "sequential (each on the client model its predecessor left) | parallel (every client of "
        "a round on the model the round began with); order and share per round: --set "
        "clients.order=round-robin|sampled, clients.fraction=F",
    ),
}
# Old spellings still accepted.
FLAG_ALIASES = {"--zo-lr": ("--client-lr",), "--fo-lr": ("--server-lr",)}
# Defaults that depend on other values, in words.
DEFAULT_TEXT = {
    "--train-examples": "1000 of a built-in split; every row of --train-file",
    "--eval-examples": "500 of a built-in split; every row of --eval-file, in order",
    "--output": "runs/<mode>-<task>-<date>-<time>[-N]",
}


# The flags `hosl serve` takes from TRAIN_FLAGS: what shapes the server's part and optimizer.
SERVE_FLAGS = (
    "--mode", "--model", "--split-layer", "--dtype", "--fo-lr", "--optimizer", "--schedule",
    "--steps", "--grad-accum", "--checkpoint-every", "--seed", "--output", "--client-schedule",
)


def _config_default(key: str) -> Any:
    """The TrainConfig default of a dotted key (what a flag left out means)."""
    from hosl.config import TrainConfig

    node: Any = TrainConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or any(
            action.default is nothing for nothing in (None, False, argparse.SUPPRESS)
        ):
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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
    return overrides  # dtype spellings are made canonical by load_config


def _dtype(name: str) -> str:
    """The canonical name of a dtype flag (bf16 -> bfloat16), or a one-line error."""
    canonical = canonical_name(name)
    if canonical is None:
        raise HoslError(f"--dtype {name}: unknown dtype; use {DTYPE_HELP}")
    return canonical


def _quiet_grpc(verbose: bool) -> None:
    """gRPC's C core logs its own lines (3 to 29 of them on a TLS or port failure) before hosl's
    one-line error; keep them for --verbose. Read when gRPC first loads, so set before import."""
    if verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    else:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _remote(args: argparse.Namespace) -> Any:
    """RemoteOptions from --server and its companions, or None for an in-process run."""
    if not args.server:
        if args.client_id is not None:
            raise HoslError("--client-id makes this process a client of a `hosl serve`: give "
                            "--server HOST:PORT")
        return None
    _quiet_grpc(args.verbose)
    from hosl.remote import RemoteOptions
    from hosl.transport.security import load_token

    return RemoteOptions(
        address=args.server,
        token=load_token(args.token_file),
        tls=args.tls or bool(args.tls_ca),
        tls_ca=args.tls_ca,
        reconnect_timeout=args.reconnect_timeout,
        step_timeout=args.step_timeout,
        client_id=args.client_id,
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
    _quiet_grpc(args.verbose)
    from hosl.config import load_config, load_run_config
    from hosl.serve import ServeOptions, serve
    from hosl.transport.security import load_client_tokens, load_token

    opts = ServeOptions(
        host=args.host,
        port=args.port,
        token=load_token(args.token_file),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_frame_mb=args.max_frame_mb,
        idle_timeout=args.idle_timeout,
        max_clients=args.max_clients,
        min_clients=args.min_clients,
        turn_timeout=args.turn_timeout,
        client_tokens=load_client_tokens(args.client_tokens) if args.client_tokens else None,
    )
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise HoslError(f"--resume {run_dir}: not a server directory (no config.yaml)")
        if args.config or set(_train_overrides(args, SERVE_FLAGS)):
            raise HoslError("--resume continues a server with its saved config; drop the flags")
        serve(load_run_config(run_dir / "config.yaml"), opts, resume_dir=run_dir)
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
        dtype=_dtype(args.dtype),
        server_run=Path(args.server_run) if args.server_run else None,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hosl.export import export_run

    record = export_run(
        Path(args.run_dir), Path(args.output),
        server_run=Path(args.server_run) if args.server_run else None,
    )
    print(f"exported step {record['step']} of {record['run']} to {record['output']} "
          f"({record['merged_lora_layers']} LoRA layers merged)")
    if record["untied_embedding_and_head"]:
        print("the client's trained embedding and the server's trained head were one tied matrix "
              "before the split: both are exported, untied (tie_word_embeddings: false)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hosl.models.loading import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def _memory_savings(args: argparse.Namespace) -> dict:
    """`estimate`'s memory-saving arguments from `hosl memory`'s flags."""
    from hosl.memory.adapters import LoraSpec

    spec = LoraSpec(rank=args.lora_rank, targets=tuple(args.lora_targets.split(",")))
    return dict(checkpointing=args.checkpointing or (), fused_update=args.fused_update,
                client_optimizer=args.client_optimizer,
                adapters={party: spec for party in args.lora or ()}, estimator=args.estimator)


def cmd_memory(args: argparse.Namespace) -> int:
    from hosl.memory.report import run_memory_command

    print(run_memory_command(
        model=args.model, split_layer=args.split_layer, batch_size=args.batch_size,
        max_length=args.max_length, mode=args.mode, dtype=_dtype(args.dtype),
        optimizer=args.optimizer,
        logits=args.logits, q=args.q, as_json=args.json, savings=_memory_savings(args),
    ))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hosl.sweep import parse_shard, run_sweep

    results = run_sweep(
        Path(args.sweep_file), dry_run=args.dry_run,
        output_root=Path(args.output_root) if args.output_root else None,
        overrides=_parse_set(args.set or []), progress=not args.no_progress,
        shard=parse_shard(args.shard), table_only=args.table,
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
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="seconds a connected client may send nothing before its session ends and another "
        "client may train",
    )
    serve.add_argument(
        "--max-clients", type=int, default=1,
        help="above 1: serve up to this many `hosl client --client-id I` processes at once, "
        "taking turns and sharing one client model through update records",
    )
    serve.add_argument("--min-clients", type=int, default=1,
                       help="clients that must have joined before the first step")
    serve.add_argument(
        "--turn-timeout", type=float, default=300.0,
        help="seconds a client may send nothing during its turn, and at most hold its turn, "
        "before it is dropped",
    )
    serve.add_argument("--client-tokens", metavar="FILE",
                       help="per-client tokens, one `ID TOKEN` line each: a client must present "
                       "its own id with its own token (instead of --token-file)")
    serve.add_argument("--verbose", action="store_true", help="show gRPC's own log lines")
    serve.add_argument("--resume", metavar="DIR", help="continue a server from its directory")
    serve.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="accuracy and predictions.jsonl for a model or a run")
    ev.add_argument("--model", help="model to evaluate (default: the run's, else smollm2-135m)")
    ev.add_argument("--run", metavar="RUN_DIR", help="evaluate a trained run's latest checkpoint")
    ev.add_argument(
        "--server-run",
        metavar="SERVER_DIR",
        help="with --run of a `hosl client` run: the `hosl serve` directory holding its server "
        "part (the checkpoint of the same step is used)",
    )
    ev.add_argument("--task", help="task (default: the run's, else rt)")
    ev.add_argument("--eval-file", help="JSONL/CSV evaluation data (default: the run's, else "
                    "the task's built-in test split)")
    ev.add_argument("--split-layer", type=int, help="split at k (default: unsplit, or the run's)")
    ev.add_argument(
        "--eval-examples",
        type=int,
        help="examples to sample, -1: all (default: the run's; else 500 of a built-in split, "
        "every row of --eval-file in order)",
    )
    ev.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    ev.add_argument("--max-length", type=int, help="tokens per sequence (default: the run's, "
                    "else 64)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled examples")
    ev.add_argument("--dtype", default="float32", help="model dtype without --run: " + DTYPE_HELP)
    ev.add_argument("--output", help="directory for predictions.jsonl and eval.json (default: "
                    "RUN_DIR/eval-<task>, else runs/eval-<task>-<date>-<time>[-N])")
    ev.set_defaults(func=cmd_eval)

    export = sub.add_parser(
        "export", help="one Hugging Face model from a finished run, adapters merged"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run (a `hosl client` run: "
                        "with --server-run)")
    export.add_argument("--output", required=True, metavar="DIR",
                        help="empty directory for save_pretrained's files and the tokenizer")
    export.add_argument("--server-run", metavar="SERVER_DIR",
                        help="for a `hosl client` run: the `hosl serve` directory holding its "
                        "server part (the checkpoint of the same step is used)")
    export.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="list model aliases and what is cached")
    models.set_defaults(func=cmd_models)

    mem = sub.add_parser("memory", help="analytic per-party memory: components and totals")
    mem.add_argument("--model", default="smollm2-135m",
                     help="built-in config (opt-125m, opt-1.3b, smollm2-135m), model directory "
                     "or config.json")
    mem.add_argument("--split-layer", type=int, default=None, help="k (required for split modes)")
    mem.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch")
    mem.add_argument("--max-length", type=int, default=64, help="tokens per sequence")
    mem.add_argument("--mode", default="hosl", help=", ".join((*MODES, "inference")))
    mem.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    mem.add_argument("--optimizer", default="adamw", help=" | ".join(OPTIMIZERS))
    mem.add_argument("--logits", default="scored", choices=["scored", "full"],
                     help="full: what a server that materialises (B x L x V) logits needs")
    mem.add_argument("--q", type=int, default=1, help="ZO perturbation pairs per step")
    mem.add_argument("--estimator", default="losses", choices=["losses", "cut-grad"],
                     help="hosl's zo.estimator (cut-grad: the server returns dL/dh)")
    mem.add_argument("--checkpointing", action="append", choices=["client", "server", "model"],
                     help="a party whose blocks are checkpointed (repeatable)")
    mem.add_argument("--fused-update", action="store_true",
                     help="the fo client's fused SGD update (client.fused_update)")
    mem.add_argument("--client-optimizer", help="the fo client's own optimizer (client.optimizer)")
    mem.add_argument("--lora", action="append", choices=["client", "server", "model"],
                     help="a party that trains LoRA adapters instead of its weights (repeatable)")
    mem.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    mem.add_argument("--lora-targets", default="q_proj,v_proj",
                     help="comma-separated module names LoRA adapts in every block")
    mem.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem.set_defaults(func=cmd_memory)

    sweep = sub.add_parser("sweep", help="run a grid or list of configurations, collect a table")
    sweep.add_argument("sweep_file", help="sweep YAML: base config plus grid: or runs:")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    sweep.add_argument("--table", action="store_true",
                       help="train nothing; write results.csv/md of the runs finished so far")
    sweep.add_argument("--output-root", help="where run directories go (default: the file's)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="dotted override for every run (not part of run names)")
    sweep.add_argument("--shard", default="1/1", metavar="I/N",
                       help="train only runs I, I+N, ... (run N of these side by side)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="PNG plots of runs: loss, accuracy vs step, k, Q")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or folders searched for them (a sweep root)")
    report.add_argument("--out", help="output folder (default: beside the runs)")
    report.set_defaults(func=cmd_report)
    return parser


def _config_flags(parser: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    parser.add_argument(
        "--config", help="YAML config file; its values replace the defaults shown below"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted config override, e.g. --set zo.q=4 (repeatable)",
    )
    for flag in flags:
        key, kind, help_text = TRAIN_FLAGS[flag]
        default = DEFAULT_TEXT.get(flag, _config_default(key))
        parser.add_argument(
            flag,
            *FLAG_ALIASES.get(flag, ()),
            dest=flag[2:].replace("-", "_"),
            type=kind,
            help=help_text if default is None else f"{help_text} (default: {default})",
        )


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
    parser.add_argument(
        "--client-id", type=int,
        help="this process is client ID of a many-client `hosl serve` (--max-clients), with its "
        "own --train-file; all clients end with the same client model",
    )
    parser.add_argument("--verbose", action="store_true", help="show gRPC's own log lines")


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
