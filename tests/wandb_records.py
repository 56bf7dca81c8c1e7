"""Reads W&B offline runs back (W/wandb/offline-run-*/run-ID.wandb) for the tests."""
import glob
import json
import os
import struct


def records(path: str):
    """The protobuf records of a .wandb file, read by wandb's own reader where the installed wandb
    has one (`wandb.sdk.internal.datastore`, wandb <= 0.19), else by `_log_records`: wandb 0.2x /
    0.31 (installed here) read their run files only in the Go core (wandb-core) and ship no Python
    reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        from wandb.sdk.internal import datastore
    except ImportError:
        yield from _log_records(path, pb)
        return
    store = datastore.DataStore()
    store.open_for_scan(path)
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def _log_records(path: str, pb):
    """LevelDB's log format (32 KiB blocks of chunks with a 7-byte header: crc32, length, type
    FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) after a 7-byte ':W&B' header."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_run(run_dir: str) -> dict:
    """One offline run directory -> {id, group, job_type, name, config, history, summary, files,
    artifacts}; an artifact is {type, name, aliases, metadata, files: {path: local staged copy}}."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run = {"history": [], "summary": {}, "files": [], "artifacts": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, group=r.run_group, job_type=r.job_type, name=r.display_name,
                       config={u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            for u in record.summary.update:
                run["summary"]["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append(dict(type=a.type, name=a.name, aliases=sorted(a.aliases),
                                         metadata=json.loads(a.metadata or "{}"),
                                         files={c.path: c.local_path for c in a.manifest.contents}))
    return run


def artifact_folder(artifact: dict, root: str) -> str:
    """An offline artifact's files laid out under `root` as `wandb artifact get` downloads them
    (offline, wandb keeps a staged copy of each file until `wandb sync`)."""
    import shutil

    for name, staged in artifact["files"].items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        shutil.copyfile(staged, os.path.join(root, name))
    return root


def read_runs(workdir: str) -> list[dict]:
    """Every offline run under W/wandb, oldest first."""
    return [read_run(d) for d in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))]
