"""Settings (db/settings.py): defaults, ``GPUJOBS_*`` parsing, the bounds they enforce, and the README table.

Every test starts with no ``GPUJOBS_*`` variable set (``clean_environment`` in conftest).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from db.settings import Settings, get_settings, reset_settings

ROOT = Path(__file__).resolve().parents[2]


def readme_table() -> dict[str, str | None]:
    """The README's configuration table: variable → documented default (None: unset)."""
    rows = re.findall(r"^\| `(GPUJOBS_[A-Z0-9_]+)` \| (.*?) \| ", (ROOT / "README.md").read_text(), re.MULTILINE)
    return {name: None if default == "(unset)" else default.strip("`") for name, default in rows}


def test_the_readme_table_is_generated_from_the_settings() -> None:
    from gpujobs.cli import settings_table

    readme = (ROOT / "README.md").read_text()
    assert settings_table(Settings) in readme, (
        "the README's configuration table is stale: `gpujobs settings --markdown`"
    )
    assert set(readme_table()) == {f"GPUJOBS_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("variable", sorted(readme_table()))
def test_each_documented_default_is_the_default_and_reads_back_from_its_variable(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    field = variable.removeprefix("GPUJOBS_").lower()
    default = Settings.model_fields[field].default
    documented = readme_table()[variable]
    assert getattr(Settings(), field) == default
    if documented is None:
        assert default is None
        return
    monkeypatch.setenv(variable, documented)  # the README's spelling, as an operator would copy it
    assert getattr(Settings(), field) == default


def test_defaults_without_any_variable() -> None:
    settings = Settings()
    assert settings.database_url == "sqlite:///var/gpujobs.db"
    assert settings.var_dir == Path("var")
    assert settings.lease_seconds == 30.0 and settings.control_poll_seconds == 0.5
    assert settings.max_attempts == 3
    assert settings.webhook_allow_private is False
    assert settings.model_catalog is None and settings.preload_models == []
    assert settings.effective_redis_url == "redis://127.0.0.1:6379/0", "no Redis of its own: the broker's"


def test_variables_are_parsed_into_their_types(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "GPUJOBS_LEASE_SECONDS": "2.5",
        "GPUJOBS_MAX_ATTEMPTS": "7",
        "GPUJOBS_WEBHOOK_ALLOW_PRIVATE": "true",
        "GPUJOBS_PRELOAD_MODELS": '["demo-mask2former", "demo-sd"]',
        "GPUJOBS_IMAGE_FORMATS": '["PNG"]',
        "GPUJOBS_MODEL_CATALOG": str(tmp_path / "catalog.toml"),
        "GPUJOBS_VAR_DIR": str(tmp_path),
        "GPUJOBS_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
        "GPUJOBS_SEGMENTATION_IMAGE_SIZE": "512",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.lease_seconds == 2.5 and settings.max_attempts == 7
    assert settings.webhook_allow_private is True
    assert settings.preload_models == ["demo-mask2former", "demo-sd"] and settings.image_formats == ["PNG"]
    assert settings.model_catalog == tmp_path / "catalog.toml" and isinstance(settings.model_catalog, Path)
    assert settings.var_dir == tmp_path
    assert settings.s3_endpoint_url == "http://127.0.0.1:8333"
    assert settings.segmentation_image_size == 512


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("off", False), ("false", False)]
)
def test_booleans_take_the_usual_spellings(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBS_TORCH_COMPILE", value)
    assert Settings().torch_compile is expected


def test_only_gpujobs_variables_count_and_unknown_ones_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_SECONDS", "1")
    monkeypatch.setenv("GPUJOBS_NO_SUCH_SETTING", "x")
    monkeypatch.setenv("gpujobs_max_attempts", "5")  # names are not case-sensitive
    settings = Settings()
    assert settings.lease_seconds == 30.0 and settings.max_attempts == 5
    assert not hasattr(settings, "no_such_setting")


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("GPUJOBS_MAX_ATTEMPTS", "0", "Input should be greater than or equal to 1"),
        ("GPUJOBS_MAX_ATTEMPTS", "101", "Input should be less than or equal to 100"),
        ("GPUJOBS_LEASE_SECONDS", "0", "Input should be greater than 0"),
        ("GPUJOBS_CONTROL_POLL_SECONDS", "-1", "Input should be greater than 0"),
        ("GPUJOBS_PRESIGN_EXPIRY_SECONDS", "59", "Input should be greater than or equal to 60"),
        ("GPUJOBS_PRESIGN_EXPIRY_SECONDS", str(7 * 24 * 3600 + 1), "Input should be less than or equal to 604800"),
        ("GPUJOBS_MAX_BODY_BYTES", "1023", "Input should be greater than or equal to 1024"),
        ("GPUJOBS_MAX_WAIT_SECONDS", "601", "Input should be less than or equal to 600"),
        ("GPUJOBS_RATE_LIMIT_PER_MINUTE", "-1", "Input should be greater than or equal to 0"),
        ("GPUJOBS_WORKER_CONCURRENCY", "65", "Input should be less than or equal to 64"),
        ("GPUJOBS_WORKER_CONCURRENCY", "two", "Input should be a valid integer"),
        ("GPUJOBS_WEBHOOK_TIMEOUT_SECONDS", "121", "Input should be less than or equal to 120"),
        ("GPUJOBS_WEBHOOK_ALLOW_PRIVATE", "maybe", "Input should be a valid boolean"),
        ("GPUJOBS_SEGMENTATION_IMAGE_SIZE", "400", "Input should be a multiple of 32"),
        ("GPUJOBS_SEGMENTATION_IMAGE_SIZE", "32", "Input should be greater than or equal to 64"),
        ("GPUJOBS_SEGMENTATION_MAX_BATCH_SIZE", "0", "Input should be greater than or equal to 1"),
        ("GPUJOBS_GENERATION_MAX_WIDTH", "1001", "Input should be a multiple of 8"),
        ("GPUJOBS_GENERATION_MAX_STEPS", "151", "Input should be less than or equal to 150"),
        ("GPUJOBS_GENERATION_MAX_PIXELS", "4095", "Input should be greater than or equal to 4096"),
        ("GPUJOBS_FINETUNE_MAX_RESOLUTION", "1020", "Input should be a multiple of 8"),
        ("GPUJOBS_FINETUNE_MAX_IMAGES", "0", "Input should be greater than or equal to 1"),
        ("GPUJOBS_METRICS_WINDOW_SECONDS", "59", "Input should be greater than or equal to 60"),
        ("GPUJOBS_IMAGE_FORMATS", "[1]", "Input should be a valid string"),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_setting(
    variable: str, value: str, error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    field = variable.removeprefix("GPUJOBS_").lower()
    assert [(e["loc"][0], e["msg"].startswith(error)) for e in refused.value.errors()] == [(field, True)], str(
        refused.value
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GPUJOBS_MAX_ATTEMPTS", "1"),
        ("GPUJOBS_MAX_ATTEMPTS", "100"),
        ("GPUJOBS_RATE_LIMIT_PER_MINUTE", "0"),  # 0 disables the limit
        ("GPUJOBS_MAX_WAIT_SECONDS", "0"),
        ("GPUJOBS_MODEL_MEMORY_MB", "0"),  # 0: the automatic budget
        ("GPUJOBS_LORA_CACHE_SIZE", "0"),  # 0: no adapter stays loaded
        ("GPUJOBS_DISPATCH_BUFFER", "0"),
        ("GPUJOBS_SEGMENTATION_IMAGE_SIZE", "64"),
        ("GPUJOBS_SEGMENTATION_IMAGE_SIZE", "2048"),
        ("GPUJOBS_PRESIGN_EXPIRY_SECONDS", "604800"),
    ],
)
def test_values_at_the_bounds_are_accepted(variable: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, value)
    assert str(getattr(Settings(), variable.removeprefix("GPUJOBS_").lower())) in {value, f"{value}.0"}


def test_a_list_that_is_not_json_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBS_PRELOAD_MODELS", "demo-mask2former,demo-sd")
    with pytest.raises(SettingsError, match='error parsing value for field "preload_models"'):
        Settings()


@pytest.mark.parametrize(
    ("broker", "redis", "effective"),
    [
        ("redis://broker:6379/0", None, "redis://broker:6379/0"),
        ("rediss://broker:6380/0", None, "rediss://broker:6380/0"),
        ("unix:///run/redis.sock", None, "unix:///run/redis.sock"),
        ("amqp://guest@rabbit//", None, None),  # RabbitMQ broker and no Redis: no rate limits, no notifications
        ("memory://", None, None),
        ("amqp://guest@rabbit//", "redis://cache:6379/1", "redis://cache:6379/1"),
        ("redis://broker:6379/0", "redis://cache:6379/1", "redis://cache:6379/1"),
    ],
)
def test_effective_redis_url(broker: str, redis: str | None, effective: str | None) -> None:
    assert Settings(broker_url=broker, redis_url=redis).effective_redis_url == effective


def test_get_settings_reads_the_environment_once_until_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("GPUJOBS_MAX_ATTEMPTS", "9")
    assert get_settings().max_attempts == 3, "read once: a later change is not seen"
    reset_settings()
    assert get_settings().max_attempts == 9
