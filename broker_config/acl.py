"""The five client roles of the production broker, and the Mosquitto ACL file generated from them.

Each role is a list of rule patterns over the topic tree of schemas/topics.py; ``{name}``
stands for the client's certificate CN. The file has one ``user`` block per client, so a
client that is not in it (a revoked one) has no rights at all, whatever its certificate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from schemas.topics import ERROR, MANIFEST, PREFIX, REPLY, RESULT, STATUS, UTTERANCE, check_identifier


class Role(StrEnum):
    """What a client is, and so which topics it may use."""

    DEVICE = "device"
    """A listening device: its own utterances, status and results out, its own replies in; the model topics."""
    WORKER = "worker"
    """A cloud worker: every device's utterances in, replies to them and error reports out (never results)."""
    OPERATOR = "operator"
    """Fleet tooling (firmware_tools publish / rollout / status): model topics out, statuses and errors in."""
    CONSUMER = "consumer"
    """An application that acts on results: every device's results, read only."""
    BRIDGE = "bridge"
    """The Home Assistant bridge (cloud_worker/ha_bridge.py): statuses, results and manifests in; HA's discovery
    configs, its own state topics and Rhasspy's Hermes topics out."""
    HOMEASSISTANT = "homeassistant"
    """Home Assistant's own MQTT client: the bridge's discovery configs and state topics in, its birth message out;
    nothing of mqvox's own topic tree."""


class Access(StrEnum):
    """Mosquitto's access words."""

    READ = "read"
    """Subscribe and receive. Mosquitto grants any subscription; what it may not read never arrives."""
    WRITE = "write"
    """Publish (a Last Will too)."""
    READWRITE = "readwrite"
    """Both."""


@dataclass(frozen=True)
class Rule:
    """One ``topic`` line of a role, before the client's name is filled in."""

    access: Access
    """What the client may do on the topic."""
    pattern: str
    """Topic filter; ``{name}`` is the client's name (for a device, its device id)."""

    def line(self, name: str) -> str:
        return f"topic {self.access} {self.pattern.format(name=name)}"


MODELS = PREFIX + "/models/#"
"""Every model topic: the manifests and blobs of all channels."""


HA_DISCOVERY = "homeassistant/#"
"""Home Assistant's discovery topics (HaBridgeSettings.discovery_prefix), its birth message among them."""
HA_BIRTH = "homeassistant/status"
"""Where Home Assistant says it (re)started."""
BRIDGE_STATE = "mqvox/ha/#"
"""The bridge's own topics for Home Assistant (HaBridgeSettings.state_prefix), its Last Will among them."""
HERMES = "hermes/#"
"""Rhasspy's Hermes topics, for flows written for Rhasspy."""


def _device_topic(spec) -> str:
    # The device's own topic, with {name} where its id goes.
    return spec.template.replace("{device_id}", "{name}")


ROLE_RULES: dict[Role, tuple[Rule, ...]] = {
    Role.DEVICE: (
        Rule(Access.WRITE, _device_topic(UTTERANCE)),
        Rule(Access.WRITE, _device_topic(STATUS)),
        # The one final result of each utterance, edge or cloud: the device alone publishes it.
        Rule(Access.WRITE, _device_topic(RESULT)),
        # The workers' replies to its utterances: no one else reads them.
        Rule(Access.READ, _device_topic(REPLY)),
        Rule(Access.READ, MODELS),
    ),
    Role.WORKER: (
        Rule(Access.READ, UTTERANCE.filter()),
        Rule(Access.WRITE, REPLY.filter()),
        Rule(Access.WRITE, ERROR.topic()),
    ),
    Role.OPERATOR: (
        Rule(Access.READWRITE, MODELS),
        Rule(Access.READ, STATUS.filter()),
        Rule(Access.READ, ERROR.topic()),
    ),
    Role.CONSUMER: (Rule(Access.READ, RESULT.filter()),),
    Role.BRIDGE: (
        Rule(Access.READ, STATUS.filter()),
        Rule(Access.READ, RESULT.filter()),
        # The manifests alone: the bridge shows the latest version, it never needs a model.
        Rule(Access.READ, MANIFEST.filter()),
        Rule(Access.WRITE, HA_DISCOVERY),
        Rule(Access.READ, HA_BIRTH),
        Rule(Access.WRITE, BRIDGE_STATE),
        Rule(Access.WRITE, HERMES),
    ),
    Role.HOMEASSISTANT: (
        # HA subscribes to its whole discovery prefix and publishes its birth message (and Last Will) there.
        Rule(Access.READ, HA_DISCOVERY),
        Rule(Access.WRITE, HA_BIRTH),
        Rule(Access.READ, BRIDGE_STATE),
    ),
}
"""What each role may do. Anything not listed is denied."""


@dataclass(frozen=True)
class Client:
    """A client the broker lets in: its certificate CN and its role."""

    name: str
    """The CN of its certificate: its MQTT user name and client id, and for a device its device id."""
    role: Role
    """What it may do."""

    def __post_init__(self) -> None:
        # Same character set as device ids: no topic syntax, no spaces, nothing the ACL file would misread.
        check_identifier("device_id", self.name)


def render_acl(clients: Iterable[Client]) -> str:
    """The Mosquitto ACL file for these clients, in name order so that the file changes only where they do."""
    lines = [
        "# mqvox broker ACL, generated by `python -m firmware_tools provision` from broker_config/acl.py.",
        "# Do not edit: re-run provision. One block per client; a client without a block may do nothing.",
    ]
    for client in sorted(clients, key=lambda client: client.name):
        lines += ["", f"# {client.role}", f"user {client.name}"]
        lines += [rule.line(client.name) for rule in ROLE_RULES[client.role]]
    return "\n".join(lines) + "\n"
