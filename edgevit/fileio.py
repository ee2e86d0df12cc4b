"""Artifact I/O: atomic writes, one publisher for artifact folders, one reader for JSON artifacts.

An artifact is either the old file (or folder) or the complete new one, never half; edgevit
replaces only what it wrote itself (a folder of the same kind), never a user's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from edgevit.errors import EdgeVitError, OutputError


def cache_home() -> Path:
    """Where edgevit keeps what it downloads and builds once (the emulated board, the CUDA
    compilers): EDGEVIT_HOME, by default ~/.cache/edgevit."""
    return Path(os.environ.get("EDGEVIT_HOME", Path.home() / ".cache" / "edgevit"))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; pass a file path to write to")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror}); pass a writable path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """The parsed JSON at `path`; a missing or malformed file is a one-line error naming `what`
    the file should be and how to `fix` it."""
    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"{path}: no {what} there{' (it is a folder)' if path.is_dir() else ''}; {fix}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError, or a number past Python's int limit
        raise EdgeVitError(f"{path}: malformed {what} ({str(e).splitlines()[0][:120]}); {fix}") from None


def read_cache(path: str | os.PathLike | None) -> dict | None:
    """A JSON object edgevit keeps to resume work (profile rows, search state, tuning progress), or
    None when there is none or it is unreadable: a cache is never worth failing a run for."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_artifact(path: str | os.PathLike, kind: str, fix: str, versions: tuple[int, ...] = (1,)) -> dict:
    """A JSON artifact of `kind` at one of the `versions` this edgevit reads; anything else (a
    missing file, bad JSON, another kind, a newer version) is a one-line error ending in `fix`."""
    what = artifact_noun(kind)
    data = read_json(path, what, fix)
    found = data.get("kind") if isinstance(data, dict) else None
    if found != kind:
        raise EdgeVitError(f"{path}: not a {what} (kind {found or 'missing'}); {fix}")
    if data.get("version", 1) not in versions:
        raise EdgeVitError(f"{path}: {what} version {data.get('version')} is not one this edgevit reads "
                           f"({', '.join(map(str, versions))}); upgrade edgevit or {fix}")
    return data


NOUNS = {"edgevit.compiled": "compiled artifact manifest"}


def artifact_noun(kind: str) -> str:
    """How messages name an artifact kind: 'latency table' for edgevit.latency_table."""
    return NOUNS.get(kind, kind.removeprefix("edgevit.").replace("_", " "))


# ---------------------------------------------------------------------------- output paths


def check_output_file(path: str | os.PathLike, kind: str | None = None, option: str = "-o") -> Path:
    """Refuse, before any work, an output file path edgevit must not write: a folder, a place it
    cannot create or write, or an existing file it did not write (for a `kind` of artifact: a
    file of another kind; for plain JSON figures: a file that is not JSON)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; pass a file path")
    writable_parent(path, option)
    if path.exists() and not _rewritable(path, kind):
        what = f"a {artifact_noun(kind)}" if kind else "a JSON file"
        raise OutputError(f"{option} {path} exists and is not {what} edgevit wrote; edgevit does not replace "
                          "files it did not write: pass another path")
    return path


def writable_parent(path: Path, option: str) -> None:
    """The folder `path` goes in exists (or can be made) and is writable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder; pass a path inside a folder")
    try:   # a real write (os.access says yes to root everywhere, /proc included); leaves nothing behind
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {parent} ({e.strerror}); pass a path you can "
                          "write to") from None


def _rewritable(path: Path, kind: str | None) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return kind is None or (isinstance(data, dict) and data.get("kind") == kind)


# ---------------------------------------------------------------------------- publishing folders


@contextmanager
def publish_dir(out_dir: str | os.PathLike, replaceable: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Build a folder artifact in a temporary folder beside `out_dir` and swap it into place only
    if the block succeeds. An existing `out_dir` is replaced only when `replaceable(out_dir)`
    says edgevit wrote it (an earlier `what`); anything else there is refused before any work."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, replaceable, what)
    writable_parent(out_dir, "-o")
    _make_parent(out_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot write there ({e.strerror}); pass a writable -o") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; artifacts get the usual permissions
    try:
        yield tmp
        check_replaceable(out_dir, replaceable, what)   # nothing appeared there meanwhile
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(out_dir: Path, replaceable: Callable[[Path], bool], what: str) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder edgevit wrote; pass a new path to -o")
    if any(out_dir.iterdir()) and not replaceable(out_dir):
        raise OutputError(f"{out_dir} exists and is not {what} edgevit wrote (or holds files edgevit did not "
                          "write); edgevit does not replace them: pass a new or empty folder to -o")


def holds_only(folder: Path, names) -> bool:
    """Whether every entry of `folder` is a plain file whose name is one of `names` (a folder
    edgevit replaces must hold nothing a user added to it)."""
    return all(p.is_file() and not p.is_symlink() and p.name in names for p in folder.iterdir())


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an existing artifact is removed only at the end."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{path.parent} is a file, not a folder; pass a path inside a folder") from None
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create it ({e.strerror}); pass a writable path") from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
