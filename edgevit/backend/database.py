"""Tuning databases: one MetaSchedule JSON database per target (TVM target JSON, so `host` on
another CPU gets its own), by default under ~/.cache/edgevit/tuning; and the choice every build
makes between a database's tuned schedules and edgevit's default rules."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgevit.errors import EdgeVitError, OutputError
from edgevit.fileio import file_sha256, writable_parent
from edgevit.targets import Target

RECORDS = "database_tuning_record.json"


def default_database_root() -> Path:
    return Path(os.environ.get("EDGEVIT_TUNING_DIR", Path.home() / ".cache" / "edgevit" / "tuning"))


def database_dir(target: Target, root: str | Path | None = None) -> Path:
    """<root>/<target name>-<hash of the resolved TVM target>: one database per CPU/GPU model."""
    spec = str(target.tvm_target())
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return Path(root or default_database_root()) / f"{target.name}-{digest}"


def open_database(path: Path):
    from tvm.s_tir import meta_schedule as ms

    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a tuning database folder; pass a folder to --database")
    writable_parent(path / RECORDS, "--database")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--database {path}: cannot create it ({e.strerror}); pass a writable folder") from None
    try:
        return ms.database.JSONDatabase(work_dir=str(path))
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types on a damaged file
        raise EdgeVitError(f"{path}: the tuning database is unreadable ({str(e).splitlines()[0][:120]}); "
                           "move it away and tune again") from None


def has_records(path: Path) -> bool:
    return (path / RECORDS).is_file() and (path / RECORDS).stat().st_size > 0


def schedule_source(target: Target, tuning: bool = True, database: str | Path | None = None
                    ) -> tuple[str, Path | None]:
    """("rules", None), or ("tuned:<digest of the database's records>", folder) when tuning is on
    and the database (`database`, else the target's) holds records."""
    if not tuning:
        return "rules", None
    folder = Path(database) if database else database_dir(target)
    if database and not has_records(folder):
        raise EdgeVitError(f"{folder}: no tuning records there; run `edgevit tune` first or drop --database")
    if not has_records(folder):
        return "rules", None
    return f"tuned:{file_sha256(folder / RECORDS)[:12]}", folder
