"""Track the processes a launcher starts, with their descendants, and stop exactly those.

Flower's SuperLink and SuperNodes start helper processes (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``), some in new sessions, so signalling the
launcher's process groups is not enough. :class:`ProcessTracker` records every
descendant it finds, by pid and start time, from a background thread, and
:meth:`ProcessTracker.stop_all` signals exactly those that are still running. The
start time guards against a reused pid.

NOTE: descendants are found through ``/proc`` (Linux). Elsewhere only the started
processes and their process groups are stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """One process: its parent and its start time in clock ticks since boot."""

    pid: int
    ppid: int
    start_time: int
    zombie: bool


def read_process(pid: int) -> ProcessInfo | None:
    """Return ``/proc/<pid>/stat``'s parent, start time and zombie state, or None when gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces, so split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return ProcessInfo(pid=pid, ppid=int(fields[1]), start_time=int(fields[19]), zombie=fields[0] == "Z")


def process_table() -> dict[int, ProcessInfo]:
    """Return every readable process of ``/proc`` by pid (empty where there is no ``/proc``)."""
    table = {}
    if not _PROC.is_dir():
        return table
    for entry in os.listdir(_PROC):
        if entry.isdigit():
            info = read_process(int(entry))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root_pids: set[int], table: dict[int, ProcessInfo]) -> list[ProcessInfo]:
    """Return every process in ``table`` whose chain of parents reaches one of ``root_pids``."""
    children: dict[int, list[ProcessInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    found, frontier = [], list(root_pids)
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child.pid)
    return found


def is_running(pid: int, start_time: int) -> bool:
    """Return whether the process ``pid`` started at ``start_time`` still runs (zombies do not)."""
    info = read_process(pid)
    return info is not None and info.start_time == start_time and not info.zombie


class ProcessTracker:
    """Start processes in new sessions and remember them and their descendants.

    Args:
        poll_interval: seconds between descendant scans while :meth:`watch` runs.
    """

    def __init__(self, poll_interval: float = 0.5) -> None:
        self.poll_interval = poll_interval
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, int] = {}
        """pid -> start time of every started process and descendant seen so far."""
        self._lock = threading.Lock()
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, name: str, command: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``command`` in a new session (its own process group) and track it as ``name``."""
        process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
        with self._lock:
            self.started[name] = process
            info = read_process(process.pid)
            if info is not None:
                self.seen[process.pid] = info.start_time
        logger.info("Started %s (pid %d): %s", name, process.pid, " ".join(command))
        return process

    def scan(self) -> None:
        """Record the current descendants of the started processes."""
        with self._lock:
            # Only live processes count as parents, so a reused pid never adopts strangers.
            roots = {pid for pid, start_time in self.seen.items() if is_running(pid, start_time)}
            for info in descendants(roots, process_table()):
                if not info.zombie:
                    self.seen.setdefault(info.pid, info.start_time)

    def watch(self) -> None:
        """Scan in a background thread until :meth:`stop_all`."""
        if self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop_watching.wait(self.poll_interval):
                self.scan()

        self._watcher = threading.Thread(target=loop, name="fl2ora-process-tracker", daemon=True)
        self._watcher.start()

    def running(self) -> dict[int, int]:
        """Return the tracked processes that still run, pid -> start time."""
        with self._lock:
            return {pid: start for pid, start in self.seen.items() if is_running(pid, start)}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of the started process ``name`` (after a scan)."""
        self.scan()
        process = self.started[name]
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            logger.warning("%s (pid %d) had already exited", name, process.pid)
            return
        logger.warning("Sent signal %d to %s (process group %d)", sig, name, process.pid)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every tracked process: SIGTERM, then SIGKILL after ``grace`` seconds.

        The started processes get SIGTERM in reverse start order, so that Flower
        shuts down its own helpers. Any tracked process that still runs after
        ``grace`` seconds gets SIGKILL.
        """
        self.scan()
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        for name, process in reversed(list(self.started.items())):
            if process.poll() is None:
                logger.info("Stopping %s (pid %d)", name, process.pid)
                process.terminate()
        deadline = time.monotonic() + grace
        for process in self.started.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)

        for pid, start_time in self.running().items():
            if is_running(pid, start_time):
                logger.warning("Process %d still runs after %.0f s; sending SIGKILL", pid, grace)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_deadline = time.monotonic() + 5.0
        while self.running() and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        for name, process in self.started.items():
            # Without /proc only the groups of the started processes can be swept.
            if not _PROC.is_dir():
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                logger.error("%s (pid %d) did not exit after SIGKILL", name, process.pid)
        for name, process in self.started.items():
            if process.returncode not in (0, -signal.SIGTERM):
                logger.info("%s exited with code %s", name, process.returncode)
