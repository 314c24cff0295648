"""Writes flows.json beside this file: the Node-RED example flow, one output per intent of the vocabulary.

    python examples/node-red/build_flows.py

Run it again when schemas/vocabulary.toml changes; tests/test_node_red.py fails until flows.json is the one this
writes. The flow: an `mqtt in` node on every device's result topic, a JSON parse, a switch that lets through the
results a device acted on, a switch on `msg.payload.intent` with one output per intent plus `none` (no intent, or
one the device did not act on), and on each output a `change` node (msg.topic = the intent, msg.payload = what a
user's node needs) followed by an `mqtt out` node on `mqvox-example/intent/<intent>`: the place to attach your own.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.topics import RESULT
from schemas.vocabulary import load_vocabulary

FLOWS_FILE = Path(__file__).resolve().parent / "flows.json"
BROKER_NODE_ID = "mqvox-broker"
OUTPUT_TOPIC_PREFIX = "mqvox-example/intent/"
"""Where each intent's message is published: the flow's visible outputs, which tests/test_node_red.py reads."""
NO_INTENT = "none"
"""The extra output: results with no intent (error, outside the vocabulary) or one the device did not act on."""
PAYLOAD = (
    '{"intent": payload.intent, "slots": payload.slots, "device": payload.device_id, '
    '"confidence": payload.confidence, "source": payload.source, "acted": payload.acted, '
    '"transcript": payload.transcript, "error": payload.error, "utterance_id": payload.utterance_id}'
)
"""JSONata of the message each output carries: the result's fields a user's node needs, under short names."""


def flows(intents: tuple[str, ...]) -> list[dict]:
    """The example flow for ``intents``: one tab, its nodes, and the broker config node."""
    tab = "mqvox-results"
    outputs = [*intents, NO_INTENT]
    nodes: list[dict] = [
        {
            "id": tab,
            "type": "tab",
            "label": "mqvox results",
            "disabled": False,
            "info": "One message per intent from every mqvox device's final results. Attach your own nodes to "
            "the change node of an intent (or replace its mqtt out node): msg.topic is the intent, msg.payload "
            "has intent, slots, device, confidence, source, acted, transcript, error and utterance_id.",
        },
        {
            "id": BROKER_NODE_ID,
            "type": "mqtt-broker",
            "name": "mqvox broker",
            "broker": "localhost",
            "port": "1883",
            "clientid": "",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "5",
            "keepalive": "60",
            "cleansession": True,
            "autoUnsubscribe": True,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
            "sessionExpiry": "",
        },
        {
            "id": "mqvox-result-in",
            "type": "mqtt in",
            "z": tab,
            "name": "every device's result",
            "topic": RESULT.filter(),
            "qos": "1",
            "datatype": "utf8",
            "broker": BROKER_NODE_ID,
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "x": 140,
            "y": 60,
            "wires": [["mqvox-parse"]],
        },
        {
            "id": "mqvox-parse",
            "type": "json",
            "z": tab,
            "name": "parse",
            "property": "payload",
            "action": "obj",
            "pretty": False,
            "x": 330,
            "y": 60,
            "wires": [["mqvox-acted", "mqvox-debug"]],
        },
        {
            "id": "mqvox-debug",
            "type": "debug",
            "z": tab,
            "name": "every result",
            "active": True,
            "tosidebar": True,
            "console": False,
            "tostatus": False,
            "complete": "payload",
            "targetType": "msg",
            "x": 340,
            "y": 120,
            "wires": [],
        },
        {
            "id": "mqvox-acted",
            "type": "switch",
            "z": tab,
            "name": "acted on?",
            "property": "payload.acted",
            "propertyType": "msg",
            "rules": [{"t": "true"}, {"t": "else"}],
            "checkall": "false",
            "repair": False,
            "outputs": 2,
            "x": 500,
            "y": 60,
            "wires": [["mqvox-intent"], [f"change-{NO_INTENT}"]],
        },
        {
            "id": "mqvox-intent",
            "type": "switch",
            "z": tab,
            "name": "intent",
            "property": "payload.intent",
            "propertyType": "msg",
            "rules": [{"t": "eq", "v": intent, "vt": "str"} for intent in intents] + [{"t": "else"}],
            "checkall": "false",
            "repair": False,
            "outputs": len(outputs),
            "x": 660,
            "y": 60,
            "wires": [[f"change-{output}"] for output in outputs],
        },
    ]
    for row, output in enumerate(outputs):
        y = 60 + 50 * row
        nodes.append(
            {
                "id": f"change-{output}",
                "type": "change",
                "z": tab,
                "name": output,
                "rules": [
                    {"t": "set", "p": "topic", "pt": "msg", "to": output, "tot": "str"},
                    {"t": "set", "p": "payload", "pt": "msg", "to": PAYLOAD, "tot": "jsonata"},
                ],
                "x": 860,
                "y": y,
                "wires": [[f"publish-{output}"]],
            }
        )
        nodes.append(
            {
                "id": f"publish-{output}",
                "type": "mqtt out",
                "z": tab,
                "name": f"{OUTPUT_TOPIC_PREFIX}{output}",
                "topic": f"{OUTPUT_TOPIC_PREFIX}{output}",
                "qos": "1",
                "retain": "false",
                "respTopic": "",
                "contentType": "",
                "userProps": "",
                "correl": "",
                "expiry": "",
                "broker": BROKER_NODE_ID,
                "x": 1100,
                "y": y,
                "wires": [],
            }
        )
    return nodes


def flows_text(intents: tuple[str, ...]) -> str:
    return json.dumps(flows(intents), indent=2) + "\n"


if __name__ == "__main__":
    FLOWS_FILE.write_text(flows_text(load_vocabulary().intents), encoding="utf-8")
    print(f"wrote {FLOWS_FILE}")
