"""Decode NanoBot messages from Python with eclipse-zenoh and struct alone (README: wire format).

Usage: decode_envelope.py ENDPOINT KEYEXPR COUNT
Prints one JSON line per RawFrame of F32Le values received on KEYEXPR.
"""
import json
import struct
import sys
import threading

import zenoh

KINDS = {1: "RawFrame", 2: "Observation", 3: "ActionChunk", 4: "Event", 5: "SegmentFinalized",
         6: "ReplayRequest", 7: "ReplayBatch", 8: "Candidate", 9: "Promoted", 10: "Stats", 11: "Reject", 12: "LogAck",
         13: "AdapterRequest", 14: "AdapterBytes", 15: "PolicyStatus", 16: "CkptCommand", 17: "CkptReply",
         18: "Spooled"}
ENCODINGS = ["Jpeg", "Rgb8", "F32Le", "Bytes"]


def decode_header(buf):
    magic, version, kind, body_len, seq, stamp_ns, robot_len = struct.unpack_from("<2sBBIQQH", buf, 0)
    assert magic == b"NB", magic
    robot = buf[26:26 + robot_len].decode()
    return {"version": version, "kind": KINDS[kind], "seq": seq, "stamp_ns": stamp_ns, "robot": robot,
            "body": 26 + robot_len, "body_len": body_len}


def decode_raw_frame(buf, at):
    (n,) = struct.unpack_from("<Q", buf, at); at += 8
    sensor = buf[at:at + n].decode(); at += n
    (encoding,) = struct.unpack_from("<I", buf, at); at += 4
    (dims,) = struct.unpack_from("<Q", buf, at); at += 8
    shape = list(struct.unpack_from(f"<{dims}I", buf, at)); at += 4 * dims
    (data_len,) = struct.unpack_from("<Q", buf, at); at += 8
    return {"sensor": sensor, "encoding": ENCODINGS[encoding], "shape": shape, "data_len": data_len}, at


def main():
    endpoint, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    done = threading.Event()
    seen = []

    def on_sample(sample):
        if done.is_set():
            return
        buf = sample.payload.to_bytes()
        h = decode_header(buf)
        frame, at = decode_raw_frame(buf, h["body"])
        assert at == h["body"] + h["body_len"], (at, h)
        blob = buf[at:at + frame["data_len"]]
        out = {**h, **frame}
        if frame["encoding"] == "F32Le":
            out["values"] = list(struct.unpack(f"<{len(blob) // 4}f", blob))
        att = sample.attachment
        out["traceparent"] = att.to_string() if att is not None else None
        print(json.dumps(out), flush=True)
        seen.append(out)
        if len(seen) >= count:
            done.set()

    with zenoh.open(conf) as session:
        session.declare_subscriber(key, on_sample)
        if not done.wait(20):
            sys.exit(f"only {len(seen)} of {count} messages on {key} within 20 s")


if __name__ == "__main__":
    main()
