"""Progress lines of the library's long loops (epochs, surface rows, attacks, models), for a driver.

A loop writes one line per step into the file that the environment names (`ADVKIT_PROGRESS_LOG`,
set by `python -m advkit run` for each notebook's kernel to `runs/<run>/log.txt`, with the label
`ADVKIT_PROGRESS_LABEL`, the notebook's name); without it nothing is written, so a notebook run in
JupyterLab or nbval prints exactly what it printed before. Lines are throttled per process to one
every `ADVKIT_PROGRESS_INTERVAL` seconds (default 10); a loop that wrote a line also writes its last one.
The driver follows the file (`follow`) and prints the new lines on its terminal.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOG_VARIABLE = "ADVKIT_PROGRESS_LOG"  # the file that progress lines are appended to
LABEL_VARIABLE = "ADVKIT_PROGRESS_LABEL"  # who writes them (a notebook's name)
INTERVAL_VARIABLE = "ADVKIT_PROGRESS_INTERVAL"  # seconds between two lines of one process
DEFAULT_INTERVAL_S = 10.0

_last_line = {"time": float("-inf")}  # when this process last wrote a throttled line


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_line(label: str, text: str, now: float | None = None) -> str:
    """One log line: local time stamp, [label], text."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{stamp} [{label}] {text}"


def append(path: str | Path, label: str, text: str) -> None:
    """Append one line to `path` (one write, so that lines of several processes do not mix)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(format_line(label, text) + "\n")


class LoopProgress:
    """Progress of one loop of `total` steps of `unit` (epoch, row, attack, model), `done` of them
    already (a resumed loop): `step(done, detail)` after each step writes a line with the elapsed
    time and an ETA from this call's own pace. Inactive (a no-op) unless ADVKIT_PROGRESS_LOG is set."""

    def __init__(self, what: str, unit: str, total: int, done: int = 0):
        self.path = os.environ.get(LOG_VARIABLE)
        if not self.path:
            return
        self.label = os.environ.get(LABEL_VARIABLE) or "advkit"
        raw = os.environ.get(INTERVAL_VARIABLE) or DEFAULT_INTERVAL_S
        try:
            self.interval = float(raw)
        except ValueError:
            raise ValueError(f"{INTERVAL_VARIABLE}={raw!r} must be a number of seconds") from None
        self.what, self.unit, self.total, self.initial = what, unit, total, done
        self.start, self.written = time.monotonic(), 0

    def step(self, done: int, detail: str = "") -> None:
        if not self.path:
            return
        now = time.monotonic()
        last = done >= self.total
        if now - _last_line["time"] < self.interval and not (last and self.written):
            return  # throttled; a loop that showed a line still shows its last one
        elapsed = now - self.start
        pace = elapsed / (done - self.initial) if done > self.initial else None
        eta = "?" if pace is None else duration(pace * max(self.total - done, 0))
        text = f"{self.what}: {self.unit} {done}/{self.total}" + (f", {detail}" if detail else "")
        append(self.path, self.label, f"{text} (elapsed {duration(elapsed)}, ETA {eta})")
        self.written += 1
        _last_line["time"] = now


def follow(path: str | Path, label: str, echo: Callable[[str], None], stop: threading.Event,
           poll_s: float = 0.2) -> None:
    """Pass each line that `label` appends to `path` from now on to `echo`, until `stop` is set
    (then the lines written up to that moment, and return). For a thread of the driver."""
    path = Path(path)
    offset = path.stat().st_size if path.exists() else 0
    tag, pending = f" [{label}] ", b""
    while True:
        stopping = stop.is_set()
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()  # a line still being written
            for line in lines:
                text = line.decode("utf-8", errors="replace")
                if tag in text:
                    echo(text)
        if stopping:
            return
        stop.wait(poll_s)


@contextlib.contextmanager
def following(path: str | Path, label: str, echo: Callable[[str], None]) -> Iterator[None]:
    """Inside: processes started here (a notebook's kernel) write their progress lines to `path`
    with `label`, and a thread passes them to `echo` as they come; on leaving, the last ones are
    passed on and the environment is restored."""
    saved = {k: os.environ.get(k) for k in (LOG_VARIABLE, LABEL_VARIABLE)}
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(path, label, echo, stop), name=f"progress {label}", daemon=True)
    follower.start()
    os.environ.update({LOG_VARIABLE: str(path), LABEL_VARIABLE: label})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop.set()
        follower.join()
