"""The OpenAPI document (api/openapi.py), generated from the real app's routes and each job type's models.

The app is built with ``api.create_app`` on settings that name a SQLite file and the in-memory
broker: building it opens no connection, and no server is started (the Flask test client
calls the views in process).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
import pytest

from db.settings import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


@dataclass
class Built:
    doc: dict[str, Any]
    served: dict[str, Any]
    docs_html: str
    rules: list[tuple[str, set[str], bool]]  # (rule, methods, documented)
    registry: dict[str, Any]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    from PIL import Image

    from db.session import dispose_engines
    from db.settings import reset_settings

    root = tmp_path_factory.mktemp("openapi")
    environment = pytest.MonkeyPatch()
    pixels = Image.MAX_IMAGE_PIXELS
    try:
        for name in [n for n in os.environ if n.upper().startswith("GPUJOBS_")]:
            environment.delenv(name)
        environment.setenv("GPUJOBS_BROKER_URL", "memory://")
        environment.setenv("GPUJOBS_DATABASE_URL", f"sqlite:///{root / 'gpujobs.db'}")
        environment.setenv("GPUJOBS_VAR_DIR", str(root / "var"))
        reset_settings()
        import api
        from api import openapi
        from worker.jobs import job_types

        app = api.create_app(Settings())
        doc = openapi.build(app)
        client = app.test_client()
        served = client.get("/openapi.json")
        assert served.status_code == 200 and served.mimetype == "application/json"
        docs = client.get("/docs")
        assert docs.status_code == 200
        rules = [
            (
                rule.rule,
                set(rule.methods or ()) - {"HEAD", "OPTIONS"},
                hasattr(app.view_functions[rule.endpoint], "_openapi"),
            )
            for rule in app.url_map.iter_rules()
        ]
        yield Built(
            doc, served.get_json(), docs.get_data(as_text=True), rules, job_types(app.config["GPUJOBS_SETTINGS"])
        )
    finally:
        Image.MAX_IMAGE_PIXELS = pixels
        environment.undo()
        reset_settings()
        dispose_engines()
    assert not (root / "gpujobs.db").exists() or (root / "gpujobs.db").stat().st_size == 0, (
        "building the API document touched the database"
    )


def walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}/{index}")


def pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def schemas_in(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object of the document (components, bodies, responses, parameters) and their subschemas."""
    roots = [(f"#/components/schemas/{name}", s) for name, s in doc["components"]["schemas"].items()]
    for path, node in walk(doc["paths"], "#/paths"):
        if path.endswith("/schema") and isinstance(node, dict):
            roots.append((path, node))

    def sub(path: str, schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield path, schema
        for key in ("properties", "$defs", "patternProperties"):
            for name, value in schema.get(key, {}).items():
                yield from sub(f"{path}/{key}/{name}", value)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(schema.get(key), dict):
                yield from sub(f"{path}/{key}", schema[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for index, value in enumerate(schema.get(key, [])):
                yield from sub(f"{path}/{key}/{index}", value)

    for path, schema in roots:
        yield from sub(path, schema)


# --- the document as a whole ------------------------------------------------------------------------


def test_it_is_an_openapi_3_1_document(built: Built) -> None:
    doc = built.doc
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "gpujobs" and doc["info"]["version"]
    assert set(doc) <= {
        "openapi",
        "info",
        "jsonSchemaDialect",
        "servers",
        "paths",
        "webhooks",
        "components",
        "security",
        "tags",
        "externalDocs",
    }
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def test_the_served_document_is_the_generated_one(built: Built) -> None:
    assert built.served == json.loads(json.dumps(built.doc))


def _references(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (path, node["$ref"]) for path, node in walk(doc) if isinstance(node, dict) and isinstance(node.get("$ref"), str)
    ]


def test_every_component_reference_resolves_and_every_component_is_used(built: Built) -> None:
    refs = _references(built.doc)
    to_components = [(path, ref) for path, ref in refs if ref.startswith("#/components/")]
    assert len(to_components) > 20
    for path, ref in to_components:
        assert isinstance(pointer(built.doc, ref), dict), f"{path}: {ref} is not a schema"
    used = {ref.removeprefix("#/components/schemas/") for _, ref in to_components}
    assert set(built.doc["components"]["schemas"]) - used == set(), "documented schemas that nothing points to"


def _dangling(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(where, $ref) of every reference that does not resolve in the document; where: an operation or a component."""
    places = [(f"{method.upper()} {path}", op) for path, item in doc["paths"].items() for method, op in item.items()]
    places += [(f"components {name}", schema) for name, schema in doc["components"]["schemas"].items()]
    found = set()
    for where, node in places:
        for _, ref in _references(node):
            try:
                pointer(doc, ref)
            except AssertionError:
                found.add((where, ref))
    return found


def test_every_reference_resolves(built: Built) -> None:
    assert _dangling(built.doc) == set()


def test_every_schema_is_well_formed(built: Built) -> None:
    count = 0
    for path, schema in schemas_in(built.doc):
        count += 1
        assert isinstance(schema, dict), path
        types = schema.get("type")
        if types is not None:
            types = types if isinstance(types, list) else [types]
            assert set(types) <= JSON_TYPES, f"{path}: type {types}"
        if "required" in schema:
            assert isinstance(schema["required"], list) and len(set(schema["required"])) == len(schema["required"])
            assert set(schema["required"]) <= set(schema.get("properties", {})), f"{path}: required not in properties"
        for low, high in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems")):
            if low in schema and high in schema:
                assert schema[low] <= schema[high], f"{path}: {low} > {high}"
        if "pattern" in schema:
            re.compile(schema["pattern"])
        if "enum" in schema:
            assert schema["enum"] and len(schema["enum"]) == len({json.dumps(v) for v in schema["enum"]}), path
        if "default" in schema and "enum" in schema:
            assert schema["default"] in schema["enum"], path
    assert count > 100


def test_every_operation_is_well_formed(built: Built) -> None:
    operation_ids = []
    for path, item in built.doc["paths"].items():
        assert path.startswith("/") and "<" not in path, path
        template = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in item.items():
            assert method in HTTP_METHODS, (path, method)
            operation_ids.append(op["operationId"])
            assert op["summary"]
            params = op.get("parameters", [])
            assert len({(p["name"], p["in"]) for p in params}) == len(params), f"{method} {path}: duplicate parameters"
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == template, f"{method} {path}: path parameters {in_path} vs {template}"
            assert all(p["required"] is True for p in params if p["in"] == "path")
            assert all(p["in"] in {"path", "query", "header", "cookie"} and "schema" in p for p in params)
            responses = op["responses"]
            assert "default" in responses and any(code.startswith("2") or code == "302" for code in responses)
            for code, response in responses.items():
                assert code == "default" or re.fullmatch(r"[1-5]\d\d", code), code
                assert response["description"]
            if "requestBody" in op:
                assert op["requestBody"]["content"] and method in {"post", "put", "patch"}
            for requirement in op.get("security", []):
                assert set(requirement) <= set(built.doc["components"]["securitySchemes"])
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"


def test_every_public_route_of_the_api_is_documented(built: Built) -> None:
    documented = {
        (re.sub(r"\{([^}]+)\}", r"<\1>", path), method.upper())
        for path, item in built.doc["paths"].items()
        for method in item
    }
    served_v1 = {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"<\1>", rule), method)
        for rule, methods, _ in built.rules
        if rule.startswith("/v1/")
        for method in methods
    }
    assert served_v1 and served_v1 <= documented, f"undocumented: {sorted(served_v1 - documented)}"
    for rule, _methods, is_documented in built.rules:
        if rule.startswith(("/admin", "/static")):
            assert not is_documented, "the dashboard is not part of the API"
    for path, item in built.doc["paths"].items():
        for op in item.values():
            # Every /v1 operation needs a key; the probes and the documents themselves do not.
            assert ("security" in op) == path.startswith("/v1/"), path
    for path in ["/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/files", "/v1/models", "/healthz"]:
        assert path in built.doc["paths"]


# --- the job types ------------------------------------------------------------------------------------------


def _constraints(info: Any) -> dict[str, Any]:
    """What a field's pydantic constraints must become in its JSON schema."""
    wanted: dict[str, Any] = {}
    list_like = "list" in str(info.annotation)
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            wanted["minimum"] = item.ge
        elif isinstance(item, annotated_types.Le):
            wanted["maximum"] = item.le
        elif isinstance(item, annotated_types.Gt):
            wanted["exclusiveMinimum"] = item.gt
        elif isinstance(item, annotated_types.Lt):
            wanted["exclusiveMaximum"] = item.lt
        elif isinstance(item, annotated_types.MultipleOf):
            wanted["multipleOf"] = item.multiple_of
        elif isinstance(item, annotated_types.MinLen):
            wanted["minItems" if list_like else "minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            wanted["maxItems" if list_like else "maxLength"] = item.max_length
        elif getattr(item, "pattern", None):
            wanted["pattern"] = item.pattern
    return wanted


def _keyword(schema: dict[str, Any], key: str) -> Any:
    """A keyword of a property schema, or of its non-null branch (``X | None`` is ``anyOf``)."""
    if key in schema:
        return schema[key]
    found = [branch[key] for branch in schema.get("anyOf", []) if key in branch]
    return found[0] if len(found) == 1 else None


def test_each_job_type_has_its_input_and_output_schemas(built: Built) -> None:
    schemas = built.doc["components"]["schemas"]
    assert {"segmentation", "text_to_image", "finetune"} <= set(built.registry)
    for name, job_type in built.registry.items():
        schema = schemas[f"{name}Input"]
        assert schema["title"] == f"{name} input"
        assert schema["description"] == job_type.summary + (" Admin keys only." if job_type.admin_only else "")
        assert schema["type"] == "object" and schema["additionalProperties"] is False, "unknown fields are refused"
        fields = job_type.Input.model_fields
        assert set(schema["properties"]) == {info.alias or field for field, info in fields.items()}
        assert set(schema.get("required", [])) == {f for f, info in fields.items() if info.is_required()}
        output = schemas[f"{name}Output"]
        assert output["title"] == f"{name} output"
        assert set(output["properties"]) == set(job_type.Output.model_fields)


def test_each_input_schema_carries_its_fields_bounds(built: Built) -> None:
    schemas = built.doc["components"]["schemas"]
    checked = 0
    for name, job_type in built.registry.items():
        for field, info in job_type.Input.model_fields.items():
            prop = schemas[f"{name}Input"]["properties"][field]
            for key, value in _constraints(info).items():
                assert _keyword(prop, key) == value, (
                    f"{name}.{field}: {key} should be {value}, is {_keyword(prop, key)}"
                )
                checked += 1
            if info.description:
                assert prop["description"] == info.description
            if not info.is_required() and info.default_factory is None:
                assert prop.get("default") == info.default, f"{name}.{field} default"
    assert checked > 50


@pytest.mark.parametrize(
    ("schema", "field", "expected"),
    [
        ("segmentationInput", "threshold", {"minimum": 0, "maximum": 1, "default": 0.5}),
        ("segmentationInput", "mask_threshold", {"minimum": 0, "maximum": 1, "default": 0.5}),
        ("segmentationInput", "overlap_mask_area_threshold", {"minimum": 0, "maximum": 1, "default": 0.8}),
        ("segmentationInput", "image", {"pattern": "^file_[A-Za-z0-9_-]{1,64}$", "type": "string"}),
        ("text_to_imageInput", "num_inference_steps", {"minimum": 1, "maximum": 150}),
        ("text_to_imageInput", "num_outputs", {"minimum": 1, "maximum": 4, "default": 1}),
        ("text_to_imageInput", "width", {"minimum": 8, "multipleOf": 8, "default": 512}),
        ("text_to_imageInput", "prompt", {"minLength": 1, "type": "string"}),
        ("finetuneInput", "learning_rate", {"exclusiveMinimum": 0, "maximum": 1}),
        ("finetuneInput", "resolution", {"minimum": 64, "multipleOf": 8}),
    ],
)
def test_known_bounds(built: Built, schema: str, field: str, expected: dict[str, Any]) -> None:
    prop = built.doc["components"]["schemas"][schema]["properties"][field]
    assert {key: prop.get(key) for key in expected} == expected


def test_catalog_model_fields_say_which_kind_they_name(built: Built) -> None:
    schemas = built.doc["components"]["schemas"]
    assert schemas["segmentationInput"]["properties"]["model"]["x-gpujobs-catalog-kind"] == "segmentation"
    assert schemas["text_to_imageInput"]["properties"]["model"]["x-gpujobs-catalog-kind"] == "diffusion"


def test_creating_a_job_takes_each_types_input_by_discriminator(built: Built) -> None:
    body = built.doc["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema["discriminator"] == {"propertyName": "type"}
    variants = {v["properties"]["type"]["const"]: v for v in schema["oneOf"]}
    assert sorted(variants) == sorted(built.registry)
    for name, variant in variants.items():
        assert variant["properties"]["input"] == {"$ref": f"#/components/schemas/{name}Input"}
        assert "type" in variant["required"] and variant["additionalProperties"] is False
    headers = {p["name"] for p in built.doc["paths"]["/v1/jobs"]["post"]["parameters"] if p["in"] == "header"}
    assert headers == {"Prefer", "Idempotency-Key"}


def test_the_job_schema_names_every_type_and_output(built: Built) -> None:
    job = built.doc["components"]["schemas"]["Job"]
    assert job["properties"]["type"]["enum"] == sorted(built.registry)
    # anyOf: the three generation types share one output shape, which a oneOf would refuse.
    outputs = [branch.get("$ref") for branch in job["properties"]["output"]["anyOf"]]
    assert outputs == [f"#/components/schemas/{name}Output" for name in sorted(built.registry)] + [None]
    # ... and each type's output is bound to its type.
    bound = {branch["if"]["properties"]["type"]["const"]: branch["then"] for branch in job["allOf"]}
    assert sorted(bound) == sorted(built.registry)
    for name, then in bound.items():
        assert then["properties"]["output"]["anyOf"] == [
            {"$ref": f"#/components/schemas/{name}Output"},
            {"type": "null"},
        ]


def test_the_html_reference_lists_every_job_type(built: Built) -> None:
    for name in built.registry:
        assert name in built.docs_html
