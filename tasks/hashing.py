"""Content hashes, and the code hash of a stage: the source of every project module it imports, transitively, less
the infrastructure that computes no result (logging, caching, the stage runner and lock, Prefect server, MLflow).

Print each stage's code deps (what dvc.yaml lists): python -m tasks.stages
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path)


def content_hash(obj: Any) -> str:
    """Stable hash of JSON-able content (key order does not matter)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())


def dir_hash(path: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """Hash of every file's relative name and bytes under a folder (but the relative names in `exclude`)."""
    path = Path(path)
    files = (p for p in sorted(path.rglob("*")) if p.is_file() and str(p.relative_to(path)) not in exclude)
    return content_hash({str(p.relative_to(path)): sha256_file(p) for p in files})

ROOT = Path(__file__).resolve().parents[1]

# Modules that run a stage but compute none of its results: errors and logging, the item cache, the stage runner
# and the project lock, the stage declarations (they make dvc.yaml itself), the Prefect server, MLflow tracking and
# the registered pyfunc, and the package's logging setup. Editing them recomputes nothing; every other project module a stage imports is part of its code hash
# (editing tasks/text.py:split_sentences recomputes chunk, qa, split and train).
INFRASTRUCTURE = frozenset({"tasks", "tasks.log", "tasks.cache", "tasks.runner", "tasks.stages",
                            "tasks.prefect_server", "tasks.tracking", "tasks.mlflow_model"})


def _module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a module of the project (a package under `root`: tasks, flows, tests); None for a library."""
    parts = name.split(".")
    if not (root / parts[0] / "__init__.py").is_file():
        return None
    base = root.joinpath(*parts)
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _direct_imports(name: str, root: Path) -> set[str]:
    """Project modules `name` imports anywhere in its file (inside functions too: a lazy import still runs),
    with their parent packages (importing tasks.chunk runs tasks/__init__.py first)."""
    file = _module_file(name, root)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names = [module] + [f"{module}.{a.name}" for a in node.names]  # `from tasks import chunk` is a module
        else:
            continue
        for dotted in names:
            parts = dotted.split(".")
            found.update(m for i in range(1, len(parts) + 1) if _module_file(m := ".".join(parts[:i]), root))
    return found


def project_modules(name: str, root: Path = ROOT) -> list[str]:
    """`name`, its parent packages and every project module it imports, transitively (sorted): the code its
    results depend on. The walk stops at INFRASTRUCTURE (neither listed nor followed)."""
    parts = name.split(".")
    todo = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in INFRASTRUCTURE or _module_file(module, root) is None:
            continue
        seen.add(module)
        todo |= _direct_imports(module, root) - seen
    if name not in seen:
        raise ValueError(f"{name} is not a module of this project (no source file under {root})")
    return sorted(seen)


def module_files(name: str, root: Path = ROOT) -> list[str]:
    """The source files of project_modules(name), relative to the project root (what dvc.yaml lists as deps)."""
    return sorted(str(_module_file(m, root).relative_to(root)) for m in project_modules(name, root))


def source_hash(module_name: str, root: Path = ROOT) -> str:
    """Hash of the source of `module_name` and of every project module it imports, transitively."""
    return content_hash({f: sha256_file(root / f) for f in module_files(module_name, root)})


@lru_cache(maxsize=None)
def code_hash(module_name: str) -> str:
    """source_hash of a module of this project, once per process (a running process's code does not change under
    it): a cached result (Prefect task, training skip) made by that code is stale as soon as any of it changes."""
    return source_hash(module_name)
