"""Decode NanoBot envelopes of any kind with nothing but the schema `nanobot schema --json`
prints and `struct`: no NanoBot code. Prints each message in NanoBot's JSON view
({"kind": ..., "msg": ...}, blobs as base64), one per line.

usage: decode_with_schema.py SCHEMA.json FILE...
"""
import base64
import json
import struct
import sys

PRIMS = {"BOOL": "<?", "U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q",
         "I8": "<b", "I16": "<h", "I32": "<i", "I64": "<q", "F32": "<f", "F64": "<d"}


class Reader:
    def __init__(self, buf, at):
        self.buf, self.at = buf, at
        self.blobs = []  # lengths, in field order; bytes follow the body

    def prim(self, code):
        (v,) = struct.unpack_from(PRIMS[code], self.buf, self.at)
        self.at += struct.calcsize(PRIMS[code])
        return v

    def value(self, fmt, types):
        if isinstance(fmt, str):
            if fmt == "STR":
                n = self.prim("U64")
                s = self.buf[self.at:self.at + n].decode()
                self.at += n
                return s
            if fmt == "UNIT":
                return None
            return self.prim(fmt)
        (tag, inner), = fmt.items()
        if tag == "SEQ":
            return [self.value(inner, types) for _ in range(self.prim("U64"))]
        if tag == "OPTION":
            return self.value(inner, types) if self.prim("U8") else None
        if tag == "TYPENAME":
            return self.container(inner, types)
        raise ValueError(f"format {tag} not handled")

    def fields(self, fields, types):
        out = {}
        for f in fields:
            (name, fmt), = f.items()
            out[name] = self.value(fmt, types)
        return out

    def container(self, name, types):
        c = types[name]
        (tag, inner), = c.items()
        if tag == "STRUCT":
            return self.fields(inner, types)
        if tag == "NEWTYPESTRUCT":
            v = self.value(inner, types)
            if name == "Blob":  # its length here, its bytes after the body
                blob = {"len": v}
                self.blobs.append(blob)
                return blob
            return v
        if tag == "ENUM":
            index = self.prim("U32")
            (vname, vfmt), = inner[str(index)].items()
            if vfmt == "UNIT":
                return vname
            (vtag, vinner), = vfmt.items()
            if vtag == "STRUCT":
                return {vname: self.fields(vinner, types)}
            if vtag == "NEWTYPE":
                return {vname: self.value(vinner, types)}
            raise ValueError(f"variant format {vtag} not handled")
        raise ValueError(f"container {tag} not handled")


def fill_blobs(v, blobs_bytes):
    """Replace each {"len": n} placeholder with its bytes, base64 (the JSON view's form)."""
    if isinstance(v, dict):
        if set(v) == {"len"} and id(v) in blobs_bytes:
            return base64.b64encode(blobs_bytes[id(v)]).decode()
        return {k: fill_blobs(x, blobs_bytes) for k, x in v.items()}
    if isinstance(v, list):
        return [fill_blobs(x, blobs_bytes) for x in v]
    return v


def decode(buf, schema):
    magic, version, kind, body_len, seq, stamp, rlen = struct.unpack_from("<2sBBIQQH", buf, 0)
    assert magic == b"NB" and version == 1, (magic, version)
    names = {v: k for k, v in schema["kinds"].items()}
    name = names[kind]
    body_at = 26 + rlen
    r = Reader(buf, body_at)
    msg = r.container(name, schema["types"])
    assert r.at == body_at + body_len, f"{name}: body used {r.at - body_at} of {body_len} bytes"
    at, blobs_bytes = r.at, {}
    for blob in r.blobs:
        blobs_bytes[id(blob)] = buf[at:at + blob["len"]]
        at += blob["len"]
    assert at == len(buf), f"{name}: {len(buf) - at} bytes after the blobs"
    return {"kind": name, "msg": fill_blobs(msg, blobs_bytes)}


def main():
    schema = json.load(open(sys.argv[1]))
    for path in sys.argv[2:]:
        print(json.dumps(decode(open(path, "rb").read(), schema)))


if __name__ == "__main__":
    main()
