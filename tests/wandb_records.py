"""Reads an offline W&B run from its files, as the tests check what reached W&B.

`run-<id>.wandb` is a leveldb-log framed stream: a 7-byte file header, 32 KiB blocks, records with a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a
`wandb.proto.wandb_internal_pb2.Record`. wandb 0.31 has no reader of its own for these files.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        else:
            pending += payload


def read_run(run_dir: Path) -> dict:
    """An offline-run-* directory: id, name, group, job_type, tags, config (decoded), history (a list of
    {key: value} per logged step), table keys logged, exit code (None while unfinished)."""
    [path] = Path(run_dir).glob("run-*.wandb")
    out = {"config": {}, "history": [], "exit_code": None, "summary": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, name=run.display_name, group=run.run_group, job_type=run.job_type,
                       tags=list(run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
