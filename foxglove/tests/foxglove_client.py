"""A Foxglove WebSocket client (subprotocol foxglove.sdk.v1, as Foxglove speaks it to the SDK's server), written
with the `websockets` package: waits for the bridge to advertise a camera image channel and an
observation channel, subscribes to both, and decodes one message of each.

usage: foxglove_client.py ws://HOST:PORT IMAGE_TOPIC OBS_TOPIC
prints {"channels": [...], "image": {...}, "obs": {...}} on success; exits 1 otherwise
"""
import asyncio
import base64
import json
import struct
import sys

import websockets


async def main(url, image_topic, obs_topic):
    async with websockets.connect(url, subprotocols=["foxglove.sdk.v1"], max_size=None) as ws:
        channels = {}
        want = {image_topic: None, obs_topic: None}
        got = {}
        subscribed = False
        async with asyncio.timeout(30):
            while len(got) < 2:
                frame = await ws.recv()
                if isinstance(frame, str):
                    op = json.loads(frame)
                    if op["op"] == "advertise":
                        for c in op["channels"]:
                            channels[c["id"]] = c
                            if c["topic"] in want:
                                want[c["topic"]] = c
                    if not subscribed and all(want.values()):
                        subs = [{"id": i + 1, "channelId": want[t]["id"]} for i, t in enumerate([image_topic, obs_topic])]
                        await ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))
                        subscribed = True
                    continue
                opcode = frame[0]
                if opcode != 1:  # MessageData
                    continue
                sub_id, stamp = struct.unpack_from("<IQ", frame, 1)
                payload = json.loads(frame[13:])
                topic = [image_topic, obs_topic][sub_id - 1]
                got.setdefault(topic, (stamp, payload))
        image_stamp, image = got[image_topic]
        jpeg = base64.b64decode(image["data"])
        obs_stamp, obs = got[obs_topic]
        c_img, c_obs = want[image_topic], want[obs_topic]
        print(json.dumps({
            "channels": sorted(c["topic"] for c in channels.values()),
            "image": {
                "schema": c_img["schemaName"], "encoding": c_img["encoding"],
                "format": image["format"], "jpeg_magic": jpeg[:2].hex(), "bytes": len(jpeg),
                "stamp_matches": image_stamp == image["timestamp"]["sec"] * 10**9 + image["timestamp"]["nsec"],
            },
            "obs": {
                "schema": c_obs["schemaName"], "schema_encoding": c_obs["schemaEncoding"],
                "state_in_schema": "state" in json.loads(c_obs["schema"])["properties"]["msg"]["properties"],
                "kind": obs["kind"], "state": obs["msg"]["state"], "robot": obs["robot"],
            },
        }))


asyncio.run(main(*sys.argv[1:4]))
