"""`hosl serve`: the server process of a split run over the network.

    load the model -> keep blocks k..N-1, the final norm and the head (drop the client's part)
    -> ServerParty + optimizer from the same TrainConfig fields as `hosl train`
    -> resume from the run directory's checkpoint and journal, if asked
    -> serve gRPC until SIGTERM/SIGINT -> checkpoint -> exit

The server never sees text: clients send activations, the attention mask, position ids, labels
and candidate token ids. Its run directory holds `config.yaml`, `server.log`, `journal.jsonl`
(the committed replies that let a client replay its updates) and `checkpoints/` (every
`checkpoint_every` steps, whenever a client's session ends, and on SIGTERM).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType

import grpc
import torch

from hosl.build import fo_optimizer, prepare_server_part, split_parts
from hosl.checkpoint import load_latest, save_checkpoint
from hosl.config import (
    SPLIT_MODES,
    ClientConfig,
    TrainConfig,
    check_split_layer,
    dump_config,
)
from hosl.dtypes import DTYPES
from hosl.errors import ConfigError
from hosl.models.loading import load_pretrained
from hosl.models.split import num_layers
from hosl.parties.server import ServerParty
from hosl.rundir import check_empty, claim_dir, stamp
from hosl.transport.address import bind_problem, check_port, resolve_host
from hosl.transport.framing import grpc_options
from hosl.transport.grpc_server import ServerState, SplitServicer
from hosl.transport.guard import ModelBounds
from hosl.transport.handshake import identity_for
from hosl.transport.ledger import Journal, StepLedger
from hosl.transport.security import TokenInterceptor, is_loopback, server_credentials
from hosl.transport.sessions import MultiClientServicer, Roster
from hosl.zo import ZoTarget

SHUTDOWN_GRACE_S = 5.0
LOGGER = "hosl.serve"
MAX_CONCURRENT_RPCS = 16
MAX_CLIENTS = 256
MAX_FRAME_MB = 1 << 14  # 16 GiB: far above any activation, far below a typo's petabytes


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (written to server.json)
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_frame_mb: int = 1024  # the largest message (one activation tensor) accepted
    hello_timeout: float = 10.0  # a stream that sends no hello this long is closed
    idle_timeout: float = 900.0  # a session silent this long ends and frees the server
    # Many clients (hosl.transport.sessions): at most this many sessions at once, each with a
    # --client-id; the first turn waits for min_clients; a client silent for turn_timeout
    # seconds while it should be stepping, or holding its turn longer than that, is dropped.
    max_clients: int = 1
    min_clients: int = 1
    turn_timeout: float = 300.0
    client_tokens: dict[int, str] | None = None  # each client id's own token (--client-tokens)

    @property
    def many_clients(self) -> bool:
        return self.max_clients > 1 or self.client_tokens is not None

    def __post_init__(self) -> None:
        check_port(self.port, "--port", allow_any=True)
        if isinstance(self.max_frame_mb, bool) or not 1 <= self.max_frame_mb <= MAX_FRAME_MB:
            raise ConfigError(f"--max-frame-mb {self.max_frame_mb}: must be 1..{MAX_FRAME_MB}")
        if isinstance(self.max_clients, bool) or not 1 <= self.max_clients <= MAX_CLIENTS:
            raise ConfigError(f"--max-clients {self.max_clients}: must be 1..{MAX_CLIENTS}")
        if not 1 <= self.min_clients <= self.max_clients:
            raise ConfigError(
                f"--min-clients {self.min_clients}: must be 1..--max-clients ({self.max_clients})"
            )
        if self.token is not None and self.client_tokens is not None:
            raise ConfigError("give one shared token (--token-file, HOSL_TOKEN) or per-client "
                              "tokens (--client-tokens), not both")
        timeouts = {"hello timeout": self.hello_timeout, "--idle-timeout": self.idle_timeout,
                    "--turn-timeout": self.turn_timeout}
        for flag, value in timeouts.items():
            if not 0 < value < float("inf"):
                raise ConfigError(f"{flag} {value}: must be a positive number of seconds")


def _run_dir(cfg: TrainConfig, resume_dir: Path | None, *, create: bool = False) -> Path | None:
    """The server directory: checked before the model loads, created (`create`) after."""
    if resume_dir is not None:
        return resume_dir
    if cfg.output:
        path = Path(cfg.output)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {path} is a file; give a directory for the server's run")
        check_empty(path, "server directory")
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    # A unique default name, claimed atomically once there is something to write.
    return claim_dir(Path("runs"), f"serve-{cfg.mode}-{stamp()}") if create else None


def _check_listen(opts: ServeOptions) -> None:
    """Refuse, before the model loads, an address the server cannot or must not listen on."""
    if opts.token is None and opts.client_tokens is None and not is_loopback(opts.host):
        raise ConfigError(
            f"refusing to listen on {opts.host} without a token: give --token-file or HOSL_TOKEN "
            "(or listen on 127.0.0.1)"
        )
    resolve_host(opts.host)
    problem = bind_problem(opts.host, opts.port)
    if problem:
        raise ConfigError(f"cannot listen on {opts.host}:{opts.port}: {problem}")


def _bind(
    opts: ServeOptions, credentials: grpc.ServerCredentials | None, log: logging.Logger
) -> tuple[grpc.Server, int]:
    """A gRPC server bound to the address (not started yet, no handlers): nothing is written
    before this succeeds, so a failed start leaves --output as it was."""
    tokens = opts.token or (list(opts.client_tokens.values()) if opts.client_tokens else None)
    interceptors = [TokenInterceptor(tokens, log)] if tokens else []
    # each client session holds a worker for its whole life (it waits for its turn there)
    rpcs = MAX_CONCURRENT_RPCS + (opts.max_clients if opts.many_clients else 0)
    server = grpc.server(
        # a worker for every admitted call: silent streams cannot starve a real client of threads
        futures.ThreadPoolExecutor(max_workers=rpcs),
        interceptors=interceptors,
        options=grpc_options(server=True),
        maximum_concurrent_rpcs=rpcs,
    )
    address = f"{opts.host}:{opts.port}"
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if not port:
        server.stop(0)
        problem = bind_problem(opts.host, opts.port) or "gRPC could not bind it"
        raise ConfigError(f"cannot listen on {address}: {problem}")
    return server, port


def _logger(run_dir: Path) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(run_dir / "server.log"), logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def build_server_party(cfg: TrainConfig) -> tuple[ServerParty, object, int]:
    """(party, model config, hidden size): only the server's part of the model stays in memory."""
    return _build_server_party(cfg)[:3]


def _build_server_party(cfg: TrainConfig) -> tuple[ServerParty, object, int, dict[str, int]]:
    """`build_server_party`, and the rows of each embedding of the client's part by its name
    (what an update record of a many-client run may hold row ids of)."""
    if cfg.mode not in SPLIT_MODES:
        raise ConfigError(
            f"hosl serve runs the split modes {', '.join(SPLIT_MODES)}, not {cfg.mode!r}"
        )
    refuse_client_settings(cfg)
    model, _ = load_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    check_split_layer(cfg.model.split_layer, num_layers(model), cfg.model.name)
    config = model.config
    # the server's adapter (server.*) is this process's setting: a client never sends its own
    client_part, server_part = split_parts(cfg, model, client=False)
    target = ZoTarget(client_part)
    row_limits = {name: int(p.shape[0]) for name, p in target.named if name in target.row_wise}
    del model, client_part, target  # the embeddings and blocks 0..k-1 are the client's
    gc.collect()
    prepare_server_part(cfg, server_part)
    optimizer = scheduler = None
    if cfg.mode != "zo":  # every other split mode trains its server with FO
        optimizer, scheduler = fo_optimizer(cfg, server_part.parameters())
    party = ServerParty(server_part, optimizer, scheduler, grad_accum=cfg.grad_accum)
    return party, config, int(config.hidden_size), row_limits


def refuse_client_settings(cfg: TrainConfig) -> None:
    """A server never reads `client.*` (the client's adapter and optimizer are the client's own,
    set by `hosl client`): one that is set here would be silently ignored, so it is refused."""
    default = ClientConfig()
    given = [f"client.{f.name}" for f in fields(ClientConfig)
             if getattr(cfg.client, f.name) != getattr(default, f.name)]
    if given:
        raise ConfigError(
            f"{', '.join(given)} configure the client, which `hosl serve` never builds: drop "
            "them from the server's config and give them to `hosl client` (e.g. --set "
            "client.adapter=lora)"
        )


def serve(
    cfg: TrainConfig,
    opts: ServeOptions,
    *,
    resume_dir: Path | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run the server until `stop` is set or SIGTERM/SIGINT arrives; returns the committed step."""
    _check_listen(opts)
    credentials = server_credentials(opts.tls_cert, opts.tls_key)
    _run_dir(cfg, resume_dir)  # a non-empty --output is refused before the model loads
    torch.manual_seed(cfg.seed)
    party, config, hidden_size, row_limits = _build_server_party(cfg)
    server, port = _bind(opts, credentials, logging.getLogger(LOGGER))
    try:
        run_dir = _run_dir(cfg, resume_dir, create=True)
    except BaseException:
        server.stop(0)
        raise
    assert run_dir is not None
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log = _logger(run_dir)

    committed, fingerprint = 0, None
    # many clients: the update log and turns; its `committed` reads the ledger made below
    roster = Roster(
        max_clients=opts.max_clients, min_clients=opts.min_clients, total_steps=cfg.steps,
        committed=lambda: state.ledger.committed, tokens=opts.client_tokens, log=log,
        turn_timeout=opts.turn_timeout, grad_accum=cfg.grad_accum, row_limits=row_limits,
        order=cfg.clients.order, fraction=cfg.clients.fraction, seed=cfg.seed,
        parallel=cfg.clients.schedule == "parallel",
    ) if opts.many_clients else None
    if resume_dir is not None and (loaded := load_latest(run_dir)) is not None:
        committed, state, meta = loaded
        party.load_state_dict(state["server"])
        if roster is not None and "clients" in state:
            roster.load_state_dict(state["clients"])  # the log: what every client replays
        elif "clients" in state:  # resumed without --max-clients, the next save would drop it
            server.stop(0)
            raise ConfigError(f"--resume {run_dir}: this server kept the update log of many "
                              "clients; give --max-clients N (and its tokens) again")
        fingerprint = meta.get("run")
        log.info("resumed %s at committed step %d", run_dir, committed)
    journal = Journal.open(run_dir / "journal.jsonl", committed)
    identity = identity_for(
        cfg.model.name, config, cfg.model.split_layer, cfg.mode, cfg.model.dtype, cfg.grad_accum
    )
    saved = {"step": committed, "log": len(roster.sync.log) if roster else 0}

    def checkpoint(reason: str) -> None:
        with state.lock:  # a whole step (sessions apply theirs under it)
            if roster is not None and reason != "shutdown" and roster.commit_due():
                # θ_s holds the turn's step, the log not yet its record: a restart from this
                # pair would lose the record for good. A later checkpoint (every N steps, the
                # next session's end, shutdown) saves the pair whole.
                return
            step = state.ledger.committed
            records = len(roster.sync.log) if roster else 0
            if (step, records) == (saved["step"], saved["log"]) and (
                run_dir / "checkpoints" / "latest"
            ).is_file():
                return
            meta = {"identity": identity.to_json(), "run": state.run_fingerprint,
                    "reason": reason}
            payload = {"server": party.state_dict()}
            if roster is not None:  # the log beside θ_s: a restarted server loses neither
                payload["clients"] = roster.state_dict()
                (run_dir / "clients.json").write_text(json.dumps(roster.report(), indent=2))
            save_checkpoint(run_dir, step, payload, meta)
            saved.update(step=step, log=records)
            log.info("checkpoint at step %d (%s)", step, reason)

    # Per-party memory is measured on the first memory_steps steps this process commits (as
    # the trainer does in process) and sent to clients with every evaluation reply.
    if cfg.memory_steps:
        party.start_metering("server")
    metered = {"steps": 0}

    def on_commit(step: int) -> None:
        log.info("committed step %d", step)
        metered["steps"] += 1
        if metered["steps"] == cfg.memory_steps:
            party.stop_metering()
            log.info("server peak memory %.1f MiB over %d steps (live tensor bytes)",
                     party.meter.peak_bytes / 2**20, cfg.memory_steps)
        # many clients checkpoint once the step's record joined the log (on_record)
        if roster is None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(f"every {cfg.checkpoint_every} steps")

    def on_record(step: int) -> None:
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(f"every {cfg.checkpoint_every} steps")

    state = ServerState(
        party=party,
        identity=identity,
        ledger=StepLedger(committed=committed, journal=journal),
        hidden_size=hidden_size,
        log=log,
        on_commit=on_commit,
        on_session_end=lambda: checkpoint("session ended"),
        frame_limit=opts.max_frame_mb << 20,
        run_fingerprint=fingerprint,
        seed=cfg.seed,
        bounds=ModelBounds(
            max_positions=getattr(config, "max_position_embeddings", None),
            vocab_size=getattr(config, "vocab_size", None),
        ),
        hello_timeout=opts.hello_timeout,
        # many clients: the turn holder's frames wait at most --turn-timeout (see sessions)
        idle_timeout=opts.idle_timeout,
    )
    if not opts.token and not opts.client_tokens:
        log.warning("no token given: any client that reaches %s may train this model", opts.host)
    servicer = (
        SplitServicer(state) if roster is None else MultiClientServicer(state, roster, on_record)
    )
    server.add_generic_rpc_handlers([servicer.handler()])
    server.start()
    scheme = "TLS" if credentials is not None else "plain TCP"
    (run_dir / "server.json").write_text(
        json.dumps({"host": opts.host, "port": port, "pid": os.getpid(), "tls": bool(credentials)})
    )
    log.info("listening on %s:%d (%s), mode %s, split layer %d, committed step %d",
             opts.host, port, scheme, cfg.mode, cfg.model.split_layer, committed)
    if roster is not None:
        log.info("up to %d clients taking turns, %d update records in the log",
                 opts.max_clients, len(roster.sync.log))

    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; finishing the step in progress", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        state.stopping.set()
        server.stop(SHUTDOWN_GRACE_S).wait()
        with state.lock:
            state.ledger.abort()
            party.discard_partial_step()
            checkpoint("shutdown")
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("stopped at committed step %d", state.ledger.committed)
    return state.ledger.committed
