"""The topic tree: identifier rules, topic parsing, and schemas/README.md kept equal to schemas/topics.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.errors import ErrorCode, ProtocolError
from schemas.protocol import MESSAGE_TYPES
from schemas.topics import (
    ALL_TOPICS,
    MANIFEST,
    MODEL_BLOB,
    REPLY,
    RESULT,
    UTTERANCE,
    check_identifier,
    shared_filter,
    spec_for,
)
from schemas.validation import SCHEMA_NAMES

README = Path(__file__).resolve().parent.parent / "schemas" / "README.md"
SIZES = {"KiB": 1024, "MiB": 1024 * 1024}


@pytest.mark.parametrize("device_id", ["pi-1", "A", "plant3.line2.press_07", "x" * 64, "0abc"])
def test_safe_device_ids_are_accepted(device_id: str) -> None:
    assert check_identifier("device_id", device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    ["pi+1", "+", "pi#", "#", "site/pi", "/", "", "x" * 65, "pï", "пи", "pi 1", "$SYS", "-lead", ".hidden", "a\x00b"],
)
def test_unsafe_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        check_identifier("device_id", device_id)
    assert refused.value.code == ErrorCode.BAD_TOPIC
    with pytest.raises(ProtocolError):
        RESULT.topic(device_id=device_id)


def test_topics_format_and_parse_back() -> None:
    assert UTTERANCE.topic(device_id="pi-1") == "mqvox/v1/devices/pi-1/utterance"
    assert MODEL_BLOB.topic(channel="stable", version="1.2.0") == "mqvox/v1/models/stable/blobs/1.2.0"
    assert spec_for("mqvox/v1/devices/pi-1/result") == (RESULT, {"device_id": "pi-1"})
    assert spec_for("mqvox/v1/devices/pi-1/reply") == (REPLY, {"device_id": "pi-1"})
    assert spec_for("mqvox/v1/models/beta/manifest") == (MANIFEST, {"channel": "beta"})
    assert UTTERANCE.filter() == "mqvox/v1/devices/+/utterance"
    assert shared_filter("workers", UTTERANCE) == "$share/workers/mqvox/v1/devices/+/utterance"


@pytest.mark.parametrize(
    "topic",
    ["mqvox/v1/devices/pi-1/unknown", "mqvox/v2/devices/pi-1/result", "mqvox/v1/devices/pï/result", "other/topic"],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        spec_for(topic)
    assert refused.value.code == ErrorCode.BAD_TOPIC


def readme_topic_rows() -> list[list[str]]:
    rows = []
    for line in README.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("`mqvox/v1/"):
            rows.append(cells)
    return rows


def test_readme_documents_every_topic_exactly_as_the_code_defines_it() -> None:
    rows = readme_topic_rows()
    assert len(rows) == len(ALL_TOPICS)
    by_template = {spec.template: spec for spec in ALL_TOPICS}
    for topic, message, _direction, qos, retained, size, content_type in rows:
        spec = by_template[topic.strip("`")]
        class_name, schema_name = re.fullmatch(r"`(\w+)` \(`(\w+)`\)", message).groups()
        assert schema_name == spec.name
        assert schema_name in SCHEMA_NAMES, f"{topic} has no schema file"
        assert MESSAGE_TYPES[spec.name].__name__ == class_name, f"{topic} has no dataclass {class_name}"
        assert int(qos) == spec.qos
        assert (retained == "yes") == spec.retain
        number, unit = size.split()
        assert int(number) * SIZES[unit] == spec.max_payload_bytes
        assert content_type.strip("`") == spec.content_type


def test_every_message_class_knows_how_to_cross_the_wire() -> None:
    for name, cls in MESSAGE_TYPES.items():
        assert cls.spec.name == name
        assert callable(cls.to_wire) and callable(cls.from_wire)
