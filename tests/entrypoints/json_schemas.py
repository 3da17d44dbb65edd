"""30 JSON schemas for structured-output tests and benchmarks: nested objects, arrays, enums, bounded
numbers, required fields, $ref. Strings and arrays are bounded so that every valid document fits a
few hundred tokens, whatever the sampler draws."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 16}
_AGE = {"type": "integer", "minimum": 0, "maximum": 120}
_SCORE = {"type": "number", "minimum": 0, "maximum": 10}


def _object(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


JSON_SCHEMAS: list[dict[str, Any]] = [
    _object(name=_NAME, age=_AGE),
    _object(city=_NAME, country=_NAME, population={"type": "integer", "minimum": 0, "maximum": 40_000_000}),
    _object(color={"type": "string", "enum": ["red", "green", "blue"]}),
    _object(ok={"type": "boolean"}),
    _object(title=_NAME, rating=_SCORE),
    _object(tags={"type": "array", "items": _NAME, "minItems": 1, "maxItems": 3}),
    _object(
        point=_object(
            x={"type": "integer", "minimum": -100, "maximum": 100},
            y={"type": "integer", "minimum": -100, "maximum": 100},
        )
    ),
    _object(
        person=_object(
            name=_NAME, address=_object(street=_NAME, zip={"type": "string", "pattern": "^[0-9]{5}$"})
        )
    ),
    _object(["id"], id={"type": "integer", "minimum": 1, "maximum": 9999}, note=_NAME),
    _object(
        items={
            "type": "array",
            "items": _object(sku=_NAME, qty={"type": "integer", "minimum": 1, "maximum": 9}),
            "maxItems": 2,
        }
    ),
    _object(status={"enum": ["open", "closed", "pending"]}, priority={"type": "integer", "enum": [1, 2, 3]}),
    _object(temperature={"type": "number", "minimum": -50, "maximum": 60}, unit={"enum": ["C", "F"]}),
    _object(
        answer={"type": "string", "maxLength": 24}, confidence={"type": "number", "minimum": 0, "maximum": 1}
    ),
    _object(
        matrix={
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 2,
            },
            "minItems": 2,
            "maxItems": 2,
        }
    ),
    _object(user=_object(first=_NAME, last=_NAME), admin={"type": "boolean"}),
    _object(
        value={
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 8}]
        }
    ),
    _object(maybe={"type": ["string", "null"], "maxLength": 10}),
    _object(date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}),
    _object(email={"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}),
    _object(scores={"type": "array", "items": _SCORE, "minItems": 1, "maxItems": 4}),
    {
        "$defs": {"person": _object(name=_NAME, age=_AGE)},
        **_object(author={"$ref": "#/$defs/person"}, editor={"$ref": "#/$defs/person"}),
    },
    {
        "$defs": {"tag": {"type": "string", "enum": ["a", "b", "c"]}},
        **_object(tags={"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}),
    },
    {
        "definitions": {
            "money": _object(
                amount={"type": "integer", "minimum": 0, "maximum": 1000}, currency={"enum": ["EUR", "USD"]}
            )
        },
        **_object(price={"$ref": "#/definitions/money"}),
    },
    _object(a=_object(b=_object(c=_object(d={"type": "integer", "minimum": 0, "maximum": 9})))),
    _object(["name"], name=_NAME, nickname=_NAME, age=_AGE),
    _object(flag={"const": "yes"}, n={"type": "integer", "minimum": 3, "maximum": 5}),
    {"type": "array", "items": _object(k=_NAME), "minItems": 1, "maxItems": 2},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    _object(
        weekday={"enum": ["Mon", "Tue", "Wed", "Thu", "Fri"]},
        hours={"type": "integer", "minimum": 0, "maximum": 24},
    ),
    _object(
        product=_object(name=_NAME, price={"type": "number", "minimum": 0, "maximum": 500}),
        in_stock={"type": "boolean"},
        categories={"type": "array", "items": {"enum": ["food", "tools", "toys"]}, "maxItems": 2},
    ),
]
assert len(JSON_SCHEMAS) == 30
