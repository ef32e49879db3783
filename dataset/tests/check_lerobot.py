"""Check a NanoBot dataset against LeRobotDataset v3.0 with pyarrow alone.

usage: check_lerobot.py DIR   -> prints {"rows": N, "seqs": [...]} on success, exits 1 on a mismatch
"""
import glob
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


root = sys.argv[1]
info = json.load(open(os.path.join(root, "meta/info.json")))
for key in ["codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
            "fps", "splits", "data_path", "video_path", "features"]:
    if key not in info:
        fail(f"info.json: no `{key}`")
if info["codebase_version"] != "v3.0":
    fail(f"info.json: codebase_version {info['codebase_version']}")
if info["data_path"] != "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet":
    fail(f"info.json: data_path {info['data_path']}")
features = info["features"]
for name in ["timestamp", "frame_index", "episode_index", "index", "task_index", "observation.state", "action"]:
    if name not in features:
        fail(f"info.json: feature `{name}` missing")
for name, f in features.items():
    for k in ["dtype", "shape", "names"]:
        if k not in f:
            fail(f"info.json: feature `{name}` has no `{k}`")

expected_types = {
    "timestamp": pa.float32(),
    "frame_index": pa.int64(),
    "episode_index": pa.int64(),
    "index": pa.int64(),
    "task_index": pa.int64(),
}
files = sorted(glob.glob(os.path.join(root, "data/chunk-*/file-*.parquet")))
tables = []
for path in files:
    t = pq.read_table(path)
    for name, typ in expected_types.items():
        if t.schema.field(name).type != typ:
            fail(f"{path}: `{name}` is {t.schema.field(name).type}, want {typ}")
    for name, f in features.items():
        typ = t.schema.field(name).type
        if f["dtype"] == "float32" and f["shape"] != [1]:
            if not (pa.types.is_fixed_size_list(typ) and typ.value_type == pa.float32() and typ.list_size == f["shape"][0]):
                fail(f"{path}: `{name}` is {typ}, want fixed_size_list<float32>[{f['shape'][0]}]")
        if f["dtype"] == "image":
            want = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            if typ != want:
                fail(f"{path}: `{name}` is {typ}, want {want}")
    tables.append(t)
table = pa.concat_tables(tables) if tables else None
rows = table.num_rows if table is not None else 0
if rows != info["total_frames"]:
    fail(f"data files hold {rows} rows, info.json says total_frames {info['total_frames']}")
index = table.column("index").to_pylist() if table is not None else []
if index != list(range(rows)):
    fail("`index` is not 0..total_frames in file order")

episodes = pq.read_table(os.path.join(root, "meta/episodes/chunk-000/file-000.parquet")).to_pylist()
if len(episodes) != info["total_episodes"]:
    fail(f"{len(episodes)} episode rows, info.json says {info['total_episodes']}")
ep_col = table.column("episode_index").to_pylist() if table is not None else []
for e in episodes:
    lo, hi = e["dataset_from_index"], e["dataset_to_index"]
    if e["length"] != hi - lo or set(ep_col[lo:hi]) != {e["episode_index"]}:
        fail(f"episode {e['episode_index']}: rows {lo}..{hi} do not hold exactly that episode")
    data = info["data_path"].format(chunk_index=e["data/chunk_index"], file_index=e["data/file_index"])
    first = pq.read_table(os.path.join(root, data), columns=["index"]).column("index").to_pylist()
    if lo not in first:
        fail(f"episode {e['episode_index']}: its first row {lo} is not in {data}")
    if not e["tasks"]:
        fail(f"episode {e['episode_index']}: no tasks")
    if e["stats/action/count"] != [e["length"]]:
        fail(f"episode {e['episode_index']}: action stats count {e['stats/action/count']}")

tasks = pq.read_table(os.path.join(root, "meta/tasks.parquet"))
if tasks.num_rows != info["total_tasks"] or tasks.column("task_index").to_pylist() != list(range(tasks.num_rows)):
    fail("meta/tasks.parquet does not list task_index 0..total_tasks")
if b"pandas" not in (tasks.schema.metadata or {}):
    fail("meta/tasks.parquet has no pandas index metadata")
try:
    import pandas  # noqa: F401
except ImportError:
    fail("pandas is needed to check the tasks index LeRobot reads: `pip install pandas` (.ci/run installs it)")
df = tasks.to_pandas()
if df.index.name != "task":
    fail(f"meta/tasks.parquet: pandas index is {df.index.name}, want `task`")

stats = json.load(open(os.path.join(root, "meta/stats.json")))
for name in ["observation.state", "action"]:
    for k in ["min", "max", "mean", "std", "count"]:
        if k not in stats.get(name, {}):
            fail(f"stats.json: `{name}` has no `{k}`")
    if len(stats[name]["mean"]) != features[name]["shape"][0]:
        fail(f"stats.json: `{name}` mean has the wrong length")

print(json.dumps({"rows": rows, "seqs": table.column("seq").to_pylist() if table is not None else []}))
