"""The model catalog: logical names → where the weights come from.

A TOML file (``GPUJOBS_MODEL_CATALOG``) with one table per model::

    [models.mask2former-swin-tiny-coco-instance]
    kind = "segmentation"                 # which job types may use it
    source = "facebook/mask2former-swin-tiny-coco-instance"   # a Hugging Face repo id,
    revision = "main"                     # ... pinned to a revision,
    # source = "/srv/models/m2f"          # or a local folder,
    # source = "s3://bucket/models/m2f"   # or an S3 prefix (downloaded once to model_dir)
    default = true                        # the model of its kind when a job names none

Weights load from safetensors only; a pickle-only checkpoint is refused.
Nothing here imports torch.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.settings import Settings, get_settings
from worker.jobs import model_kinds


class CatalogError(Exception):
    """The catalog file is malformed or names a model that cannot be used."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    source: str
    revision: str | None = None
    default: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        if self.source.startswith("s3://"):
            return "s3"
        if self.source.startswith(("/", "./", "../", "~")) or Path(self.source).expanduser().exists():
            return "local"
        return "huggingface"

    def describe(self) -> str:
        """Where the model resolves, in words (``gpujobs models list``)."""
        if self.scheme == "local":
            path = Path(self.source).expanduser()
            state = "ok" if path.is_dir() else "MISSING"
            return f"local folder {path} ({state})"
        if self.scheme == "s3":
            return f"S3 prefix {self.source} (downloaded on first use)"
        return f"Hugging Face {self.source}@{self.revision or 'main'} (fetched on first use unless cached)"


@dataclass(frozen=True)
class Catalog:
    entries: dict[str, ModelEntry]
    path: Path | None = None

    def get(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CatalogError(f"no model named {name!r} in the catalog ({', '.join(sorted(self.entries))})") from None

    def default_for(self, kind: str) -> ModelEntry:
        candidates = [e for e in self.entries.values() if e.kind == kind]
        for entry in candidates:
            if entry.default:
                return entry
        if candidates:
            return candidates[0]
        raise CatalogError(f"the catalog has no {kind} model")

    def names(self, kind: str) -> list[str]:
        return sorted(name for name, e in self.entries.items() if e.kind == kind)


def builtin_entries(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """The catalog used when none is configured: the public checkpoints the model kinds name."""
    entries: dict[str, dict[str, Any]] = {}
    for kind in model_kinds(settings).values():
        entries.update({name: dict(table) for name, table in kind.builtin.items()})
    return entries


def parse(data: dict[str, Any], path: Path | None = None, kinds: Collection[str] | None = None) -> Catalog:
    """A catalog from its TOML data; ``kinds``: the model kinds it may name (default: the served job types')."""
    kinds = sorted(kinds if kinds is not None else model_kinds())
    models = data.get("models")
    if not isinstance(models, dict):
        raise CatalogError(f"{path or 'catalog'}: expected a [models.<name>] table")
    entries = {}
    base = path.parent if path else Path.cwd()
    for name, table in models.items():
        if not isinstance(table, dict):
            raise CatalogError(f"models.{name} must be a table")
        kind, source = table.get("kind"), table.get("source")
        if kind not in kinds:
            raise CatalogError(f"models.{name}.kind must be one of {', '.join(kinds)}")
        if not isinstance(source, str) or not source:
            raise CatalogError(f"models.{name}.source must be a path, a Hugging Face repo id or an s3:// prefix")
        if source.startswith(("./", "../")):  # relative to the catalog file, not to the worker's cwd
            source = str((base / source).resolve())
        options = {k: v for k, v in table.items() if k not in {"kind", "source", "revision", "default"}}
        entries[name] = ModelEntry(
            name=name,
            kind=kind,
            source=source,
            revision=table.get("revision"),
            default=bool(table.get("default", False)),
            options=options,
        )
    return Catalog(entries=entries, path=path)


def load_catalog(settings: Settings | None = None) -> Catalog:
    settings = settings or get_settings()
    path = settings.model_catalog
    kinds = model_kinds(settings)
    if path is None:
        return parse({"models": builtin_entries(settings)}, kinds=kinds)
    try:
        with open(path, "rb") as handle:
            return parse(tomllib.load(handle), Path(path).resolve(), kinds=kinds)
    except FileNotFoundError:
        raise CatalogError(f"the model catalog {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"the model catalog {path} is not valid TOML: {exc}") from None


def write_catalog(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write a catalog file (used by ``gpujobs models demo``)."""
    lines = ["# Written by `gpujobs models demo`: tiny random-weight models for offline runs.", ""]
    for name, table in entries.items():
        lines.append(f"[models.{name}]")
        for key, value in table.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value!r}")
            else:
                lines.append(f'{key} = "{value}"')
        lines.append("")
    path.write_text("\n".join(lines))
