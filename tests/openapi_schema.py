"""Validate JSON we send against OpenAI's published OpenAPI schemas (shared/reference).

    from tests.openapi_schema import validate_against
    validate_against("CreateChatCompletionResponse", resp.json())

The YAML is OpenAPI 3.1 (JSON Schema 2020-12), but some schemas still carry the 3.0
keyword ``nullable: true``; plain JSON Schema ignores it, which would reject ``null`` where
the spec means to allow it, so it is rewritten to ``anyOf: [<schema>, {"type": "null"}]``.
Likewise 3.0's boolean ``exclusiveMinimum: true`` becomes 2020-12's numeric form.
OpenAPI-only keywords (``discriminator``, ``x-*``, ``example``, ``deprecated``) are ignored by
the validator; ``format`` is not asserted.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_CANDIDATES = (
    os.environ.get("OPENFT_OPENAPI_SPEC", ""),
    str(Path(__file__).resolve().parents[1] / "shared" / "reference" / "openai-openapi.yaml"),
    str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"),
)


def spec_path() -> Path | None:
    """Where the spec is: ``$OPENFT_OPENAPI_SPEC``, else ``shared/reference/`` next to the repo."""
    for candidate in _CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _nullable_to_anyof(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_anyof(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_to_anyof(value) for key, value in node.items()}
    # OpenAPI 3.0 style `minimum: 0, exclusiveMinimum: true` means "> 0"; JSON Schema 2020-12
    # would read the boolean as the number 1 (so 1.0 fails), hence the translation.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), bool):
            if out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
    if out.pop("nullable", False) is True:
        # Keep the annotations outside so ``default: null`` etc. stay harmless.
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.lru_cache(maxsize=1)
def _components() -> dict[str, Any]:
    path = spec_path()
    if path is None:  # pragma: no cover - depends on the checkout
        raise FileNotFoundError("openai-openapi.yaml not found; set OPENFT_OPENAPI_SPEC")
    with path.open(encoding="utf-8") as fh:
        spec = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _nullable_to_anyof(spec["components"])


@functools.lru_cache(maxsize=256)
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    components = _components()
    if schema_name not in components["schemas"]:
        raise KeyError(f"no schema named {schema_name!r} in the OpenAPI spec")
    # The spec's refs are all "#/components/schemas/...": give them the same root.
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
    return jsonschema.Draft202012Validator(schema)


def validate_against(schema_name: str, instance: Any) -> None:
    """Raise AssertionError listing every violation of ``components.schemas[schema_name]``."""
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            where = "/".join(str(p) for p in err.absolute_path) or "<root>"
            detail = jsonschema.exceptions.best_match([err, *err.context]) if err.context else err
            lines.append(f"{where}: {detail.message}")
        raise AssertionError(f"{schema_name} violations:\n  " + "\n  ".join(lines))


def has_spec() -> bool:
    return spec_path() is not None
