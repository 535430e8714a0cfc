"""The model catalog (worker/models/catalog.py): TOML files and the built-in catalog, parsed and checked.

Offline: the built-in catalog is resolved (names, repos, revisions, the parts a base model names) without
fetching anything; the one loader test builds a tiny UNet here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.settings import Settings, reset_settings
from worker.jobs import job_types
from worker.models.catalog import COMMIT, CatalogError, ModelEntry, load_catalog, parse, write_catalog


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
revision = "22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6"

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
        name="m2f",
        kind="segmentation",
        source="facebook/mask2former-swin-tiny-coco-instance",
        revision="22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6",
    )
    assert catalog.get("m2f").scheme == "huggingface" and catalog.get("m2f").pinned
    assert catalog.get("m2f").describe() == (
        "Hugging Face facebook/mask2former-swin-tiny-coco-instance@22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6 "
        "(fetched on first use unless cached)"
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


# What a GPU host that reaches the hub runs with no catalog file: each job type's default model, its repo and
# the hub commit it is pinned to (found on the hub's pages; see the built-in entries in worker/jobs/*/spec.py).
M2F = ("facebook/mask2former-swin-tiny-coco-instance", "22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6")
SD15 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14")
SD15_INPAINTING = ("stable-diffusion-v1-5/stable-diffusion-inpainting", "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb")
IP_ADAPTER = ("h94/IP-Adapter", "018e402774aeeddd60609b4ecdb7e298259dc729")
BUILTIN_DEFAULTS = {
    "segmentation": ("mask2former-swin-tiny-coco-instance", M2F),
    "text_to_image": ("sd15", SD15),
    "inpainting": ("sd15", SD15),
    "style_transfer": ("sd15", SD15),
    "finetune": ("sd15", SD15),
}


def test_the_builtin_catalog_names_a_pinned_public_checkpoint_for_every_job_type() -> None:
    catalog = load_catalog(Settings())  # GPUJOBS_MODEL_CATALOG unset
    assert catalog.path is None
    assert sorted(catalog.entries) == [
        "mask2former-swin-tiny-coco-instance",
        "sd15",
        "sd15-inpainting",
        "sd15-ip-adapter",
    ]
    assert all(entry.scheme == "huggingface" and entry.pinned for entry in catalog.entries.values())

    with_models = {name: t for name, t in job_types(Settings()).items() if t.model_kinds}
    assert sorted(with_models) == sorted(BUILTIN_DEFAULTS), "a job type that loads a model has a built-in default"
    for name, job_type in with_models.items():
        entry = catalog.default_for(job_type.model_kinds[0].name)  # the kind a job's `model` names
        assert (entry.name, (entry.source, entry.revision)) == BUILTIN_DEFAULTS[name], name
        assert entry.default and COMMIT.fullmatch(entry.revision or "")


def test_the_builtin_base_model_names_its_inpainting_unet_and_ip_adapter() -> None:
    """inpainting uses the dedicated 9-channel UNet and style_transfer the SD 1.5 IP-Adapter, as a catalog
    file would name them; both resolve in the same catalog, with the files their loaders read."""
    catalog = load_catalog(Settings())
    sd15 = catalog.get("sd15")
    inpainting, adapter = catalog.get(sd15.options["inpainting"]), catalog.get(sd15.options["ip_adapter"])
    assert (inpainting.kind, (inpainting.source, inpainting.revision)) == ("inpainting", SD15_INPAINTING)
    assert (adapter.kind, (adapter.source, adapter.revision)) == ("ip_adapter", IP_ADAPTER)
    # The inpainting repo's UNet exists only as fp16 safetensors; the loader is told so.
    assert inpainting.options == {"variant": "fp16"}
    assert inpainting.files == ("unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors")
    # ip_adapter.py reads <subfolder>/<weight_name> and <subfolder>/image_encoder (its default).
    assert adapter.options == {"subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors"}
    assert set(adapter.files or ()) == {
        "models/ip-adapter_sd15.safetensors",
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",
    }
    # Only the diffusers folders the pipeline loads: no 4-7 GB single-file checkpoints at the top, no pickles,
    # no safety checker (the pipeline is built without one).
    assert sd15.files is not None
    assert not [f for f in sd15.files if f.endswith((".ckpt", ".bin")) or f.startswith(("safety_checker", "v1-5"))]
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "model_index.json",
    } <= set(sd15.files)
    assert catalog.names("diffusion") == ["sd15"] and catalog.names("segmentation") == [
        "mask2former-swin-tiny-coco-instance"
    ]


def test_the_builtin_catalog_resolves_through_the_model_cache_without_fetching() -> None:
    """What a worker does first for a job that names no model: the entry, by kind (nothing is loaded)."""
    from worker.models.cache import ModelCache

    cache = ModelCache(Settings())
    assert cache.entry(None, "segmentation").name == "mask2former-swin-tiny-coco-instance"
    assert cache.entry(None, "diffusion").name == "sd15"
    assert cache.entry("sd15-inpainting", "inpainting").revision == SD15_INPAINTING[1]


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


@pytest.mark.parametrize(
    ("revision", "why"),
    [
        ("", "must be a commit sha"),
        ("main branch", "must be a commit sha"),
        ("../main", "must be a commit sha"),
        ("refs/../main", "must be a commit sha"),
        (42, "must be a commit sha"),
        (["main"], "must be a commit sha"),
        ("22c4a2f", "looks like an abbreviated commit sha"),
        ("22c4a2f15dc88149b8b8d9f4d42c54431fbd66f", "looks like an abbreviated commit sha"),
    ],
)
def test_a_bad_revision_is_refused(tmp_path: Path, revision: object, why: str) -> None:
    with pytest.raises(CatalogError, match=rf"^models\.m\.revision .*{why}"):
        parse({"models": {"m": {"kind": "segmentation", "source": "org/m", "revision": revision}}})


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/2", "22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6"])
def test_branches_tags_and_full_commits_are_revisions(revision: str) -> None:
    entry = parse({"models": {"m": {"kind": "segmentation", "source": "org/m", "revision": revision}}}).get("m")
    assert entry.revision == revision
    assert entry.pinned == (len(revision) == 40), "only a full commit pins what is fetched"


@pytest.mark.parametrize("source", ["/srv/models/m", "s3://bucket/models/m"])
@pytest.mark.parametrize("field", ["revision", "files"])
def test_hub_only_fields_on_another_source_are_refused(source: str, field: str) -> None:
    value = "main" if field == "revision" else ["*.json"]
    scheme = "s3" if source.startswith("s3") else "local"
    with pytest.raises(
        CatalogError, match=rf"^models\.m\.{field} applies to Hugging Face sources only, not to a {scheme}"
    ):
        parse({"models": {"m": {"kind": "segmentation", "source": source, field: value}}})


@pytest.mark.parametrize("files", [[], "unet/*", ["unet/*", ""], ["unet/*", 3]])
def test_bad_files_are_refused(files: object) -> None:
    with pytest.raises(CatalogError, match=r"^models\.m\.files must be a non-empty list of file names or globs"):
        parse({"models": {"m": {"kind": "diffusion", "source": "org/m", "files": files}}})


def test_files_are_kept_and_are_not_loader_options() -> None:
    entry = parse({"models": {"m": {"kind": "diffusion", "source": "org/m", "files": ["unet/*"], "steps": 4}}}).get("m")
    assert entry.files == ("unet/*",) and entry.options == {"steps": 4}


@pytest.mark.parametrize("default", ["yes", 1, "true"])
def test_a_default_that_is_not_a_boolean_is_refused(default: object) -> None:
    with pytest.raises(CatalogError, match=r"^models\.m\.default must be true or false$"):
        parse({"models": {"m": {"kind": "diffusion", "source": "org/m", "default": default}}})


@pytest.mark.parametrize("name", ["sd1.5", "a" * 65, "has space", "mdl_x", "é"])
def test_a_name_that_cannot_be_a_model_id_is_refused(tmp_path: Path, name: str) -> None:
    """A catalog name is its id in /v1/models/<name>, where the API answers only ids of its own id rule; a
    name it could never serve (a dot, over 64 characters, a fine-tuned model's prefix) is refused up front."""
    path = write(tmp_path / "catalog.toml", f'[models."{name}"]\nkind = "diffusion"\nsource = "org/m"\n')
    with pytest.raises(CatalogError) as refused:
        load(path)
    assert str(refused.value).startswith(f"models.{name}: a model name is 1–64 letters, digits, '-' or '_'")


def test_every_name_the_catalog_accepts_is_an_id_the_api_serves() -> None:
    from api.presenters import ID

    for name in ["a", "A-b_9", "m" * 64, "mask2former-swin-tiny-coco-instance", *load_catalog(Settings()).entries]:
        assert parse({"models": {name: {"kind": "diffusion", "source": "org/m"}}}).get(name).name == name
        assert ID.fullmatch(name) and not name.startswith("mdl_")


def test_write_catalog_writes_files_lists_that_load_catalog_reads(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    write_catalog(path, {"sd": {"kind": "diffusion", "source": "org/sd", "files": ["unet/*", 'a "quoted".json']}})
    assert load(path).get("sd").files == ("unet/*", 'a "quoted".json')


def test_an_fp16_variant_unet_loads_through_the_catalog_and_the_cache(tmp_path: Path) -> None:
    """The built-in inpainting entry's `variant = "fp16"`: a UNet saved only as
    diffusion_pytorch_model.fp16.safetensors (as the public repo has it) loads, in the worker's dtype;
    without the variant the same folder is a clear model_unavailable, not a crash."""
    import torch

    from worker.jobs.diffusion.demo import tiny_unet
    from worker.jobs.diffusion.spec import INPAINTING_UNET
    from worker.models.cache import ModelCache, ModelUnavailable

    tiny_unet(9).to(torch.float16).save_pretrained(tmp_path / "unet-fp16" / "unet", variant="fp16")
    assert [p.name for p in (tmp_path / "unet-fp16" / "unet").glob("*.safetensors")] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    path = write(
        tmp_path / "catalog.toml",
        f'[models.fp16]\nkind = "inpainting"\nsource = "{tmp_path / "unet-fp16"}"\nvariant = "fp16"\n'
        f'[models.plain]\nkind = "inpainting"\nsource = "{tmp_path / "unet-fp16"}"\n',
    )
    settings = Settings(model_catalog=path, device="cpu")
    cache = ModelCache(settings)
    unet = cache.load(INPAINTING_UNET, "fp16")
    assert unet.config.in_channels == 9 and next(unet.parameters()).dtype == cache.dtype
    with pytest.raises(ModelUnavailable, match=r"^model 'plain' at .* could not be loaded: "):
        cache.load(INPAINTING_UNET, "plain")


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_catalog_section() -> str:
    text = README.read_text()
    return text[text.index("## The model catalog\n") : text.index("\n## ", text.index("## The model catalog\n") + 1)]


def test_the_readme_catalog_example_parses() -> None:
    import tomllib

    section = _readme_catalog_section()
    example = section[
        section.index("```toml\n") + len("```toml\n") : section.index("```", section.index("```toml\n") + 7)
    ]
    catalog = parse(tomllib.loads(example))
    assert sorted(catalog.entries) == ["sd15", "sd15-inpainting", "sd15-ip-adapter"]
    assert catalog.get("sd15").pinned and catalog.get("sd15").files


def test_the_readme_table_is_the_builtin_catalog() -> None:
    rows = re.findall(r"^\| `([^`]+)` \| (\w+)[^|]*\| `([^`]+)` @ `([0-9a-f]{40})`", _readme_catalog_section(), re.M)
    builtin = load_catalog(Settings()).entries
    assert sorted(rows) == sorted((e.name, e.kind, e.source, e.revision) for e in builtin.values())


def test_the_files_the_builtin_sd15_fetches_are_what_the_family_loader_reads(tmp_path: Path) -> None:
    """A tiny pipeline laid out as the real repo is at its pinned commit (its model_index.json naming a safety
    checker and feature extractor; 4-7 GB single-file checkpoints, fp16 and non-EMA weights, pickles beside),
    filtered by the entry's `files` with the hub client's own filter (what snapshot_download fetches): the
    family loads from what is left, and none of the big extras is fetched."""
    import json

    import torch
    from huggingface_hub.utils import filter_repo_objects

    from worker.jobs.diffusion.demo import build_stable_diffusion
    from worker.jobs.diffusion.pipeline import load_family

    repo = tmp_path / "repo"
    build_stable_diffusion(repo)
    index = json.loads((repo / "model_index.json").read_text())
    index |= {
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
    }
    (repo / "model_index.json").write_text(json.dumps(index))
    extras = [
        "v1-5-pruned-emaonly.safetensors",
        "v1-5-pruned.safetensors",
        "v1-5-pruned.ckpt",
        "v1-inference.yaml",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    for name in extras:  # not loadable: fetching any of them would be seen
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("not weights")

    sd15 = load_catalog(Settings()).get("sd15")
    listing = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
    fetched = list(filter_repo_objects(listing, allow_patterns=list(sd15.files or ())))
    assert not set(fetched) & set(extras)
    snapshot = tmp_path / "snapshot"
    for name in fetched:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).rename(snapshot / name)

    family = load_family(sd15, snapshot, "cpu", torch.float32)
    assert family.model == "sd15" and family.inpainting_model == "sd15-inpainting"
    assert family.ip_adapter_model == "sd15-ip-adapter" and family.text_to_image.safety_checker is None
