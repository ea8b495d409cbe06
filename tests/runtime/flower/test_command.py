"""The ``fl2ora flower`` command's checks that run before any Flower process starts."""

import sys
from pathlib import Path

import pytest

from fl2ora.cli import main
from fl2ora.rundir import CONFIG_FILE, MARKER_FILE
from fl2ora.runtime.flower.command import INSTALL_FLOWER_EXTRA

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def forget_flower_modules(monkeypatch):
    """Drop the cached Flower runtime modules (restored after the test) so that the command imports them again."""
    for name in list(sys.modules):
        if name.startswith("fl2ora.runtime.flower.") and name != "fl2ora.runtime.flower.command":
            monkeypatch.delitem(sys.modules, name)


class UninstalledFinder:
    """Import finder that fails a package and its submodules as Python does when the package is not installed."""

    def __init__(self, package):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@pytest.mark.parametrize("missing", ["tomli_w", "flwr"])
def test_missing_flower_extra_one_line(monkeypatch, capsys, tmp_path, missing):
    forget_flower_modules(monkeypatch)
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [UninstalledFinder(missing), *sys.meta_path])
    output = tmp_path / "run"

    code = main(["flower", QUICKSTART, "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        f"fl2ora: error: fl2ora flower needs the module {missing!r}, which is not installed. "
        f"Install the flower extra: {INSTALL_FLOWER_EXTRA}\n"
    )
    assert not output.exists()
    assert not Path(str(output) + ".flower").exists()


def test_install_hint_is_documented():
    pyproject = (REPO / "pyproject.toml").read_text()
    guide = (REPO / "docs" / "flower.md").read_text()
    assert "\nflower = [" in pyproject
    assert INSTALL_FLOWER_EXTRA.replace("'", '"') in guide


def test_missing_fl2ora_module_still_raises(monkeypatch):
    forget_flower_modules(monkeypatch)
    monkeypatch.setitem(sys.modules, "fl2ora.runtime.flower.processes", None)

    with pytest.raises(ModuleNotFoundError) as raised:
        main(["flower", QUICKSTART, "--output", "unused"])

    assert raised.value.name == "fl2ora.runtime.flower.processes"


class FederationStarted(Exception):
    """Raised by the stand-in federation, so that a test can tell that the command got that far."""


@pytest.fixture
def no_federation(monkeypatch):
    """Replace the local federation with a stand-in that raises instead of starting processes."""
    pytest.importorskip("flwr")
    from fl2ora.runtime.flower import deploy

    def raise_instead_of_starting(*args, **kwargs):
        raise FederationStarted

    monkeypatch.setattr(deploy, "LocalFederation", raise_instead_of_starting)


def folder_listing(folder):
    return sorted((str(path.relative_to(folder)), path.read_text()) for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
def test_foreign_output_folder_rejected_like_run(no_federation, capsys, tmp_path, overwrite):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("not an fl2ora run\n")
    before = folder_listing(output)
    flag = ["--overwrite"] if overwrite else []

    run_code = main(["run", QUICKSTART, "--output", str(output), *flag])
    run_error = capsys.readouterr().err
    flower_code = main(["flower", QUICKSTART, "--output", str(output), *flag])
    flower_error = capsys.readouterr().err

    assert run_code == 2
    assert flower_code == 2
    assert flower_error == run_error
    assert flower_error.count("\n") == 1
    assert repr(str(output)) in flower_error
    assert folder_listing(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]


def test_unfinished_run_without_overwrite_rejected(no_federation, capsys, tmp_path):
    output = tmp_path / "previous"
    output.mkdir()
    (output / MARKER_FILE).write_text("This folder is an fl2ora run directory.\n")
    (output / CONFIG_FILE).write_text("name: previous\n")

    code = main(["flower", QUICKSTART, "--output", str(output)])

    error = capsys.readouterr().err
    assert code == 2
    assert error == (
        f"fl2ora: error: Output folder {str(output)!r} already holds an unfinished run. Choose another --output, "
        f"pass --overwrite to replace it or continue it with fl2ora run --resume {output}.\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["previous"]


def test_marked_run_folder_overwrite_reaches_federation(no_federation, tmp_path):
    output = tmp_path / "previous"
    output.mkdir()
    (output / MARKER_FILE).write_text("This folder is an fl2ora run directory.\n")
    (output / CONFIG_FILE).write_text("name: previous\n")

    with pytest.raises(FederationStarted):
        main(["flower", QUICKSTART, "--output", str(output), "--overwrite", "--quiet"])

    # The ServerApp replaces the folder later, so nothing is removed before the federation starts.
    assert (output / CONFIG_FILE).read_text() == "name: previous\n"
