"""Model packages for rollout drills and tests: a good model under a new version, and a broken one.

``copy_package`` gives the same model under another version: it must pass a device's
self-test. ``break_package`` gives a model that loads like the original (same file
layout, shapes, labels and front end, with a manifest whose digest matches) but whose
largest weight tensor is shuffled, so it hears nothing: only the self-test can tell.
Both write ``manifest.json`` and the model file, nothing else of the source package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np

from schemas.model import ModelPackage, parse_version


def copy_package(source: Path, out: Path, version: str) -> Path:
    """The package in ``source`` as ``version`` in ``out`` (created now, model unchanged); returns ``out``."""
    package = _load(source)
    return _write(package, package.model_path(source).read_bytes(), out, version)


def break_package(source: Path, out: Path, version: str, seed: int = 0) -> Path:
    """The package in ``source`` as ``version`` in ``out``, its largest int8 weight tensor shuffled; returns ``out``.

    The shuffle keeps the tensor's values, only moves them (seeded by ``seed``), so the
    file loads and runs as before; the model just no longer recognises anything.
    """
    package = _load(source)
    model = package.model_path(source).read_bytes()
    weights = _largest_int8_constant(model)
    at = model.find(weights)
    if at < 0 or model.find(weights, at + 1) >= 0:
        raise ValueError(f"the largest weight tensor of {source / package.model_file} is not in the file exactly once")
    shuffled = np.random.default_rng(seed).permutation(np.frombuffer(weights, np.int8)).tobytes()
    return _write(package, model[:at] + shuffled + model[at + len(weights) :], out, version)


def _load(source: Path) -> ModelPackage:
    source = Path(source)
    if not (source / "manifest.json").is_file():
        raise FileNotFoundError(f"no model package in {source}: manifest.json is missing")
    return ModelPackage.load(source)


def _write(package: ModelPackage, model: bytes, out: Path, version: str) -> Path:
    try:
        parse_version(version)
    except ValueError:
        raise ValueError(f"a package version reads MAJOR.MINOR.PATCH, not {version!r}") from None
    out = Path(out)
    package = dataclasses.replace(
        package,
        version=version,
        sha256=hashlib.sha256(model).hexdigest(),
        size_bytes=len(model),
        created_at=round(time.time(), 3),
    )
    manifest = package.to_json()  # validated before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / package.model_file).write_bytes(model)
    (out / "manifest.json").write_text(manifest, encoding="utf-8")
    return out


def _largest_int8_constant(model: bytes) -> bytes:
    """The bytes of the model's largest int8 constant tensor (weights), as stored in the file."""
    from ai_edge_litert.interpreter import Interpreter  # the device's runtime (the device extra), only here

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    variable = {detail["index"] for detail in interpreter.get_input_details() + interpreter.get_output_details()}
    best = b""
    for detail in interpreter.get_tensor_details():
        if detail["index"] in variable or detail["dtype"] != np.int8:
            continue
        try:
            tensor = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue  # no data of its own: an intermediate result
        data = tensor.tobytes()
        # A constant's bytes are in the file; an intermediate's buffer (zeros before any run) is not.
        if len(data) > len(best) and tensor.min() != tensor.max() and data in model:
            best = data
    if not best:
        raise ValueError("the model has no int8 weight tensor")
    return best
