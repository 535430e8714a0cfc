"""The model catalog: logical names → where the weights come from.

A TOML file (``GPUJOBS_MODEL_CATALOG``) with one table per model::

    [models.mask2former-swin-tiny-coco-instance]
    kind = "segmentation"                 # which job types may use it
    source = "facebook/mask2former-swin-tiny-coco-instance"   # a Hugging Face repo id,
    revision = "22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6"     # ... pinned to a commit (or a branch, a tag),
    files = ["config.json", "preprocessor_config.json", "model.safetensors"]  # ... only these (globs)
    # source = "/srv/models/m2f"          # or a local folder,
    # source = "s3://bucket/models/m2f"   # or an S3 prefix (downloaded once to model_dir)
    default = true                        # the model of its kind when a job names none

Any other key is an option of the kind's loader (``inpainting``, ``ip_adapter``, ``subfolder``...).
A name is also the model's id in ``/v1/models/<name>``, so it follows the API's id rule.
When no file is configured the built-in catalog is used: the public checkpoints the model kinds
declare (``ModelKind.builtin``), each pinned to a hub commit.

Weights load from safetensors only; a pickle-only checkpoint is refused.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.settings import Settings, get_settings
from worker.jobs import model_kinds

# A catalog name is its model's id in /v1/models/<name>: the API's id rule (api/presenters.py's ID), and not
# the prefix of a tenant's fine-tuned model ids.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LORA_ID_PREFIX = "mdl_"
# What the hub resolves: a full commit sha, or a branch or tag name (git's ref rules, simplified).
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
ABBREVIATED_COMMIT = re.compile(r"^[0-9a-fA-F]{7,39}$")
FIELDS = {"kind", "source", "revision", "default", "files"}  # the catalog's own; the rest are loader options


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
    files: tuple[str, ...] | None = None  # Hugging Face sources: the files to fetch (globs); None: every weight

    @property
    def scheme(self) -> str:
        return source_scheme(self.source)

    @property
    def pinned(self) -> bool:
        """A Hugging Face source pinned to a commit: what it fetches cannot change under it."""
        return self.scheme == "huggingface" and COMMIT.fullmatch(self.revision or "") is not None

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


def source_scheme(source: str) -> str:
    """``s3``, ``local`` (a path, or a name that exists here) or ``huggingface`` (a repo id)."""
    if source.startswith("s3://"):
        return "s3"
    if source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists():
        return "local"
    return "huggingface"


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
        entries[name] = _entry(name, table, kinds, base)
    return Catalog(entries=entries, path=path)


def _entry(name: str, table: Any, kinds: list[str], base: Path) -> ModelEntry:
    """One ``[models.<name>]`` table, checked field by field; the first problem is the error."""
    if not NAME.fullmatch(name) or name.startswith(LORA_ID_PREFIX):
        raise CatalogError(
            f"models.{name}: a model name is 1–64 letters, digits, '-' or '_' (it is the model's id in "
            f"/v1/models/<name>), and does not start with {LORA_ID_PREFIX!r} (fine-tuned models' ids do)"
        )
    if not isinstance(table, dict):
        raise CatalogError(f"models.{name} must be a table")
    kind, source = table.get("kind"), table.get("source")
    if kind not in kinds:
        raise CatalogError(f"models.{name}.kind must be one of {', '.join(kinds)}")
    if not isinstance(source, str) or not source:
        raise CatalogError(f"models.{name}.source must be a path, a Hugging Face repo id or an s3:// prefix")
    if source.startswith(("./", "../")):  # relative to the catalog file, not to the worker's cwd
        source = str((base / source).resolve())
    scheme = source_scheme(source)
    revision, files, default = table.get("revision"), table.get("files"), table.get("default", False)
    if revision is not None:
        _check_revision(name, revision, scheme)
    if files is not None:
        _check_files(name, files, scheme)
    if not isinstance(default, bool):
        raise CatalogError(f"models.{name}.default must be true or false")
    return ModelEntry(
        name=name,
        kind=kind,
        source=source,
        revision=revision,
        default=default,
        options={k: v for k, v in table.items() if k not in FIELDS},
        files=tuple(files) if files is not None else None,
    )


def _check_revision(name: str, revision: Any, scheme: str) -> None:
    if scheme != "huggingface":
        raise CatalogError(f"models.{name}.revision applies to Hugging Face sources only, not to a {scheme} source")
    if not isinstance(revision, str) or not REVISION.fullmatch(revision) or ".." in revision:
        raise CatalogError(
            f"models.{name}.revision must be a commit sha (40 hex digits), a branch or a tag; got {revision!r}"
        )
    if ABBREVIATED_COMMIT.fullmatch(revision):
        raise CatalogError(
            f"models.{name}.revision {revision!r} looks like an abbreviated commit sha: the hub resolves only the "
            "full 40 hex digits (or a branch or a tag)"
        )


def _check_files(name: str, files: Any, scheme: str) -> None:
    if scheme != "huggingface":
        raise CatalogError(f"models.{name}.files applies to Hugging Face sources only, not to a {scheme} source")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
        raise CatalogError(
            f'models.{name}.files must be a non-empty list of file names or globs in the repo (e.g. ["unet/*"])'
        )


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
            else:  # a string or a list of strings: JSON's quoting is TOML's
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
