"""JSON-lines logging on stdout: one object per record, structured fields from `extra=`.

The API processes log through a buffer (`configure_logging(level, queued=True)`): the request path
only builds a record and appends it; a writer thread formats what has accumulated every
WRITE_INTERVAL_SECONDS and writes it in one write. The buffer is written out when the server
stops (`flush_logs`) and at exit, so no line is lost when `serve` is stopped by a signal.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from multiprocessing import util
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`. Uvicorn gives
# its records a `color_message`: the message again with a terminal's colour codes, for its own
# console formatter only.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# How often the writer thread formats and writes what the request path buffered.
WRITE_INTERVAL_SECONDS = 0.05


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted before the record was queued
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class _BufferHandler(logging.Handler):
    """Appends the record itself to a deque: no lock, no formatting, no wake-up on the request
    path (the stdlib's QueueHandler formats and copies the record in the caller's thread, and its
    queue wakes the listener for every record). A traceback is rendered here, while its frames
    are still what they were."""

    def __init__(self, buffer: collections.deque[logging.LogRecord]) -> None:
        super().__init__()
        self.buffer = buffer

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: deque.append is atomic
        if not self.filter(record):
            return False
        if record.exc_info:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
            record.exc_info = None
        if record.args:
            record.msg, record.args = record.getMessage(), None
        self.buffer.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class _Writer(threading.Thread):
    """Every WRITE_INTERVAL_SECONDS, formats what is buffered and writes it in one write."""

    def __init__(self, buffer: collections.deque[logging.LogRecord], stream: TextIO) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.buffer = buffer
        self.stream = stream
        self.stopping = threading.Event()
        self.written = threading.Condition()

    def run(self) -> None:
        while not self.stopping.wait(WRITE_INTERVAL_SECONDS):
            self.write_buffered()
        self.write_buffered()

    def write_buffered(self) -> None:
        with self.written:
            records = []
            while self.buffer:
                records.append(self.buffer.popleft())
            lines = []
            for record in records:
                try:
                    lines.append(_FORMATTER.format(record) + "\n")
                except Exception:  # one unformattable record must not lose the others
                    _FALLBACK.handleError(record)
            if lines:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except Exception:
                    _FALLBACK.handleError(records[-1])

    def stop(self) -> None:
        self.stopping.set()
        self.join()


_FORMATTER = JsonFormatter()
_FALLBACK = logging.StreamHandler(sys.stderr)  # reports a record that could not be written
_lock = threading.Lock()
_writer: _Writer | None = None


def configure_logging(level: str = "INFO", *, queued: bool = False) -> None:
    """JSON lines on stdout at `level`; with `queued`, written by a writer thread."""
    stop_writer()
    root = logging.getLogger()
    if queued:
        buffer: collections.deque[logging.LogRecord] = collections.deque()
        handler: logging.Handler = _BufferHandler(buffer)
        _start(_Writer(buffer, sys.stdout))
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_FORMATTER)
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Hypercorn's own loggers are replaced by our access log; keep its errors.
    for name in ("hypercorn.access",):
        logging.getLogger(name).disabled = True
    # The gateway's SDK logs every request and answer at INFO (two lines per call, in its own
    # logfmt): the service logs what it decided instead. Its warnings stay; LOG_LEVEL=DEBUG
    # shows the rest.
    logging.getLogger("stripe").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def _start(writer: _Writer) -> None:
    global _writer
    with _lock:
        _writer = writer
    writer.start()
    atexit.register(stop_writer)
    # A worker process of `serve` ends through multiprocessing, which runs no atexit handlers:
    # its finalizers do run.
    util.Finalize(None, stop_writer, exitpriority=100)


def flush_logs() -> None:
    """Write every record buffered so far, now (the writer thread keeps running)."""
    writer = _writer
    if writer is not None:
        writer.write_buffered()


def stop_writer() -> None:
    """Write what is buffered and stop the writer thread; records after it go to stdout."""
    global _writer
    with _lock:
        writer, _writer = _writer, None
    if writer is None:
        return
    writer.stop()
    root = logging.getLogger()
    if any(isinstance(h, _BufferHandler) for h in root.handlers):
        fallback = logging.StreamHandler(sys.stdout)
        fallback.setFormatter(_FORMATTER)
        root.handlers[:] = [fallback]
