"""Read a GGUF file written by NanoBot with the `gguf` package (llama.cpp's own reader) and
re-quantize its f32 tensor with gguf's reference quantizers.

Usage: gguf_check.py FILE  ->  one JSON object on stdout.
"""
import json
import sys

import numpy as np
import gguf
from gguf import quants

reader = gguf.GGUFReader(sys.argv[1])
meta = {}
for key, field in reader.fields.items():
    if key.startswith("GGUF."):
        continue
    try:
        meta[key] = field.contents()
    except Exception as e:  # noqa: BLE001
        meta[key] = f"<unreadable: {e}>"

tensors = {}
by_name = {t.name: t for t in reader.tensors}
for t in reader.tensors:
    qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
    values = quants.dequantize(t.data, qtype).astype(np.float32).reshape(-1)
    tensors[t.name] = {
        "type": int(t.tensor_type),
        "type_name": qtype.name,
        "ne": [int(x) for x in t.shape],
        "n": int(t.n_elements),
        "values": values.tolist(),
    }

# gguf's reference quantizers on the f32 original give the same bytes as NanoBot's.
original = np.asarray(by_name["w.f32"].data, dtype=np.float32).reshape(-1, 64)
same = {}
for name, qtype in [("w.q8_0", gguf.GGMLQuantizationType.Q8_0), ("w.mxfp4", gguf.GGMLQuantizationType.MXFP4)]:
    ref = quants.quantize(original, qtype).reshape(-1)
    ours = np.asarray(by_name[name].data, dtype=np.uint8).reshape(-1)
    same[name] = bool(ref.shape == ours.shape and np.array_equal(ref, ours))
print(json.dumps({"metadata": meta, "tensors": tensors, "same_bytes_as_gguf": same}))
