"""Shared helpers for the benchmarks: processes on 127.0.0.1, wrk, memory readings."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WRITE_KEY = "bench-write-key"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
BIN = Path(sys.executable).parent


@dataclass
class Proc:
    """A process that printed 'listening on http(s)://HOST:PORT' on stderr."""

    popen: subprocess.Popen[bytes]
    url: str

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory in MiB."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return rss / 1024, hwm / 1024


@contextlib.contextmanager
def process(*cmd: str, timeout_s: float = 30.0) -> Iterator[Proc]:
    """Start `cmd`, wait (bounded) for its 'listening on' line, stop it with SIGTERM on exit."""
    popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    assert popen.stderr is not None
    deadline = time.monotonic() + timeout_s
    url = ""
    while time.monotonic() < deadline:
        line = popen.stderr.readline().decode()
        if not line:
            break
        if "listening on http" in line:
            url = line.split("listening on ")[1].split()[0]
            break
    if not url:
        popen.kill()
        raise SystemExit(f"{cmd[0]} did not start: {popen.stderr.read().decode()[-2000:]}")
    # Keep draining stderr so the process never blocks on a full pipe.
    drain = subprocess.Popen(["cat"], stdin=popen.stderr, stdout=subprocess.DEVNULL)
    try:
        yield Proc(popen, url)
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            popen.kill()
        drain.wait(timeout=10)


def relay_config(tmp: Path, api_url: str, *, rate: float | None = None, **sections: object) -> Path:
    """The daemon's config for a benchmark: the shipped defaults, except `rate` (the
    destination's max_requests_per_second, 80 by default) when given."""
    destination: dict[str, object] = {"base_url": api_url, "project_token": "TOKEN"}
    if rate is not None:
        destination["max_requests_per_second"] = rate
    config: dict[str, object] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "bench", "write_key": WRITE_KEY}],
        "queue": {"path": str(tmp / "queue.db"), "synchronous": "full"},
        "destination": destination,
        "sessions": {"enabled": False},
    }
    for key, value in sections.items():
        merged: dict[str, object] = {**cast("dict[str, object]", config.get(key, {}))}
        merged.update(cast("dict[str, object]", value))
        config[key] = merged
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def relay(config: Path) -> contextlib.AbstractContextManager[Proc]:
    return process(
        str(BIN / "segment-relay"), "--log-level", "warning", "serve", "--config", str(config)
    )


def fake_api() -> contextlib.AbstractContextManager[Proc]:
    return process(str(BIN / "segment-relay"), "fake-infinario", "--port", "0", "--quiet")


@dataclass
class WrkResult:
    requests: int
    non_2xx: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # The share of this machine's CPU time the hypervisor gave to others during the run
    # (/proc/stat's steal): a round with much of it measured a busy host, not the relay.
    steal_pct: float = 0.0

    def ok_per_s(self, events_per_request: int) -> float:
        return (self.requests - self.non_2xx) * events_per_request / self.seconds


def _ms(text: str) -> float:
    found = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        raise SystemExit(f"cannot read the latency {text!r} in wrk's output")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _cpu_ticks() -> tuple[int, int]:
    """(all CPU ticks, stolen ticks) since boot, from /proc/stat (zeros where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def wrk(
    url: str, body: bytes, *, connections: int = 64, seconds: int = 10, script: str = "post.lua"
) -> WrkResult:
    """Drive `url` with wrk (one thread, `connections` connections) POSTing `body`."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        ticks, stolen = _cpu_ticks()
        out = subprocess.run(
            [
                exe,
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(BENCH / script),
                url,
                "--",
                f.name,
                AUTH,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
        ticks_after, stolen_after = _cpu_ticks()
    requests, took = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).groups()[:2]  # type: ignore[union-attr]
    unit = re.search(r"\d+ requests in [\d.]+(m?s)", out).group(1)  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=int(requests),
        non_2xx=int(non.group(1)) if non else 0,
        seconds=float(took) / (1000 if unit == "ms" else 1),
        # Anchored: "70.50%" in the thread stats above must not match.
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1)),  # type: ignore[union-attr]
        steal_pct=100 * (stolen_after - stolen) / max(1, ticks_after - ticks),
    )


def python_bin() -> str:
    return os.fspath(BIN / "python")
