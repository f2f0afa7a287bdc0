"""systemd's notify protocol (sd_notify), without libsystemd: datagrams to $NOTIFY_SOCKET.

READY=1 once the relay serves, WATCHDOG=1 at half of $WATCHDOG_USEC while the event loop and
the forwarder are alive, STATUS= lines with the queue depth, STOPPING=1 when it stops. Every
call is a no-op when NOTIFY_SOCKET is unset (not run by systemd, or Type= is not notify).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to the socket systemd named, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        """Send `KEY=VALUE` lines as one datagram; failures are logged, never raised."""
        if not self.address:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc, extra={"action": "notify_failed"})

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self, status: str) -> None:
        self.send("WATCHDOG=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """The watchdog interval in seconds when systemd asked this process for pings."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None
