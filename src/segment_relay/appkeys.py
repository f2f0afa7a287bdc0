"""The typed keys of the relay's aiohttp app state, shared by service.py and ops.py."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .config import Config
from .debugger import DebugFeed
from .forward import Forwarder
from .metrics import Metrics
from .notify import Notifier
from .queue.protocol import Queue
from .receive import Receiver
from .session_timer import SessionTimer
from .tls import Certificate

CONFIG = web.AppKey("config", Config)
STORE: web.AppKey[Queue] = web.AppKey("store")
METRICS = web.AppKey("metrics", Metrics)
RECEIVER = web.AppKey("receiver", Receiver)
FORWARDER = web.AppKey("forwarder", Forwarder)
SESSION_TIMER = web.AppKey("session_timer", SessionTimer)
NOTIFIER = web.AppKey("notifier", Notifier)
DEBUG_FEED = web.AppKey("debug_feed", DebugFeed)
# Present when the Segment API serves HTTPS (server.tls_cert): SIGHUP reloads it.
CERTIFICATE = web.AppKey("certificate", Certificate)
# Set when stopping begins: /ready says 503, the Segment API answers 503, forwarding drains.
STOPPING = web.AppKey("stopping", asyncio.Event)
# Set when a task the relay cannot run without died: serve() exits non-zero.
FATAL = web.AppKey("fatal", asyncio.Event)
