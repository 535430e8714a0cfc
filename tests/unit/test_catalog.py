"""The model catalog (worker/models/catalog.py): TOML files and the built-in catalog, parsed and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.settings import Settings, reset_settings
from worker.models.catalog import CatalogError, ModelEntry, load_catalog, parse, write_catalog


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(path: Path):  # type: ignore[no-untyped-def]
    return load_catalog(Settings(model_catalog=path))


GOOD = """
[models.m2f]
kind = "segmentation"
source = "facebook/mask2former-swin-tiny-coco-instance"
revision = "abc123"

[models.m2f-local]
kind = "segmentation"
source = "./weights/m2f"
default = true

[models.sd]
kind = "diffusion"
source = "s3://bucket/models/sd"
dtype = "float16"
steps = 20

[models.sd-parent]
kind = "diffusion"
source = "../common/sd"
"""


def test_a_good_catalog(tmp_path: Path) -> None:
    path = write(tmp_path / "conf" / "catalog.toml", GOOD)
    (tmp_path / "conf" / "weights" / "m2f").mkdir(parents=True)
    catalog = load(path)

    assert catalog.path == path.resolve()
    assert sorted(catalog.entries) == ["m2f", "m2f-local", "sd", "sd-parent"]
    assert catalog.get("m2f") == ModelEntry(
        name="m2f", kind="segmentation", source="facebook/mask2former-swin-tiny-coco-instance", revision="abc123"
    )
    assert catalog.get("m2f").scheme == "huggingface"
    assert catalog.get("m2f").describe() == (
        "Hugging Face facebook/mask2former-swin-tiny-coco-instance@abc123 (fetched on first use unless cached)"
    )
    sd = catalog.get("sd")
    assert (sd.kind, sd.scheme, sd.revision, sd.default) == ("diffusion", "s3", None, False)
    assert sd.options == {"dtype": "float16", "steps": 20}, "keys the catalog does not know are the loader's options"
    assert sd.describe() == "S3 prefix s3://bucket/models/sd (downloaded on first use)"


def test_relative_sources_are_resolved_against_the_catalog_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "conf" / "catalog.toml", GOOD)
    (tmp_path / "conf" / "weights" / "m2f").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker's cwd is not where the catalog is

    catalog = load(path)
    local = catalog.get("m2f-local")
    assert local.source == str(tmp_path / "conf" / "weights" / "m2f")
    assert (local.scheme, local.describe()) == ("local", f"local folder {tmp_path / 'conf' / 'weights' / 'm2f'} (ok)")
    parent = catalog.get("sd-parent")
    assert parent.source == str(tmp_path / "common" / "sd")
    assert parent.describe() == f"local folder {tmp_path / 'common' / 'sd'} (MISSING)"


def test_absolute_and_home_sources_are_kept_as_written(tmp_path: Path) -> None:
    path = write(
        tmp_path / "catalog.toml",
        f'[models.a]\nkind = "segmentation"\nsource = "{tmp_path}/abs"\n'
        '[models.h]\nkind = "diffusion"\nsource = "~/models/sd"\n',
    )
    catalog = load(path)
    assert catalog.get("a").source == f"{tmp_path}/abs" and catalog.get("a").scheme == "local"
    assert catalog.get("h").source == "~/models/sd" and catalog.get("h").scheme == "local"


def test_default_for_a_kind_and_names(tmp_path: Path) -> None:
    catalog = load(write(tmp_path / "catalog.toml", GOOD))
    assert catalog.default_for("segmentation").name == "m2f-local", "the entry marked default wins"
    assert catalog.default_for("diffusion").name == "sd", "no default marked: the first of its kind"
    assert catalog.names("segmentation") == ["m2f", "m2f-local"]
    assert catalog.names("diffusion") == ["sd", "sd-parent"]
    assert catalog.names("inpainting") == []
    with pytest.raises(CatalogError, match=r"^the catalog has no inpainting model$"):
        catalog.default_for("inpainting")
    with pytest.raises(CatalogError, match=r"^no model named 'nope' in the catalog \(m2f, m2f-local, sd, sd-parent\)$"):
        catalog.get("nope")


def test_the_builtin_catalog_names_the_public_mask2former() -> None:
    catalog = load_catalog(Settings())  # GPUJOBS_MODEL_CATALOG unset
    assert catalog.path is None
    assert list(catalog.entries) == ["mask2former-swin-tiny-coco-instance"]
    entry = catalog.default_for("segmentation")
    assert entry == ModelEntry(
        name="mask2former-swin-tiny-coco-instance",
        kind="segmentation",
        source="facebook/mask2former-swin-tiny-coco-instance",
        revision="main",
        default=True,
    )
    assert entry.scheme == "huggingface"
    with pytest.raises(CatalogError, match=r"^the catalog has no diffusion model$"):
        catalog.default_for("diffusion")


def test_the_catalog_named_by_the_environment_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "catalog.toml", GOOD)
    monkeypatch.setenv("GPUJOBS_MODEL_CATALOG", str(path))
    reset_settings()
    assert load_catalog().path == path.resolve()
    assert "sd" in load_catalog().entries


@pytest.mark.parametrize("kind", ["segmentation", "diffusion"])
def test_each_job_kind_is_accepted(kind: str) -> None:
    catalog = parse({"models": {"x": {"kind": kind, "source": "org/x"}}})
    assert catalog.get("x").kind == kind and catalog.default_for(kind).name == "x"


@pytest.mark.parametrize(
    "table", [{"kind": "detection", "source": "org/x"}, {"source": "org/x"}, {"kind": 3, "source": "org/x"}]
)
def test_an_unknown_kind_is_refused_naming_the_allowed_ones(table: dict) -> None:
    with pytest.raises(CatalogError) as refused:
        parse({"models": {"bad": table}})
    message = str(refused.value)
    assert message.startswith("models.bad.kind must be one of ")
    allowed = message.removeprefix("models.bad.kind must be one of ").split(", ")
    assert {"segmentation", "diffusion"} <= set(allowed)
    assert str(table.get("kind")) not in allowed


@pytest.mark.parametrize("source", [None, "", 42, ["org/x"]])
def test_a_missing_or_empty_source_is_refused(source: object) -> None:
    table = {"kind": "segmentation"} | ({} if source is None else {"source": source})
    with pytest.raises(
        CatalogError, match=r"^models\.m\.source must be a path, a Hugging Face repo id or an s3:// prefix$"
    ):
        parse({"models": {"m": table}})


def test_a_model_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.toml", '[models]\nm2f = "facebook/m2f"\n')
    with pytest.raises(CatalogError, match=r"^models\.m2f must be a table$"):
        load(path)


@pytest.mark.parametrize("text", ["", '[model.m2f]\nkind = "segmentation"\nsource = "x"\n', 'models = "m2f"\n'])
def test_a_file_without_a_models_table_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "catalog.toml", text)
    with pytest.raises(CatalogError) as refused:
        load(path)
    assert str(refused.value) == f"{path.resolve()}: expected a [models.<name>] table"


def test_invalid_toml_is_refused_with_where(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.toml", '[models.m2f]\nkind = "segmentation"\nsource = \n')
    with pytest.raises(CatalogError) as refused:
        load(path)
    assert str(refused.value).startswith(f"the model catalog {path} is not valid TOML: ")
    assert "line 3" in str(refused.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "catalog.toml"
    with pytest.raises(CatalogError, match=rf"^the model catalog {path} does not exist$"):
        load(path)


def test_write_catalog_writes_what_load_catalog_reads(tmp_path: Path) -> None:
    (tmp_path / "seg").mkdir()
    path = tmp_path / "catalog.toml"
    write_catalog(
        path,
        {
            "demo-seg": {"kind": "segmentation", "source": str(tmp_path / "seg"), "default": True},
            "demo-sd": {"kind": "diffusion", "source": "org/sd", "revision": "v1", "steps": 4, "scale": 1.5},
        },
    )
    catalog = load(path)
    assert catalog.get("demo-seg") == ModelEntry("demo-seg", "segmentation", str(tmp_path / "seg"), default=True)
    assert catalog.get("demo-sd") == ModelEntry(
        "demo-sd", "diffusion", "org/sd", revision="v1", options={"steps": 4, "scale": 1.5}
    )
