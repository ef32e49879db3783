"""pyarrow baseline for `nanobot bench log`: the same rows, schema and compression, written with
pyarrow's ParquetWriter. usage: bench_log.py ROWS ROWS_PER_FILE BLOBS_FILE OUT_DIR -> JSON"""
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

rows, per_file, blobs_path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
blob = open(blobs_path, "rb").read()
n_blobs = len(blob) // 4096
blobs = [blob[i * 4096:(i + 1) * 4096] for i in range(n_blobs)]


def table(lo, hi):
    i = np.arange(lo, hi, dtype=np.int64)
    f = i.astype(np.float32)
    state = (f[:, None] + np.arange(96, dtype=np.float32)[None, :] * 0.001).reshape(-1)
    action = np.stack([f * 0.5, -f], axis=1).astype(np.float32).reshape(-1)
    surface = np.tile(np.linspace(0, 1, 64, dtype=np.float32), hi - lo)
    image = pa.StructArray.from_arrays(
        [pa.array([blobs[k % n_blobs] for k in range(lo, hi)], pa.binary()), pa.nulls(hi - lo, pa.string())],
        names=["bytes", "path"])
    return pa.table({
        "timestamp": pa.array((i % 1000).astype(np.float32) / 20.0),
        "frame_index": pa.array(i % 1000),
        "episode_index": pa.array(i // 1000),
        "index": pa.array(i),
        "task_index": pa.array(np.zeros(hi - lo, dtype=np.int64)),
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state), 96),
        "action": pa.FixedSizeListArray.from_arrays(pa.array(action), 2),
        "observation.images.camera": image,
        "observation.surface": pa.FixedSizeListArray.from_arrays(pa.array(surface), 64),
        "seq": pa.array(i),
        "stamp_ns": pa.array(i * 50_000_000),
        "source_episode": pa.array(i // 1000),
    })


# The rows exist before the clock starts (as they do for the Rust writer, which gets them in
# memory): what is timed is building Arrow tables and writing Parquet, in row groups of 4096.
os.makedirs(out, exist_ok=True)
t0 = time.perf_counter()
written = 0
files = 0
for start in range(0, rows, per_file):
    end = min(rows, start + per_file)
    path = os.path.join(out, f"file-{files:03d}.parquet")
    with pq.ParquetWriter(path, table(start, start + 1).schema, compression="snappy") as w:
        for lo in range(start, end, 4096):
            w.write_table(table(lo, min(end, lo + 4096)), row_group_size=4096)
    files += 1
    written += os.path.getsize(path)
secs = time.perf_counter() - t0
print(json.dumps({"secs": secs, "bytes": written, "files": files, "pyarrow": pa.__version__}))
