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
from worker.jobs.spec import IMAGE_PATTERN

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


@dataclass
class Built:
    doc: dict[str, Any]
    served: dict[str, Any]
    docs_html: str
    docs_headers: dict[str, str]
    assets: dict[str, tuple[int, str]]  # path → (status, mimetype) of what /docs loads
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

        # A documented view under /replicate/ (that blueprint copies Replicate's API): the document leaves it out.
        @openapi.document("Replicate's own", public=True)
        def replicate_predictions() -> str:
            return ""

        app.add_url_rule("/replicate/v1/predictions", view_func=replicate_predictions, methods=["POST"])
        doc = openapi.build(app)
        client = app.test_client()
        served = client.get("/openapi.json")
        assert served.status_code == 200 and served.mimetype == "application/json"
        docs = client.get("/docs")
        assert docs.status_code == 200
        html = docs.get_data(as_text=True)
        assets = {}
        for src in re.findall(r'(?:src|href)="([^"]+)"', html):
            answer = client.get(src)
            assets[src] = (answer.status_code, answer.mimetype)
        rules = [
            (
                rule.rule,
                set(rule.methods or ()) - {"HEAD", "OPTIONS"},
                hasattr(app.view_functions[rule.endpoint], "_openapi"),
            )
            for rule in app.url_map.iter_rules()
        ]
        yield Built(
            doc,
            served.get_json(),
            html,
            dict(docs.headers),
            assets,
            rules,
            job_types(app.config["GPUJOBS_SETTINGS"]),
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
        ("segmentationInput", "image", {"pattern": IMAGE_PATTERN, "type": "string"}),  # a file id, URL or data URI
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


@pytest.mark.parametrize("schema", ["text_to_imageInput", "inpaintingInput", "style_transferInput"])
def test_generation_inputs_show_the_output_formats_and_the_quality_bounds(built: Built, schema: str) -> None:
    properties = built.doc["components"]["schemas"][schema]["properties"]
    output_format = properties["output_format"]
    assert output_format["enum"] == ["png", "webp", "jpeg"] and output_format["default"] == "png"
    quality = properties["output_quality"]
    assert quality["default"] is None
    assert [branch for branch in quality["anyOf"] if branch.get("type") == "integer"] == [
        {"type": "integer", "minimum": 1, "maximum": 100}
    ]
    assert "EXIF UserComment" in output_format["description"] and "lossless" in quality["description"]


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return pointer(doc, schema["$ref"]) if "$ref" in schema else schema


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator of ``schema`` whose ``#/components/...`` references resolve in ``doc``."""
    import jsonschema

    return jsonschema.Draft202012Validator({"components": doc["components"], "allOf": [schema]})


def test_creating_a_job_takes_each_types_input_by_discriminator(built: Built) -> None:
    body = built.doc["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    schema = _resolve(built.doc, body["content"]["application/json"]["schema"])
    names = sorted(built.registry)
    assert schema["discriminator"] == {
        "propertyName": "type",
        "mapping": {name: f"#/components/schemas/{name}JobCreate" for name in names},
    }
    assert schema["oneOf"] == [{"$ref": f"#/components/schemas/{name}JobCreate"} for name in names]
    for name in names:
        variant = built.doc["components"]["schemas"][f"{name}JobCreate"]
        assert variant["properties"]["type"] == {"type": "string", "const": name}
        assert variant["properties"]["input"] == {"$ref": f"#/components/schemas/{name}Input"}
        assert "type" in variant["required"] and variant["additionalProperties"] is False
    headers = {p["name"] for p in built.doc["paths"]["/v1/jobs"]["post"]["parameters"] if p["in"] == "header"}
    assert headers == {"Prefer", "Idempotency-Key"}


def test_a_job_is_one_of_the_per_type_jobs_chosen_by_its_type(built: Built) -> None:
    schemas = built.doc["components"]["schemas"]
    names = sorted(built.registry)
    job = schemas["Job"]
    assert job["oneOf"] == [{"$ref": f"#/components/schemas/{name}Job"} for name in names]
    assert job["discriminator"]["propertyName"] == "type"
    assert job["discriminator"]["mapping"] == {name: f"#/components/schemas/{name}Job" for name in names}
    for name in names:
        common, own = schemas[f"{name}Job"]["allOf"]
        assert common == {"$ref": "#/components/schemas/JobCommon"}
        assert own["properties"]["type"]["const"] == name
        assert own["properties"]["input"] == {"$ref": f"#/components/schemas/{name}Input"}
        assert own["properties"]["output"]["anyOf"] == [
            {"$ref": f"#/components/schemas/{name}Output"},
            {"type": "null"},
        ]
        assert set(own["required"]) == {"type", "input", "output"}

    # A validator takes each job as exactly its own type: a diagnostic job with a segmentation output is refused.
    from api.openapi import examples

    check = validator(built.doc, {"$ref": "#/components/schemas/Job"})
    check.validate(examples.DIAGNOSTIC_SUCCEEDED)
    check.validate(examples.TEXT_TO_IMAGE_QUEUED)
    wrong = {**examples.DIAGNOSTIC_SUCCEEDED, "output": {"width": 1, "height": 1, "instances": []}}
    assert not check.is_valid(wrong)
    assert not check.is_valid({**examples.DIAGNOSTIC_SUCCEEDED, "type": "no_such_type"})
    missing = dict(examples.DIAGNOSTIC_SUCCEEDED)
    del missing["retried_as"]
    assert not check.is_valid(missing), "every field the server always sends is required"


def _response_schemas(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for code, response in op["responses"].items():
                for media, content in response.get("content", {}).items():
                    yield f"{method.upper()} {path} {code} {media}", content["schema"]


def test_every_object_a_response_can_hold_lists_what_is_required(built: Built) -> None:
    """Generators type a field outside ``required`` as optional: each answer's object says what it always has.

    The per-type ``input`` is left out of the walk: it is the request's schema (what a client may leave out),
    reused for the input the job echoes back."""
    doc = built.doc
    seen: set[str] = set()
    checked = 0
    todo = [(where, schema) for where, schema in _response_schemas(doc)]
    while todo:
        where, schema = todo.pop()
        for path, node in walk(schema, where):
            if not isinstance(node, dict):
                continue
            if "/properties/input" in path and path.endswith("/properties/input"):
                continue
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in seen and not ref.endswith("Input"):
                seen.add(ref)
                todo.append((ref, pointer(doc, ref)))
            if node.get("type") == "object" and "properties" in node and "/properties/input/" not in path:
                assert "required" in node, f"{path}: an object without `required`"
                checked += 1
    assert checked > 40, checked
    assert {"#/components/schemas/JobCommon", "#/components/schemas/Artifact", "#/components/schemas/LoraModel"} <= seen


def test_nullable_fields_are_typed_as_such(built: Built) -> None:
    schemas = built.doc["components"]["schemas"]
    common = schemas["JobCommon"]["properties"]
    for field in ("started_at", "finished_at", "outputs_expired_at", "retry_of", "webhook"):
        assert "null" in common[field]["type"], field
    assert {"type": "null"} in common["error"]["anyOf"]
    assert schemas["Artifact"]["properties"]["url"]["anyOf"][1] == {"type": "null"}


def test_the_document_passes_openapi_spec_validator(built: Built) -> None:
    from openapi_spec_validator import validate

    validate(json.loads(json.dumps(built.doc)))


OPERATIONS = {
    "GET /healthz": ("operations", "healthz"),
    "GET /readyz": ("operations", "readyz"),
    "GET /metrics": ("operations", "get_metrics"),
    "GET /metrics/cluster": ("operations", "cluster_metrics"),
    "GET /openapi.json": ("operations", "get_openapi_document"),
    "GET /docs": ("operations", "get_docs"),
    "POST /v1/files": ("files", "upload_file"),
    "GET /v1/files/{file_id}": ("files", "get_file"),
    "GET /v1/files/{file_id}/content": ("files", "download_file"),
    "POST /v1/jobs": ("jobs", "create_job"),
    "GET /v1/jobs": ("jobs", "list_jobs"),
    "GET /v1/jobs/{job_id}": ("jobs", "get_job"),
    "POST /v1/jobs/{job_id}/cancel": ("jobs", "cancel_job"),
    "POST /v1/jobs/{job_id}/retry": ("jobs", "retry_job"),
    "POST /v1/jobs/cancel": ("jobs", "cancel_jobs"),
    "GET /v1/jobs/{job_id}/events": ("jobs", "get_job_events"),
    "GET /v1/jobs/{job_id}/webhooks": ("webhooks", "list_webhook_deliveries"),
    "POST /v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver": ("webhooks", "redeliver_webhook"),
    "GET /v1/webhooks/secret": ("webhooks", "get_webhook_secret"),
    "POST /v1/webhooks/secret/rotate": ("webhooks", "rotate_webhook_secret"),
    "GET /v1/models": ("models", "list_models"),
    "GET /v1/models/{model_id}": ("models", "get_model"),
    "DELETE /v1/models/{model_id}": ("models", "delete_model"),
    "POST /v1/keys": ("keys", "create_key"),
    "GET /v1/keys": ("keys", "list_keys"),
    "DELETE /v1/keys/{key_id}": ("keys", "revoke_key"),
    "GET /v1/tenants": ("tenants", "list_tenants"),
    "GET /v1/tenants/{tenant_id}": ("tenants", "get_tenant"),
    "PUT /v1/tenants/{tenant_id}/quotas": ("tenants", "set_tenant_quotas"),
}


def test_operation_ids_and_tags_are_stable(built: Built) -> None:
    """A generated client's module and function names come from these: renaming one breaks its users' code."""
    found = {
        f"{method.upper()} {path}": (op["tags"][0], op["operationId"])
        for path, item in built.doc["paths"].items()
        for method, op in item.items()
    }
    assert found == OPERATIONS
    tags = [tag["name"] for tag in built.doc["tags"]]
    assert set(tags) == {tag for tag, _ in OPERATIONS.values()} and all(t["description"] for t in built.doc["tags"])


def test_paths_under_replicate_are_left_out(built: Built) -> None:
    assert any(rule.startswith("/replicate/") for rule, _, documented in built.rules if documented)
    assert not [path for path in built.doc["paths"] if path.startswith("/replicate")]


def test_every_example_matches_its_schema(built: Built) -> None:
    count = 0
    for path, node in walk(built.doc["paths"], "#/paths"):
        if isinstance(node, dict) and "examples" in node and "schema" in node:
            check = validator(built.doc, node["schema"])
            for name, example in node["examples"].items():
                errors = [e.message for e in check.iter_errors(example["value"])]
                assert not errors, f"{path}/examples/{name}: {errors[:3]}"
                assert example["summary"]
                count += 1
    assert count >= 10
    create = built.doc["paths"]["/v1/jobs"]["post"]
    assert {"text_to_image", "segmentation", "diagnostic"} <= set(
        create["requestBody"]["content"]["application/json"]["examples"]
    )
    assert create["responses"]["202"]["content"]["application/json"]["examples"]


def test_the_docs_page_is_swagger_ui_from_this_origin_with_no_inline_script(built: Built) -> None:
    html = built.docs_html
    assert "<style" not in html and " style=" not in html
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert len(scripts) == 2 and all('src="/docs/' in attrs and not body.strip() for attrs, body in scripts)
    policy = built.docs_headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
    assert built.assets["/docs/swagger-ui/swagger-ui-bundle.js"] == (200, "text/javascript")
    assert built.assets["/docs/swagger-ui/swagger-ui.css"] == (200, "text/css")
    assert built.assets["/docs/static/docs.js"] == (200, "text/javascript")
    assert all(status == 200 for status, _ in built.assets.values()), built.assets
