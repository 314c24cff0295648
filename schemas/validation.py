"""JSON encoding and JSON Schema validation shared by every message.

The schema files in ``json/`` are the contract; every message goes through
:func:`decode_json` on the way in and :func:`encode_json` on the way out, so a
peer that sends something else gets a :class:`~schemas.errors.ProtocolError`
that says which field is wrong.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource

from schemas.errors import ErrorCode, ProtocolError

SCHEMA_NAMES = (
    "common",
    "utterance",
    "reply",
    "result",
    "status",
    "error",
    "manifest",
    "model_blob",
    "vocabulary",
    "model_package",
)
"""Every schema file, as ``json/<name>.schema.json``."""


def schema_text(name: str) -> str:
    """The text of ``json/<name>.schema.json``."""
    return resources.files("schemas").joinpath("json", f"{name}.schema.json").read_text(encoding="utf-8")


@cache
def _registry() -> Registry:
    resources_by_id = []
    for name in SCHEMA_NAMES:
        contents = json.loads(schema_text(name))
        resources_by_id.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources_by_id)


def _pattern(validator, pattern: str, instance: Any, schema: dict) -> Any:
    """The ``pattern`` keyword with JSON Schema's own ``$``: the end of the string, where Python's ``$`` also
    matches before a final newline (so "pi-1\\n" passed a pattern that ``check_identifier`` refuses)."""
    if not validator.is_type(instance, "string"):
        return
    if re.search(_strict_end(pattern), instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _strict_end(pattern: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"(?<!\\)\$$", r"\\Z", pattern))


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """A draft 2020-12 validator for ``json/<name>.schema.json``, with its references resolved."""
    schema = json.loads(schema_text(name))
    jsonschema.Draft202012Validator.check_schema(schema)
    return _Validator(schema, registry=_registry(), format_checker=jsonschema.FormatChecker())


def validate(name: str, instance: Any) -> None:
    """Raise :class:`ProtocolError` unless ``instance`` satisfies schema ``name``."""
    error = jsonschema.exceptions.best_match(validator(name).iter_errors(instance))
    if error is not None:
        path = "/" + "/".join(str(part) for part in error.absolute_path)
        raise ProtocolError(ErrorCode.SCHEMA_VIOLATION, name, error.message, path=path)


def _refuse_constant(constant: str) -> float:
    # Python's json accepts NaN and Infinity, which are not JSON; refuse them.
    raise ValueError(f"{constant} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses as infinity, which no peer could send on; refuse it as NaN and Infinity are.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a double")
    return value


def decode_json(name: str, data: bytes | str, *, max_bytes: int) -> dict[str, Any]:
    """Parse ``data`` as UTF-8 JSON, check its size, and validate it against schema ``name``."""
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > max_bytes:
        raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, name, f"{size} bytes is over the limit of {max_bytes}")
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        instance = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(ErrorCode.INVALID_JSON, name, str(error)) from None
    except RecursionError:
        # Thousands of nested arrays fit in a few kB; the parser gives up before the schema could.
        raise ProtocolError(ErrorCode.INVALID_JSON, name, "nested too deeply") from None
    validate(name, instance)
    return instance


def encode_json(name: str, instance: dict[str, Any], *, max_bytes: int) -> bytes:
    """Validate ``instance`` against schema ``name`` and encode it as compact UTF-8 JSON.

    Senders validate too, so a bug shows up where it is made rather than at a peer.
    """
    validate(name, instance)
    data = json.dumps(instance, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, name, f"{len(data)} bytes is over the limit of {max_bytes}")
    return data


def canonical_json(instance: dict[str, Any]) -> bytes:
    """The byte form that signatures cover: keys sorted, no spaces, UTF-8, no NaN."""
    return json.dumps(instance, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )
