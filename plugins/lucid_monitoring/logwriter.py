"""The access-log writer process: ``python -m lucid_monitoring.logwriter '<json args>'``.

Started by :class:`lucid_monitoring.accesslog.AccessLogWriter`, one per gateway process.
It reads batches of entries from stdin (a 4-byte length, then a pickle: the gateway
is the only writer of that pipe), formats them as JSON lines
(:func:`lucid_monitoring.accesslog.lines`) and writes them to stdout or a rotating
file, in chunks of at most ``chunk`` bytes so a file rotates near its size limit.

It ignores SIGINT and SIGTERM, which a terminal or a service manager sends to the
whole process group: it exits when its stdin closes, once the gateway has handed over
everything, or has died.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import pickle
import signal
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

from lucid_monitoring.accesslog import lines


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file whose every file is created 0600: access-log lines name clients,
    paths and token subjects. Rotation renames the file (its mode goes with it) and
    opens a new one here. An existing file keeps the mode an operator gave it."""

    def _open(self) -> Any:
        return open(self.baseFilename, self.mode, encoding=self.encoding,
                    errors=self.errors, opener=_private)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def handler_for(args: dict[str, Any]) -> logging.Handler:
    handler: logging.Handler
    if args["target"] == "file":
        handler = PrivateRotatingFileHandler(
            args["path"], maxBytes=args["max_bytes"], backupCount=args["backups"],
            encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def write(handler: logging.Handler, blob: bytes, chunk: int) -> None:
    """``blob``'s lines through ``handler``, at most ``chunk`` bytes a record (a longer
    line goes alone)."""
    start, end = 0, len(blob)
    while start < end:
        stop = end
        if end - start > chunk:
            cut = blob.rfind(b"\n", start, start + chunk)
            stop = (cut if cut >= start else blob.index(b"\n", start)) + 1
        record = logging.LogRecord("lucid.access", logging.INFO, "", 0,
                                   blob[start:stop - 1].decode(), None, None)
        handler.handle(record)  # the handler adds the last newline
        start = stop


def batches(stream: BinaryIO) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        head = stream.read(4)
        if len(head) < 4:
            return
        size = int.from_bytes(head, "big")
        data = stream.read(size)
        if len(data) < size:
            return
        yield pickle.loads(data)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = json.loads(argv[1])
    handler = handler_for(args)
    try:
        for batch in batches(sys.stdin.buffer):
            try:
                write(handler, lines(batch), args["chunk"])
            except Exception:  # noqa: BLE001 - one bad batch must not stop the log
                logging.getLogger("lucid.monitoring").exception(
                    "monitoring: access-log writer: a batch of %d lines failed", len(batch))
    finally:
        handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
