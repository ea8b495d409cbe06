"""Pieces of the local deployment launcher: certificates, process tracking, arguments, folders."""

import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fl2ora.config import config_from_dict  # noqa: E402
from fl2ora.runtime.flower.deploy import (  # noqa: E402
    FOLDER_MARKER,
    LocalFederation,
    _node_config_argument,
    flower_environment,
    free_port,
    resolve_paths,
)
from fl2ora.runtime.flower.processes import ProcessTracker, is_running  # noqa: E402
from fl2ora.runtime.flower.tls import generate_tls_files  # noqa: E402


def handshake(files, ca_certificate):
    """Serve one TLS handshake on 127.0.0.1 with ``files`` and connect trusting ``ca_certificate``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.server_certificate, files.server_key)
    client_context = ssl.create_default_context(cafile=str(ca_certificate))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return tls.version()
        finally:
            thread.join(timeout=5)


@pytest.mark.skipif(not hasattr(ssl, "PROTOCOL_TLS_SERVER"), reason="ssl without server-side TLS")
def test_certificate_verifies_with_own_ca(tmp_path):
    files = generate_tls_files(tmp_path / "a")
    other = generate_tls_files(tmp_path / "b")
    assert handshake(files, files.ca_certificate).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, other.ca_certificate)
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("hosts, valid_days, error", [([], 7, "at least one address"), (None, 0, "valid_days")])
def test_invalid_certificate_settings(tmp_path, hosts, valid_days, error):
    with pytest.raises(ValueError, match=error):
        generate_tls_files(tmp_path, hosts=hosts, valid_days=valid_days)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="descendant tracking reads /proc (Linux)")
def test_tracker_stops_descendants_in_other_sessions(tmp_path):
    # The child starts a grandchild in a new session, as the SuperLink starts flower-superexec.
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    tracker = ProcessTracker(poll_interval=0.1)
    child = tracker.start("parent", [sys.executable, "-c", script], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while len(tracker.seen) < 2 and time.monotonic() < deadline:
        tracker.scan()
        time.sleep(0.1)
    tracked = dict(tracker.seen)
    assert child.pid in tracked
    assert len(tracked) == 2
    grandchild = next(pid for pid in tracked if pid != child.pid)

    tracker.stop_all(grace=2.0)
    assert not any(is_running(pid, start) for pid, start in tracked.items())
    assert tracker.running() == {}
    assert child.returncode is not None
    assert not is_running(grandchild, tracked[grandchild])


def test_tracker_kill_signals_the_process_group():
    tracker = ProcessTracker()
    process = tracker.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    tracker.kill("sleeper")
    assert process.wait(timeout=10) == -9
    tracker.stop_all(grace=1.0)


@pytest.mark.parametrize(
    "node_config, expected",
    [
        ({"partition-id": 0, "num-partitions": 3}, "partition-id=0 num-partitions=3"),
        ({"data-root": "/data/my cifar"}, 'data-root="/data/my cifar"'),
        ({"flag": True, "share": 0.5}, "flag=true share=0.5"),
    ],
)
def test_node_config_argument(node_config, expected):
    assert _node_config_argument(node_config) == expected


def test_environment_and_ports_stay_local(tmp_path):
    env = flower_environment(tmp_path / "home")
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_relative_data_root_resolved(tmp_path):
    config = config_from_dict({"data": {"root": "data/cifar10.tar.gz"}})
    assert resolve_paths(config, base=tmp_path).data.root == str(tmp_path / "data" / "cifar10.tar.gz")
    absolute = config_from_dict({"data": {"root": "/srv/cifar10"}})
    assert resolve_paths(absolute, base=tmp_path).data.root == "/srv/cifar10"


def test_federation_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    federation = LocalFederation(tmp_path, [{"partition-id": 0, "num-partitions": 1}])
    with pytest.raises(FileExistsError, match="not made by fl2ora"):
        federation.start()
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / FOLDER_MARKER).exists()
    assert federation.tracker.started == {}


def test_federation_needs_a_supernode(tmp_path):
    with pytest.raises(ValueError, match="at least one SuperNode"):
        LocalFederation(tmp_path, [])
