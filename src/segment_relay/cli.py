"""The `segment-relay` command: serve, check-config, status, fake-infinario."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.config
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import __version__, dead_letters_cli, import_cli, jsontext, status_cli, tls
from .config import Config, load_config, read_env_file, redact_url
from .errors import ConfigError, ListenError, StoreError
from .queue import backup_queue, inspect_queue, open_queue

log = logging.getLogger(__name__)
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_LISTEN = 4
EXIT_USAGE = 64
GIL_SWITCH_INTERVAL_S = 0.0001


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, action and the record's extras."""

    _standard = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """The one logging set-up: lines on stderr (stdout is for --dry-run); journald takes them."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": fmt,
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "aiohttp.access": {"level": "WARNING"},
            # --log-level debug is for the relay's own lines: not every SQL statement.
            "aiosqlite": {"level": "INFO"},
            "asyncio": {"level": "INFO"},
            "segment_relay.service.listening": {"level": "INFO"},
        },
    }


GLOBAL_OPTIONS = ("--log-level", "--log-format", "--env-file")


def _global_options_first(argv: Sequence[str]) -> list[str]:
    """The arguments with --log-level and --log-format moved before the command, so that
    they are accepted after it too (`segment-relay serve --config C --log-level debug`)."""
    front: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg.split("=", 1)[0] in GLOBAL_OPTIONS:
            front.append(arg)
            if "=" not in arg and (value := next(args, None)) is not None:
                front.append(value)
        else:
            rest.append(arg)
    return front + rest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segment-relay",
        description="Segment's HTTP Tracking API in front of an Infinario-style customer data API.",
    )
    parser.add_argument("--version", action="version", version=f"segment-relay {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--env-file",
        help="a systemd EnvironmentFile (VAR=value lines) whose variables ${VAR}s in the config "
        "take, as the service's do (check-config: those only, none from the shell)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object a line, for log shippers",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("-c", "--config", required=True, help="the YAML config file")
    serve.add_argument(
        "--dry-run",
        action="store_true",
        help="print each command as a JSON line on stdout instead of sending it",
    )

    check = commands.add_parser(
        "check-config",
        help="make every check serve makes before it listens (config, credentials, queue)",
    )
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--dry-run", action="store_true", help="check as serve --dry-run would")

    status = commands.add_parser("status", help="show the queue: depth, backoff, dead letters")
    status.add_argument("-c", "--config", required=True)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    dev = commands.add_parser(
        "dev", help="local development: the relay with a throwaway queue, printing or faking"
    )
    dev.add_argument("--port", type=int, default=8088, help="the Segment API's port (0: any)")
    dev_mode = dev.add_mutually_exclusive_group()
    dev_mode.add_argument(
        "--dry-run", action="store_true", help="print each command as a JSON line (the default)"
    )
    dev_mode.add_argument(
        "--fake-infinario",
        action="store_true",
        help="forward to a fake Infinario API in the same process",
    )

    dead_letters_cli.add_parser(commands)
    import_cli.add_parser(commands)

    backup = commands.add_parser(
        "backup", help="copy the live SQLite queue to a file, while the relay runs"
    )
    backup.add_argument("-c", "--config", required=True)
    backup.add_argument(
        "dest", help="the copy to write (an existing file is replaced only with --force)"
    )
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")

    retry_now = commands.add_parser(
        "retry-now", help="make every message waiting for a retry due now (after a fix)"
    )
    retry_now.add_argument("-c", "--config", required=True)

    fake = commands.add_parser(
        "fake-infinario", help="run a fake Infinario API that prints what it receives"
    )
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8089)
    fake.add_argument("--token", default="TOKEN", help="the project token it accepts")
    fake.add_argument("--token-field", default="project_id", choices=["project_id", "company_id"])
    fake.add_argument("--api-key", default="KEY", help="the v2 API key it accepts")
    fake.add_argument("--quiet", action="store_true", help="do not print the commands (benchmarks)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _parser().parse_args(_global_options_first(sys.argv[1:] if argv is None else argv))
    logging.config.dictConfig(logging_config(args.log_level, args.log_format))
    logging.captureWarnings(True)
    try:
        if args.env_file is not None and args.command != "check-config":
            os.environ.update(read_env_file(args.env_file))
    except ConfigError as exc:
        return _failed(args, "config error", exc, EXIT_CONFIG)
    handler = {
        "serve": _serve,
        "check-config": _check_config,
        "status": status_cli.run,
        "retry-now": _retry_now,
        "backup": _backup,
        "fake-infinario": _fake,
        "dead-letters": dead_letters_cli.run,
        "import": import_cli.run,
        "dev": _dev,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        return _failed(args, "config error", exc, EXIT_CONFIG)
    except StoreError as exc:
        return _failed(args, "queue error", exc, EXIT_STORE)
    except ListenError as exc:
        return _failed(args, "listen error", exc, EXIT_LISTEN)


def _failed(args: argparse.Namespace, kind: str, exc: Exception, code: int) -> int:
    """Say why the command failed (with --log-format json, as a log line like every other)."""
    if args.log_format == "json":
        log.error("%s: %s", kind, exc, extra={"action": "failed", "exit_code": code})
    else:
        print(f"segment-relay: {kind}: {exc}", file=sys.stderr)
    return code


def _summary(config: Config, queue: str, *, dry_run: bool) -> str:
    d = config.destination
    return (
        f"config OK: {len(config.sources)} source(s), "
        f"listening on {config.server.host}:{config.server.port}"
        f"{' (HTTPS)' if config.server.tls_cert else ''}, "
        f"queue {queue}, "
        + (
            f"destination {d.api} {d.base_url}, "
            if config.queue.forward or dry_run
            else "receive only (other relays forward), "
        )
        + f"sessions {'on' if config.sessions.enabled else 'off'}"
    )


def _serve(args: argparse.Namespace) -> int:
    from .service import apart, serve

    config = load_config(args.config)
    config.check_serving(dry_run=args.dry_run)
    _warn_outside_state_directory(config, os.environ.get("STATE_DIRECTORY"))
    with contextlib.ExitStack() as stack:
        # A dry run has its own throwaway queue: it neither takes the real queue's messages
        # nor leaves its sessions and counters there.
        workdir = (
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segment-relay-dry-")))
            if args.dry_run
            else None
        )

        def load() -> Config:
            loaded = load_config(args.config)
            return loaded if workdir is None else apart(loaded, workdir)

        if workdir is not None:
            _warn_dry_run(config, load())
        runner = stack.enter_context(_daemon_runner())
        return runner.run(serve(load(), dry_run=args.dry_run, reload_config=load))


def _warn_outside_state_directory(config: Config, state_directory: str | None) -> None:
    """Under systemd with StateDirectory= (the shipped unit), a SQLite queue belongs there: the
    unit's ProtectSystem=strict leaves every other directory read-only."""
    if state_directory is None or config.queue.url:
        return
    homes = [Path(d) for d in state_directory.split(":")]
    if not any(Path(config.queue.path).is_relative_to(home) for home in homes):
        log.warning(
            "queue.path %s is outside the unit's StateDirectory (%s): the service can write "
            "only there; set queue.path: %s",
            config.queue.path,
            state_directory,
            homes[0] / "queue.db",
            extra={"action": "queue_outside_state_directory"},
        )


def _warn_dry_run(config: Config, running: Config) -> None:
    real = redact_url(config.queue.url) if config.queue.url else config.queue.path
    log.warning(
        "dry run: commands are printed, not sent; a throwaway queue at %s (deleted on exit) "
        "stands in for %s, which is not touched",
        running.queue.path,
        real,
        extra={"action": "dry_run"},
    )
    for key in config.well_known_keys():
        log.warning(
            "%s is the well-known development key: fine for a dry run, refused by a relay "
            "that forwards",
            key,
            extra={"action": "dev_write_key"},
        )


def _daemon_runner() -> asyncio.Runner:
    """The daemon's event loop: uvloop where it is installed (the hot path is the loop).

    The SQLite threads hand every result back by taking Python's lock: by default a thread
    waits up to 5 ms for the busy event loop to give it up, and every queue write and read
    waits with it. A 0.1 ms switch interval bounds that wait (measured with bench/forward.py and
    bench/sessions.py: 0.1 ms beat 0.5 ms and 5 ms on both).
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _retry_now(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def run() -> int:
        store = await open_queue(config.queue, daemon=False)
        try:
            return await store.retry_now(time.time())
        finally:
            await store.close()

    moved = asyncio.run(run())
    print(
        f"{moved} messages waiting for a retry are due now; a running relay sends them "
        "within a few seconds"
    )
    return 0


def _backup(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    dest = Path(args.dest)
    problem = (
        f"{dest.parent} is not a directory"
        if not dest.parent.is_dir()
        else f"{dest} is a directory: name the file to write"
        if dest.is_dir()
        else f"{dest} exists; add --force to replace it"
        if dest.exists() and not args.force
        else None
    )
    if problem is not None:
        print(f"segment-relay: {problem}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    pending = asyncio.run(backup_queue(config.queue, dest))
    print(
        f"backed up {config.queue.path} to {dest}: {dest.stat().st_size} bytes, "
        f"{pending} messages queued, in {time.monotonic() - started:.1f}s"
    )
    return 0


def _check_config(args: argparse.Namespace) -> int:
    environ = None if args.env_file is None else read_env_file(args.env_file)
    config = load_config(args.config, environ)
    config.check_serving(dry_run=args.dry_run)
    tls.certificate(config.server)
    _warn_outside_state_directory(config, os.environ.get("STATE_DIRECTORY"))
    queue = asyncio.run(inspect_queue(config.queue))
    if args.dry_run:
        queue += " (serve --dry-run uses a throwaway queue instead)"
    print(_summary(config, queue, dry_run=args.dry_run))
    return 0


def _fake(args: argparse.Namespace) -> int:
    from .testing import FakeInfinario, run_fake

    def show(command: dict[str, Any]) -> None:
        print(jsontext.dumps(command).decode(), flush=True)

    fake = FakeInfinario(
        token=args.token,
        token_field=args.token_field,
        api_key=args.api_key,
        on_command=None if args.quiet else show,
        record=not args.quiet,
    )

    def started(port: int) -> None:
        print(
            f"fake Infinario API listening on http://{args.host}:{port} "
            f"(legacy: POST /bulk, v2: POST /track/v2/projects/{args.token}/batch)",
            file=sys.stderr,
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_fake(args.host, args.port, fake, started))
    return 0


def _dev(args: argparse.Namespace) -> int:
    from .service import dev

    with (
        tempfile.TemporaryDirectory(prefix="segment-relay-dev-") as workdir,
        _daemon_runner() as runner,
    ):
        return runner.run(dev(Path(workdir), port=args.port, fake=args.fake_infinario))


if __name__ == "__main__":
    sys.exit(main())
