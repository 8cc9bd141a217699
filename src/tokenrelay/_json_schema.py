"""JSON-schema helpers: a deterministic example instance, and OpenAI's strict form.

``example_value`` feeds the mock provider (a structured answer, tool-call arguments).
``strict_schema`` rewrites a Pydantic-made schema into the subset OpenAI's
``"strict": true`` accepts (every object closed, every property required), as
openai-python's ``to_strict_json_schema`` does; ``is_strict`` tells whether a schema a
caller wrote by hand is already in that form.
"""

from __future__ import annotations

from typing import Any

__all__ = ["example_value", "is_strict", "strict_schema"]

# Recursive models ($ref cycles) stop here: arrays become empty and optional values null
# (what ends a finite instance); an object nested twice as deep is given up on.
_MAX_DEPTH = 8
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "hostname": "example.com",
}


def _resolve(schema: Any, root: dict[str, Any]) -> Any:
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 32:
        ref: str = schema["$ref"]
        target: Any = root
        if ref.startswith("#"):
            for part in filter(None, ref[1:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
        else:
            target = None  # remote refs are not followed
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **siblings} if isinstance(target, dict) else siblings
        seen += 1
    return schema


def _number(schema: dict[str, Any], default: float) -> float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value = default
    if isinstance(low, int | float) and value < low:
        value = low + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
    if isinstance(high, int | float) and value > high:
        value = high - (1 if "exclusiveMaximum" in schema and "maximum" not in schema else 0)
    return value


def _string(schema: dict[str, Any]) -> str:
    text = _FORMATS.get(str(schema.get("format", "")), "example")
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = (text * (low // len(text) + 1))[:low]
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def example_value(schema: Any, root: dict[str, Any] | None = None, _depth: int = 0) -> Any:
    """A deterministic instance of ``schema``: every property, one array item, the first
    enum value or ``anyOf`` branch, ``"example"`` strings (or one of the right
    ``format``), numbers within their bounds, ``true``; ``$ref``/``$defs`` resolved.

    Patterns are not honoured. Recursive schemas stop at a fixed depth.
    """
    if root is None:
        root = schema if isinstance(schema, dict) else {}
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return None if schema is False else "example"
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            resolved = [_resolve(b, root) for b in branches]
            usable = [b for b in resolved if not (isinstance(b, dict) and b.get("type") == "null")]
            if _depth >= _MAX_DEPTH and len(usable) < len(resolved):
                return None
            return example_value((usable or resolved)[0], root, _depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part, root)
            if isinstance(part, dict):
                merged = {**merged, **part,
                          "properties": {**merged.get("properties", {}),
                                         **part.get("properties", {})}}
        merged.update({k: v for k, v in schema.items() if k != "allOf"})
        if not merged.get("properties"):
            merged.pop("properties", None)
        return example_value(merged, root, _depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        if "properties" in schema:
            kind = "object"
        elif "items" in schema or "prefixItems" in schema:
            kind = "array"
    if kind == "object":
        if _depth >= 2 * _MAX_DEPTH:
            return {}
        props = schema.get("properties") or {}
        return {name: example_value(sub, root, _depth + 1) for name, sub in props.items()}
    if kind == "array":
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [example_value(sub, root, _depth + 1) for sub in prefix]
        count = max(1, int(schema.get("minItems", 1))) if _depth < _MAX_DEPTH else int(
            schema.get("minItems", 0))
        if count == 0:
            return []
        item = example_value(schema.get("items", {}), root, _depth + 1)
        return [item] * count
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        return int(_number(schema, 1))
    if kind == "number":
        return _number(schema, 1.5)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "example"


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in OpenAI's strict form: ``additionalProperties: false`` (where
    unset) and every property required on each object; ``default: null`` dropped; a ``$ref`` with
    sibling keys inlined (strict mode rejects the siblings)."""
    return _strict(schema, schema)  # type: ignore[no-any-return]


def _strict(node: Any, root: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_strict(item, root) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node and len(node) > 1:
        resolved = _resolve({"$ref": node["$ref"]}, root)
        node = {**resolved, **{k: v for k, v in node.items() if k != "$ref"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "default" and value is None:
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: _strict(v, root) for k, v in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
            out[key] = _strict(value, root)
        else:
            out[key] = value
    if out.get("type") == "object" or "properties" in out:
        # An explicit additionalProperties (a dict[str, X] field) is kept, as openai-python
        # does: strict mode rejects it, but closing it would make the model emit ``{}``.
        out.setdefault("additionalProperties", False)
        if "properties" in out:
            out["required"] = list(out["properties"])
    all_of = out.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], dict):
        rest = {k: v for k, v in out.items() if k != "allOf"}
        out = {**all_of[0], **rest}
    return out


def is_strict(schema: Any) -> bool:
    """Whether OpenAI's strict mode would accept ``schema`` as it is (objects closed, all
    properties required) — checked structurally, not against every strict-mode rule."""
    if isinstance(schema, list):
        return all(is_strict(item) for item in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return False
        if set(schema.get("required") or ()) != set(props):
            return False
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions"):
            if not all(is_strict(v) for v in value.values()):
                return False
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems") and not is_strict(value):
            return False
    return True
