"""Run an fl2ora job on a real Flower federation on this host: one SuperLink, N SuperNodes.

``fl2ora flower CONFIG`` calls :func:`run_local_deployment`, which

1. generates a CA and a server certificate for 127.0.0.1 (unless ``insecure``),
2. starts ``flower-superlink`` on ``127.0.0.1:<free port>`` and one
   ``flower-supernode`` per partition (``--node-config 'partition-id=k num-partitions=K'``),
   each in its own session, with ``FLWR_HOME`` inside the federation folder,
   telemetry off and no update check,
3. submits the job with ``flwr run <app> fl2ora-local --stream`` through a named
   connection with an explicit address, and copies the streamed log to
   ``<folder>/logs/run.log``,
4. reads the outcome from ``flwr ls --run-id <id> --format json``, because
   ``flwr run`` exits 0 even when the run failed, and
5. stops the processes it started and every descendant it saw, also on an error,
   Ctrl-C or SIGTERM.

Every socket binds or connects to 127.0.0.1 only. The federation folder defaults
to ``<output>.flower`` next to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from fl2ora.config import RunConfig, config_from_dict, config_to_dict
from fl2ora.rundir import check_output_folder
from fl2ora.runtime.flower.processes import ProcessTracker
from fl2ora.runtime.flower.project import write_app_project
from fl2ora.runtime.flower.server_app import FlowerRunSettings
from fl2ora.runtime.flower.tls import TlsFiles, generate_tls_files

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION_NAME = "fl2ora-local"
FOLDER_MARKER = ".fl2ora-federation"
"""File that marks a folder as a federation folder, which a later launch may reuse."""
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Return this process's environment for a Flower process with its own ``FLWR_HOME``.

    Telemetry and the update check are off, and the folder of this Python's scripts
    comes first on ``PATH``, because the SuperLink and SuperNodes start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _executable(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH. Install fl2ora[flower].")
    return path


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"flower-superlink exited with code {process.returncode} during start-up:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not accept connections on {HOST}:{port} within {timeout:.0f} s; see {log_path}.")


@dataclass
class RunOutcome:
    """The result of one ``flwr run``, as ``flwr ls`` reports it."""

    run_id: int | None
    status: str
    """``finished:completed`` on success; ``finished:failed``, ``finished:stopped`` or
    a non-final status otherwise; ``not-started`` when no run id was returned."""
    details: str = ""
    listing: dict[str, Any] = field(default_factory=dict)
    """The run's entry of ``flwr ls --format json`` (traffic, compute time, timestamps)."""

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, stopped on exit from the ``with`` block.

    Args:
        folder: federation folder for certificates, Flower state (``FLWR_HOME``),
            logs and the process list ``processes.json``; created if missing. A
            non-empty folder is only accepted when an earlier launch created it.
        node_configs: one ``node_config`` per SuperNode.
        insecure: run without TLS. Only for debugging: traffic is unencrypted.
        startup_timeout: seconds to wait for the SuperLink to accept connections.
    """

    def __init__(
        self,
        folder: str | Path,
        node_configs: Sequence[Mapping[str, Any]],
        insecure: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        if not node_configs:
            raise ValueError("A federation needs at least one SuperNode; node_configs is empty.")
        self.folder = Path(folder).resolve()
        self.node_configs = [dict(c) for c in node_configs]
        self.insecure = insecure
        self.startup_timeout = startup_timeout
        self.tracker = ProcessTracker()
        self.superlink_port: int | None = None
        self.tls: TlsFiles | None = None
        self.flwr_home = self.folder / "flwr" / "cli"
        self.logs = self.folder / "logs"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _prepare_folder(self) -> None:
        if self.folder.exists() and any(self.folder.iterdir()) and not (self.folder / FOLDER_MARKER).exists():
            raise FileExistsError(
                f"Federation folder {str(self.folder)!r} is not empty and was not made by fl2ora. "
                "Choose another --flower-dir."
            )
        for stale in ("flwr", "certs", "logs"):
            shutil.rmtree(self.folder / stale, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.folder / FOLDER_MARKER).write_text("Created by fl2ora's Flower launcher; safe to delete.\n")

    def start(self) -> None:
        """Generate certificates, start the SuperLink, wait for its port, start the SuperNodes."""
        self._prepare_folder()
        if self.insecure:
            logger.warning("Starting the federation WITHOUT TLS (insecure mode): traffic is unencrypted")
        else:
            self.tls = generate_tls_files(self.folder / "certs", hosts=[HOST, "localhost"])

        # SuperLink: Fleet, Control and Runtime APIs on one HTTP port.
        self.superlink_port = free_port()
        command = [_executable("flower-superlink"), "--host", HOST, "--port", str(self.superlink_port),
                   "--disable-runtime-dependency-installation"]
        command += ["--insecure"] if self.tls is None else [
            "--ssl-ca-certfile", str(self.tls.ca_certificate),
            "--ssl-certfile", str(self.tls.server_certificate),
            "--ssl-keyfile", str(self.tls.server_key),
        ]
        log_path = self.logs / "superlink.log"
        self._start_logged("superlink", command, self.flwr_home, log_path)
        _wait_for_port(self.superlink_port, self.tracker.started["superlink"], self.startup_timeout, log_path)
        self._write_connection_config()

        # SuperNodes: each with its own FLWR_HOME and Runtime API port for its ClientApps.
        for index, node_config in enumerate(self.node_configs):
            command = [
                _executable("flower-supernode"),
                "--superlink", f"{HOST}:{self.superlink_port}",
                "--host", HOST,
                "--port", str(free_port()),
                "--node-config", _node_config_argument(node_config),
            ]
            command += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_certificate)]
            self._start_logged(
                f"supernode-{index}", command, self.folder / "flwr" / f"supernode-{index}",
                self.logs / f"supernode-{index}.log",
            )
        self.tracker.watch()
        self._write_process_list()
        logger.info(
            "Federation up: SuperLink on %s:%d (%s), %d SuperNodes; folder %s",
            HOST, self.superlink_port, "insecure" if self.tls is None else "TLS", len(self.node_configs), self.folder,
        )

    def _start_logged(self, name: str, command: list[str], flwr_home: Path, log_path: Path) -> None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_stream:
            self.tracker.start(
                name, command, cwd=self.folder, env=flower_environment(flwr_home),
                stdin=subprocess.DEVNULL, stdout=log_stream, stderr=subprocess.STDOUT,
            )

    def _write_connection_config(self) -> None:
        connection: dict[str, Any] = {"address": f"{HOST}:{self.superlink_port}"}
        if self.tls is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.tls.ca_certificate)
        config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def _write_process_list(self) -> None:
        self.tracker.scan()
        payload = {
            "started": {name: process.pid for name, process in self.tracker.started.items()},
            "seen": {str(pid): start for pid, start in self.tracker.seen.items()},
        }
        temporary = self.folder / "processes.json.tmp"
        temporary.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(temporary, self.folder / "processes.json")

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``index`` and its process group (fault injection)."""
        self.tracker.kill(f"supernode-{index}", sig)

    def stop(self) -> None:
        """Stop every process this federation started, and their descendants."""
        self.tracker.stop_all()
        if self.tracker.started:
            self._write_process_list()
        left = self.tracker.running()
        if left:
            logger.error("Processes %s are still running after the federation stopped", sorted(left))

    # -- running a job -----------------------------------------------------------------------

    def _flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_executable("flwr"), *args], cwd=self.folder, env=flower_environment(self.flwr_home),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        echo: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> RunOutcome:
        """Submit the app, stream its log until the run ends, and return its outcome.

        Args:
            app_dir: the Flower app folder (see :func:`~fl2ora.runtime.flower.project.write_app_project`).
            run_config: run config values (``[tool.flwr.app.config]`` keys).
            echo: called with every streamed log line (ANSI colours kept).
            timeout: seconds before the run is stopped with ``flwr stop``; None waits.
        """
        overrides = self.folder / "run_config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        command = [_executable("flwr"), "run", str(app_dir), CONNECTION_NAME, "--stream", "--run-config", str(overrides)]
        logger.info("Submitting: %s", " ".join(command))
        run_id: int | None = None
        with (self.logs / "run.log").open("a") as log_stream:
            process = subprocess.Popen(
                command, cwd=self.folder, env=flower_environment(self.flwr_home), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            )
            found: dict[str, int] = {}

            def pump() -> None:
                for line in process.stdout or ():
                    log_stream.write(_ANSI_ESCAPE.sub("", line))
                    log_stream.flush()
                    if echo is not None:
                        echo(line.rstrip("\n"))
                    match = _RUN_STARTED.search(_ANSI_ESCAPE.sub("", line))
                    if match and "run_id" not in found:
                        found["run_id"] = int(match.group(1))

            reader = threading.Thread(target=pump, name="fl2ora-flwr-run-log", daemon=True)
            reader.start()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.error("The run did not finish within %.0f s; stopping it", timeout)
                if "run_id" in found:
                    self._flwr("stop", str(found["run_id"]), CONNECTION_NAME, timeout=60)
                process.kill()
                process.wait()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            reader.join(timeout=10)
            run_id = found.get("run_id")

        if run_id is None:
            return RunOutcome(run_id=None, status="not-started", details=f"flwr run exited with code {process.returncode}")
        return self.outcome(run_id)

    def outcome(self, run_id: int, wait: float = 60.0) -> RunOutcome:
        """Read the run's status from ``flwr ls --format json``, waiting up to ``wait`` s for it to finish."""
        deadline = time.monotonic() + wait
        while True:
            result = self._flwr("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json", timeout=60)
            try:
                runs = json.loads(result.stdout).get("runs", [])
            except json.JSONDecodeError:
                runs = []
            entry = next((r for r in runs if str(r.get("run-id")) == str(run_id)), None)
            finished = entry is not None and str(entry.get("status", "")).startswith("finished")
            if finished or time.monotonic() >= deadline:
                break
            time.sleep(2.0)
        if entry is None:
            return RunOutcome(run_id=run_id, status="unknown", details=(result.stdout + result.stderr)[-2000:])
        return RunOutcome(
            run_id=run_id, status=str(entry.get("status")), details=str(entry.get("status-details", "")), listing=entry,
        )


def _node_config_argument(node_config: Mapping[str, Any]) -> str:
    """Format a node_config as ``--node-config`` expects: space-separated ``key=value`` with TOML values."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the block runs, so clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_paths(config: RunConfig, base: Path | None = None) -> RunConfig:
    """Return ``config`` with a relative ``data.root`` made absolute against ``base`` (default: cwd).

    The ServerApp and ClientApps run in other working folders than the launcher.
    """
    values = config_to_dict(config)
    root = Path(values["data"]["root"]).expanduser()
    if not root.is_absolute():
        values["data"]["root"] = str(((base or Path.cwd()) / root).resolve())
    return config_from_dict(values)


def run_local_deployment(
    config: RunConfig,
    output: str | Path,
    *,
    folder: str | Path | None = None,
    overwrite: bool = False,
    insecure: bool = False,
    min_replies: int = 1,
    round_timeout: float = 600.0,
    node_wait_timeout: float = 300.0,
    run_timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
    on_started: Callable[[LocalFederation], None] | None = None,
) -> RunOutcome:
    """Run ``config`` on a local TLS federation with one SuperNode per client.

    Args:
        config: the fl2ora configuration; ``partition.num_clients`` SuperNodes start.
        output: the run directory the ServerApp fills, as ``fl2ora run --output``.
        folder: the federation folder; default ``<output>.flower``.
        overwrite: replace a run directory that already contains a run.
        insecure: no TLS (debugging only).
        min_replies, round_timeout, node_wait_timeout: see
            :class:`~fl2ora.runtime.flower.server_app.FlowerRunSettings`.
        run_timeout: seconds before the run is stopped; None waits.
        echo: called with every line of the streamed run log.
        on_started: called once the federation is up, before the job is submitted.

    Returns:
        The outcome read from ``flwr ls``; check :attr:`RunOutcome.succeeded`.

    Raises:
        FileExistsError: when ``output`` contains a run and ``overwrite`` is false, when
            ``output`` is a non-empty folder without fl2ora's run marker, or when
            ``folder`` contains files fl2ora did not make.
        FileNotFoundError: when the Flower executables are not installed.
    """
    # Checked here because the ServerApp's own check runs only once the whole federation is up.
    check_output_folder(Path(output), overwrite)
    output = Path(output).resolve()
    folder = Path(folder) if folder is not None else output.with_name(output.name + ".flower")
    config = resolve_paths(config)
    num_clients = config.partition.num_clients

    with _sigterm_as_interrupt(), LocalFederation(
        folder, [{"partition-id": k, "num-partitions": num_clients} for k in range(num_clients)], insecure=insecure
    ) as federation:
        config_path = federation.folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        settings = FlowerRunSettings(
            config=str(config_path), output=str(output), overwrite=overwrite, min_replies=min_replies,
            round_timeout=round_timeout, node_wait_timeout=node_wait_timeout,
        )
        app_dir = write_app_project(federation.folder / "app")
        if on_started is not None:
            on_started(federation)
        outcome = federation.run(app_dir, settings.to_run_config(), echo=echo, timeout=run_timeout)

    log = logger.info if outcome.succeeded else logger.error
    log("Run %s ended with status %s %s", outcome.run_id, outcome.status, outcome.details)
    return outcome
