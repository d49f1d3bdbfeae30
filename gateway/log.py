"""structlog set-up: JSON lines when stderr is not a TTY (journald, files), console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from gateway.config import Logging

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup_logging(cfg: Logging, stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (for libraries) from `logging:`."""
    stream = stream or sys.stderr
    fmt = cfg.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    level = _LEVELS[cfg.level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # one write per line (message and newline together): several worker processes
        # share one stderr, and a line must not be split by another's
        logger_factory=structlog.WriteLoggerFactory(stream),
        # set up once per process (SIGHUP does not change logging): each logger resolves
        # its processors on first use, not on every call
        cache_logger_on_first_use=True,
    )
    # Libraries (aiosmtpd, aiosmtplib, alembic) log through the stdlib; keep them quiet
    # below warning unless debugging.
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(stream)]
    root.setLevel(level if level <= logging.DEBUG else logging.WARNING)
    for noisy in ("mail.log", "aiosmtpd"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level <= logging.DEBUG
                                          else logging.ERROR)
