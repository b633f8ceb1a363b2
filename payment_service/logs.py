"""JSON-lines logging on stdout: one object per record, structured fields from `extra=`.

The API processes log through a queue (`configure_logging(level, queued=True)`): the request path
only builds a record and appends it; a listener thread formats the records and writes whatever
has accumulated in one write. The queue is drained when the server stops (`flush_logs`) and at
exit, so no line is lost when `serve` is stopped by a signal.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
from datetime import UTC, datetime
from multiprocessing import util
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# How many queued records the listener writes at most in one write.
BATCH_RECORDS = 256


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


class _EnqueueHandler(logging.handlers.QueueHandler):
    """Queues the record itself: the formatting is the listener's, off the request path.

    (The stdlib's QueueHandler formats the message and copies the record in the caller's thread.)
    A traceback is rendered here, while its frames are still what they were.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
            record.exc_info = None
        if record.args:
            record.msg, record.args = record.getMessage(), None
        return record


class _BatchWriter(logging.Handler):
    """Writes each record as a JSON line; the listener hands it everything that is queued."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.write([record])

    def write(self, records: list[logging.LogRecord]) -> None:
        lines = []
        for record in records:
            try:
                lines.append(_FORMATTER.format(record) + "\n")
            except Exception:  # one unformattable record must not lose the others
                self.handleError(record)
        if not lines:
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:
            self.handleError(records[-1])


class _BatchListener(logging.handlers.QueueListener):
    """A QueueListener that takes every record already queued (up to BATCH_RECORDS) per write."""

    def __init__(self, records: queue.Queue[Any], writer: _BatchWriter) -> None:
        super().__init__(records, writer)
        self.records = records
        self.writer = writer

    def _monitor(self) -> None:
        records = self.records
        while True:
            first = records.get()
            batch = [first]
            while len(batch) < BATCH_RECORDS:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            done = None in batch  # QueueListener.stop() queues None
            self.writer.write([r for r in batch if r is not None])
            for _ in batch:
                records.task_done()
            if done:
                return


_FORMATTER = JsonFormatter()
_lock = threading.Lock()
_listener: _BatchListener | None = None


def configure_logging(level: str = "INFO", *, queued: bool = False) -> None:
    """JSON lines on stdout at `level`; with `queued`, written by a listener thread."""
    stop_listener()
    root = logging.getLogger()
    if queued:
        records: queue.Queue[Any] = queue.Queue()
        listener = _BatchListener(records, _BatchWriter(sys.stdout))
        handler: logging.Handler = _EnqueueHandler(records)
        _start(listener)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_FORMATTER)
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Hypercorn's own loggers are replaced by our access log; keep its errors.
    for name in ("hypercorn.access",):
        logging.getLogger(name).disabled = True


def _start(listener: _BatchListener) -> None:
    global _listener
    with _lock:
        _listener = listener
    listener.start()
    atexit.register(stop_listener)
    # A worker process of `serve` ends through multiprocessing, which runs no atexit handlers:
    # its finalizers do run.
    util.Finalize(None, stop_listener, exitpriority=100)


def flush_logs() -> None:
    """Wait until every record queued so far is written (the listener keeps running)."""
    listener = _listener
    if listener is not None:
        listener.records.join()


def stop_listener() -> None:
    """Write what is queued and stop the listener thread; records after it go to stdout."""
    global _listener
    with _lock:
        listener, _listener = _listener, None
    if listener is None:
        return
    listener.stop()
    root = logging.getLogger()
    if any(isinstance(h, _EnqueueHandler) for h in root.handlers):
        fallback = logging.StreamHandler(sys.stdout)
        fallback.setFormatter(_FORMATTER)
        root.handlers[:] = [fallback]
