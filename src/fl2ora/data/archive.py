"""Unpack dataset archives once into a cache folder.

An archive is unpacked into ``<cache>/<archive stem>-<size>-<mtime_ns>/``, so a changed archive gets a
new folder. Extraction goes into a temporary folder in the same cache, which is renamed into place only
after every member and a completion marker are written. A reader therefore sees either no folder or a
complete one, and two processes that unpack the same archive at once both end up using one copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "FL2ORA_CACHE"
COMPLETE_MARKER = ".fl2ora-extracted"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def is_archive(path: str | Path) -> bool:
    """Return whether ``path`` names a tar archive that :func:`extract_archive` accepts, by suffix."""
    return str(path).lower().endswith(_ARCHIVE_SUFFIXES)


def default_cache_dir() -> Path:
    """Return the cache folder: ``$FL2ORA_CACHE`` if set, else ``~/.cache/fl2ora``."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "fl2ora"


def _archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Raise ValueError if a member could write outside the target folder or is not a file or folder."""
    for member in members:
        path = PurePosixPath(member.name.replace("\\", "/"))
        has_drive = bool(path.parts) and path.parts[0].endswith(":")
        if path.is_absolute() or has_drive:
            raise ValueError(f"Unsafe archive {archive}: member {member.name!r} has an absolute path.")
        if ".." in path.parts:
            raise ValueError(f"Unsafe archive {archive}: member {member.name!r} contains '..'.")
        if member.issym() or member.islnk():
            raise ValueError(
                f"Unsafe archive {archive}: member {member.name!r} is a link to {member.linkname!r}. "
                "Only regular files and folders are extracted."
            )
        if not (member.isfile() or member.isdir()):
            raise ValueError(
                f"Unsafe archive {archive}: member {member.name!r} is not a regular file or folder."
            )


def _extract_into(archive: Path, destination: Path) -> int:
    """Extract every member of ``archive`` into ``destination`` and return the number of members."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_members(archive, members)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(destination, members=members, filter="data")
            else:
                # NOTE: Python before 3.11.4 has no extraction filters. The member checks above
                # reject absolute paths, '..', links and special files, which covers what the
                # "data" filter rejects except permission bits.
                tar.extractall(destination, members=members)
    except tarfile.TarError as error:
        # tarfile.FilterError (a TarError) exists from Python 3.11.4 on.
        if isinstance(error, getattr(tarfile, "FilterError", ())):
            raise ValueError(f"Unsafe archive {archive}: {error}") from error
        raise ValueError(
            f"Cannot read archive {archive}: {error}. Check that it is a complete tar archive, and "
            "download or copy it again if it was truncated."
        ) from error
    return len(members)


def extract_archive(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Unpack a tar archive into the cache once, and return the folder it was unpacked into.

    The folder is ``<cache_dir>/<stem>-<size in bytes>-<mtime in ns>``, where ``stem`` is the archive
    name without its suffix. A folder that exists and contains the completion marker is reused without
    reading the archive. Members with absolute paths or ``..``, links and special files are rejected,
    and extraction uses tarfile's ``"data"`` filter where available.

    Args:
        archive: path of a ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz`` or ``.tar`` file.
        cache_dir: folder to unpack into; defaults to :func:`default_cache_dir`.

    Returns:
        The folder holding the archive's members, e.g. ``<cache>/cifar10-19631888-.../cifar10/...``
        for an archive whose members start with ``cifar10/``.

    Raises:
        FileNotFoundError: if ``archive`` is not an existing file.
        ValueError: if the archive cannot be read or contains an unsafe member.
    """
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise FileNotFoundError(
            f"Archive not found: {archive}. Pass the path of an existing .tar.gz file."
        )
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stat = archive.stat()
    target = cache_root / f"{_archive_stem(archive.name)}-{stat.st_size}-{stat.st_mtime_ns}"
    marker = target / COMPLETE_MARKER
    if marker.is_file():
        logger.debug("Reusing %s unpacked at %s", archive, target)
        return target

    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=cache_root))
    try:
        logger.info("Unpacking %s into %s", archive, target)
        count = _extract_into(archive, staging)
        staging.chmod(0o755)  # mkdtemp creates it private (0o700)
        (staging / COMPLETE_MARKER).write_text(f"{archive.resolve()}\n{count} members\n")

        if target.exists() and not marker.is_file():
            # A folder without the marker was left by an interrupted copy or made by hand, so replace it.
            logger.warning("Replacing incomplete folder %s", target)
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            # Another process renamed its complete copy into place first.
            if not marker.is_file():
                raise
            logger.debug("Another process unpacked %s first, so %s is reused", archive, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
