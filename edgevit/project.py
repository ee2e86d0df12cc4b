"""The project file `edgevit run` keeps in the folder it runs in (.edgevit.json): what the latest
run made (its checkpoint, target, latency table, search result), so the short commands of the
design work as typed there: `edgevit search --budget 20ms`, `edgevit compile --target jetson`
take what they are not told from it, and say what they took."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevit.errors import ConfigError
from edgevit.fileio import write_json

PROJECT_FILE = ".edgevit.json"
PROJECT_KIND = "edgevit.project"
OPTIONAL = ("checkpoint", "table", "search")


@dataclass(frozen=True)
class Project:
    recipe: str
    out: str
    checkpoint: str | None      # the model later stages work on (quantized, else adapted, else trained)
    target: str                 # [profile]'s target
    table: str | None           # OUT/profile/latency.json
    search: str | None          # OUT/search/result.json

    def save(self, folder: Path | None = None) -> bool:
        """Write the project file unless something else of that name is there (never replaced)."""
        path = (folder or Path.cwd()) / PROJECT_FILE
        if path.exists() and _kind(path) != PROJECT_KIND:
            return False
        write_json(path, {"kind": PROJECT_KIND, "version": 1, **asdict(self)})
        return True


def record_run(recipe) -> Project:
    """The project as the run's folder now holds it."""
    out = Path(recipe.out)
    quantized, adapted, trained = (out / stage / "model.pt" for stage in ("quantize", "adapt", "train"))
    if "quantize" not in recipe.stages:
        quantized = out / "quantize" / "absent"     # a stale quantized model is not what this recipe deploys
    checkpoint = next((p for p in (quantized, adapted, trained) if p.exists()), None)
    table, result = out / "profile" / "latency.json", out / "search" / "result.json"
    return Project(str(recipe.path), str(out), str(checkpoint) if checkpoint else None,
                   recipe.sections["profile"].target, str(table) if table.exists() else None,
                   str(result) if result.exists() else None)


def load_project(folder: Path | None = None) -> Project | None:
    path = (folder or Path.cwd()) / PROJECT_FILE
    if _kind(path) != PROJECT_KIND:
        return None
    data = json.loads(path.read_text())
    fields = {k: data.get(k) for k in Project.__dataclass_fields__}
    if data.get("version") != 1 or not all(isinstance(v, str) or (v is None and k in OPTIONAL)
                                           for k, v in fields.items()):
        return None   # damaged or from another edgevit: as if there were no run
    return Project(**fields)


def project_or_fail(missing: str) -> Project:
    """The project, or the one-line error saying what to pass or run first."""
    project = load_project()
    if project is not None and project.checkpoint and not Path(project.checkpoint).exists():
        raise ConfigError(f"no {missing} given, and the run in {PROJECT_FILE} names {project.checkpoint}, which no "
                          f"longer exists; run {project.recipe} again (`edgevit run`) or pass {missing}")
    if project is None or project.checkpoint is None:
        raise ConfigError(f"no {missing} given and no run in this folder to take it from ({PROJECT_FILE}); "
                          f"run `make demo` or `edgevit run RECIPE` first, or pass {missing}")
    return project


def _kind(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None
