"""Prints the intent, slots and confidence of every mqvox device's final results. It needs paho-mqtt alone.

On the development broker: python examples/consumer.py [HOST [PORT]] (localhost 1883 by default). On the production
broker, with a consumer's certificate: python examples/consumer.py --tls fleet/clients/dashboard mqtt.example.com 8883
"""

import argparse
import json
import sys

import paho.mqtt.client as mqtt

parser = argparse.ArgumentParser(description="Print every mqvox device's final results.")
parser.add_argument("host", nargs="?", default="localhost")
parser.add_argument("port", nargs="?", type=int, default=1883)
parser.add_argument("--tls", metavar="DIR", help="a client folder of firmware_tools provision --consumer NAME")
args = parser.parse_args()


def on_message(client, userdata, message):
    try:
        result = json.loads(message.payload)
        print(f"{result['device_id']}: intent={result['intent']} slots={json.dumps(result['slots'])} "
              f"confidence={result['confidence']:.2f} acted={result['acted']}", flush=True)  # fmt: skip
    except (ValueError, KeyError, TypeError) as error:  # not a result: say so and go on
        print(f"skipped a malformed message on {message.topic}: {error!r}", flush=True)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
client.on_connect = lambda client, *_: client.subscribe("mqvox/v1/devices/+/result", qos=1)
client.on_subscribe = lambda *_: print(f"listening for results on {args.host}:{args.port}", flush=True)
client.on_message = on_message
try:
    if args.tls:  # the production broker: TLS, and this certificate's CN as user name and client id
        client.tls_set(ca_certs=f"{args.tls}/ca.pem", certfile=f"{args.tls}/cert.pem", keyfile=f"{args.tls}/key.pem")
    client.connect(args.host, args.port)
    client.loop_forever()
except OSError as error:
    print(f"cannot connect to {args.host}:{args.port}: {error}", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt:
    pass
