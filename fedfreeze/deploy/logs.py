"""Log lines a monitoring system can read: a timestamp on every line, no terminal control codes,
optionally JSON, optionally a rotating file.

The coordinator's and a site's Flower processes (SuperLink or SuperNode, their superexec, the
ServerApp or ClientApps) all write to one pipe that ``fedfreeze server`` / ``site`` reads
(``supervise.py``); every line passes through a ``LogSink`` here. Flower's own lines carry no time
(``INFO :      Starting ...``), colour codes when Flower thinks it writes to a terminal, and tqdm's
carriage returns; uvicorn's lines carry a time of their own. The sink adds the time where a line
has none, takes the level from the line, drops the control codes unless the output is a terminal,
and writes the result to the console and, with ``--log-file``, to a file rotated by size.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

LOG_FORMATS = ("text", "json")
ROTATE_BYTES = 10 * 1024 * 1024  # a log file is rotated at 10 MB ...
ROTATE_KEEP = 5  # ... keeping 5 old files: at most 60 MB per process

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # CSI sequences (colours, cursor) and 2-byte escapes
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # what is left of other control characters (tab kept)
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Flower's console format: "INFO :      message" (the level padded, then a colon)
FLOWER_LINE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s*:\s?(?P<message>.*)$")
# uvicorn's format as Flower configures it: "2026-12-07T21:33:43.342Z INFO [uvicorn.error] message"
STAMPED_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?) (?P<level>[A-Z]+) \[(?P<logger>[^\]]+)\] (?P<message>.*)$"
)


def clean(raw: str) -> str:
    """A line as a file should hold it: colour codes gone; of a progress bar redrawn with carriage
    returns, only its last state; no other control character."""
    text = ANSI.sub("", raw.rstrip("\n"))
    if "\r" in text:
        parts = [part for part in text.split("\r") if part.strip()]
        text = parts[-1] if parts else ""
    return CONTROL.sub("", text)


def now_iso() -> str:
    """UTC with milliseconds and a Z, as uvicorn's lines show it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Entry:
    """One log line, parsed."""

    time: str
    level: str
    message: str
    logger: str | None = None

    def text(self) -> str:
        return f"{self.time} {self.level:<7} " + (f"[{self.logger}] " if self.logger else "") + self.message

    def json(self, process: str) -> str:
        record = {"time": self.time, "level": self.level, "process": process, "message": self.message}
        if self.logger:
            record["logger"] = self.logger
        return json.dumps(record, ensure_ascii=False)


def parse(line: str, previous_level: str = "INFO") -> Entry:
    """A cleaned line as an entry; a line without a level (a traceback's, a program's plain output)
    keeps the level of the line before it."""
    stamped = STAMPED_LINE.match(line)
    if stamped:
        level = stamped["level"] if stamped["level"] in LEVELS else previous_level
        time = stamped["time"] if stamped["time"].endswith("Z") else stamped["time"] + "Z"
        return Entry(time, level, stamped["message"], stamped["logger"])
    flower = FLOWER_LINE.match(line)
    if flower:
        level = "WARNING" if flower["level"] == "WARN" else flower["level"]
        return Entry(now_iso(), level, flower["message"].strip())
    return Entry(now_iso(), previous_level, line)


@dataclass
class LogSink:
    """Where a long-running command's lines go: the console and, optionally, a rotating file.

    ``process`` names the writer in JSON lines (``coordinator``, ``site site-a``). Control codes are
    kept only for a console that is a terminal; the file never gets them.
    """

    process: str
    fmt: str = "text"
    console: IO[str] | None = None
    log_file: Path | None = None
    _file: logging.Handler | None = field(default=None, init=False, repr=False)
    _level: str = field(default="INFO", init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.fmt not in LOG_FORMATS:
            raise ValueError(f"log format {self.fmt!r}: allowed {', '.join(LOG_FORMATS)}")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                self.log_file, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._file = handler

    def write(self, raw: str) -> None:
        """One line of a child's output (or several, split here)."""
        for piece in raw.rstrip("\n").split("\n"):
            self._write_one(piece)

    def note(self, message: str, level: str = "INFO", *, console: bool = True) -> None:
        """fedfreeze's own line (what it starts, why it stopped), with the same time and format;
        ``console=False``: the log file only (the line goes to stderr as the command's error)."""
        self._emit(Entry(now_iso(), level, message), raw=None, console=console)

    def _write_one(self, raw: str) -> None:
        line = clean(raw)
        if not line.strip():
            return
        with self._lock:
            entry = parse(line, self._level)
            self._level = entry.level
        self._emit(entry, raw=raw.rstrip("\n"))

    def _emit(self, entry: Entry, raw: str | None, console: bool = True) -> None:
        formatted = entry.json(self.process) if self.fmt == "json" else entry.text()
        with self._lock:
            out = self.console or sys.stdout
            if console and self.fmt == "text" and raw is not None and out.isatty():
                # a terminal keeps Flower's colours; the time goes in front unless the line has its own
                out.write((raw if STAMPED_LINE.match(clean(raw)) else f"{entry.time} {raw}") + "\n")
                out.flush()
            elif console:
                out.write(formatted + "\n")
                out.flush()
            if self._file is not None:
                self._file.emit(logging.LogRecord("fedfreeze", logging.INFO, "", 0, formatted, None, None))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
