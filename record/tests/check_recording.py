"""Read a NanoBot MCAP recording with the `mcap` package, as Foxglove and other tools would, and
compare the datasets that two logger runs wrote.

usage: check_recording.py FILE.mcap [DATASET_A DATASET_B]
prints {"topics": {topic: count}, "images": N, "rows": N} on success, exits 1 on a mismatch
"""
import base64
import glob
import json
import os
import sys

from mcap.reader import make_reader


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


topics = {}
images = 0
with open(sys.argv[1], "rb") as f:
    reader = make_reader(f)
    summary = reader.get_summary()
    if summary is None or not summary.channels:
        fail("no summary or no channels")
    for schema, channel, message in reader.iter_messages():
        topics[channel.topic] = topics.get(channel.topic, 0) + 1
        if channel.message_encoding != "json":
            continue
        if schema is None or schema.encoding != "jsonschema":
            fail(f"{channel.topic}: a JSON channel without a JSON Schema")
        json.loads(schema.data)
        value = json.loads(message.data)
        if schema.name == "foxglove.CompressedImage":
            data = base64.b64decode(value["data"])
            if value["format"] != "jpeg" or data[:2] != b"\xff\xd8":
                fail(f"{channel.topic}: not a JPEG image")
            images += 1
        else:
            for key in ["kind", "robot", "seq", "stamp_ns", "msg"]:
                if key not in value:
                    fail(f"{channel.topic}: message without `{key}`")
            if value["kind"] != schema.name or message.publish_time != value["stamp_ns"]:
                fail(f"{channel.topic}: kind {value['kind']} under schema {schema.name}")

rows = 0
if len(sys.argv) == 4:
    import pyarrow.parquet as pq

    def table(root):
        files = sorted(glob.glob(os.path.join(root, "data/chunk-*/file-*.parquet")))
        if not files:
            fail(f"{root}: no data files")
        rows = []
        for path in files:
            rows.extend(pq.read_table(path).to_pylist())
        return sorted(rows, key=lambda r: r["index"])

    a, b = table(sys.argv[2]), table(sys.argv[3])
    if len(a) != len(b):
        fail(f"{len(a)} rows logged live, {len(b)} from the recording")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            diff = [k for k in x if x[k] != y.get(k)]
            fail(f"row {i} differs in {diff}")
    rows = len(a)

print(json.dumps({"topics": topics, "images": images, "rows": rows}))
