"""Read an offline W&B run back from its ``.wandb`` transaction log, with wandb's own protobuf records.

No network and no W&B API: an offline run (``WANDB_MODE=offline``) keeps everything in
``<dir>/wandb/offline-run-*/run-<id>.wandb``. That file is a LevelDB-style log: a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is
padding. Each reassembled record is a ``wandb_internal_pb2.Record``.

Tables are logged as ``table-file`` references into a ``run_table`` artifact whose manifest names the
staged JSON file (``local_path``); image cells point to PNGs in the same manifest. The copy under
``files/media/table/`` shows image cells only as ``"Image"``, so read tables through :meth:`OfflineRun.table`.

The log's last record is written shortly after ``run.finish()``; call ``wandb.teardown()`` first, or
:meth:`OfflineRun.find` with ``wait=`` seconds to poll for the exit record.

Example::

    wandb.finish(); wandb.teardown()
    run = OfflineRun.find(tmp_path)
    run.summary["influence/solver"]; run.config["influence/damping"]; run.history[-1]["trainer/global_step"]
    table = run.table("influence/top_examples")        # Table(columns, rows), images as ImageCell
    run.artifact_of_type("influence-scores").files     # {"results.pt": local staged path}
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

__all__ = ["OfflineRun", "Table", "ImageCell", "ArtifactInfo", "read_records"]

_BLOCK = 32768
_HEADER = 7


def read_records(path: str) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:  # zero fill: end of what was written so far
            pos += left - _HEADER
            continue
        if pos + length > len(data):  # a record still being written (the run is live): the end for now
            break
        parts.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _key(item: Any) -> Sequence[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _put(target: Dict[str, Any], keys: Sequence[str], value: Any) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


@dataclass
class ImageCell:
    """An image cell of a table: the PNG bytes W&B stored, and its size."""

    png: bytes
    width: int
    height: int
    caption: Optional[str] = None


@dataclass
class Table:
    columns: List[str]
    rows: List[List[Any]]

    def column(self, name: str) -> List[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def records(self) -> List[Dict[str, Any]]:
        return [dict(zip(self.columns, r)) for r in self.rows]


@dataclass
class ArtifactInfo:
    """An artifact as logged: ``files`` maps each path in the artifact to the local file wandb staged."""

    name: str
    type: str
    aliases: List[str]
    files: Dict[str, str]
    metadata: Dict[str, Any]
    client_id: str = ""
    sequence_client_id: str = ""


@dataclass
class OfflineRun:
    """What an offline run recorded: ``history`` rows, ``summary``, ``config`` (plain values),
    ``artifacts`` and whether the run ``finished`` (exit record seen)."""

    path: str
    history: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    artifacts: List[ArtifactInfo] = field(default_factory=list)
    finished: bool = False

    @classmethod
    def read(cls, path: str) -> "OfflineRun":
        run = cls(path=path)
        for r in read_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row: Dict[str, Any] = {}
                for item in r.history.item:
                    _put(row, _key(item), json.loads(item.value_json))
                run.history.append(row)
            elif kind == "summary":
                for item in r.summary.update:
                    _put(run.summary, _key(item), json.loads(item.value_json))
                for item in r.summary.remove:
                    run.summary.pop(_key(item)[0], None)
            elif kind == "config":
                for item in r.config.update:
                    _put(run.config, _key(item), json.loads(item.value_json))
            elif kind == "artifact":
                a = r.artifact
                run.artifacts.append(
                    ArtifactInfo(
                        name=a.name,
                        type=a.type,
                        aliases=list(a.aliases),
                        files={e.path: e.local_path for e in a.manifest.contents},
                        metadata=json.loads(a.metadata) if a.metadata else {},
                        client_id=a.client_id,
                        sequence_client_id=a.sequence_client_id,
                    )
                )
            elif kind == "exit":
                run.finished = True
        return run

    @classmethod
    def find(cls, wandb_dir: Any, wait: float = 0.0) -> "OfflineRun":
        """The single offline run under ``wandb_dir`` (searched recursively), polling up to ``wait``
        seconds for its exit record."""
        paths = glob.glob(os.path.join(os.fspath(wandb_dir), "**", "offline-run-*", "run-*.wandb"), recursive=True)
        if len(paths) != 1:
            raise FileNotFoundError(f"expected one offline run under {wandb_dir}, found {paths}")
        from google.protobuf.message import DecodeError

        deadline = time.monotonic() + wait
        while True:
            try:
                run = cls.read(paths[0])
            except DecodeError:  # read while W&B's writer was mid-record (seen on a loaded machine): read again
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
                continue
            if run.finished or time.monotonic() >= deadline:
                return run
            time.sleep(0.1)

    @property
    def run_dir(self) -> str:
        return os.path.dirname(self.path)

    @property
    def run_id(self) -> str:
        """The run's id (``run-<id>.wandb``)."""
        return os.path.basename(self.path)[len("run-") : -len(".wandb")]

    def artifact_of_type(self, type_: str) -> ArtifactInfo:
        found = [a for a in self.artifacts if a.type == type_]
        if len(found) != 1:
            raise KeyError(f"expected one artifact of type {type_!r}, found {[a.name for a in found]}")
        return found[0]

    def row_with(self, key: str) -> Dict[str, Any]:
        """The (single) history row that holds ``key``."""
        rows = [r for r in self.history if key in r]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} history rows hold {key!r}")
        return rows[0]

    def rows_with(self, key: str) -> List[Dict[str, Any]]:
        """Every history row that holds ``key``, in order."""
        return [r for r in self.history if key in r]

    def table(self, key: str, occurrence: Optional[int] = None) -> Table:
        """The table logged under ``key`` (in the single row that holds it, or in row ``occurrence`` of
        :meth:`rows_with` when it was logged several times), read from its ``run_table`` artifact; image
        cells become :class:`ImageCell`."""
        ref = (self.row_with(key) if occurrence is None else self.rows_with(key)[occurrence])[key]
        if ref.get("_type") != "table-file":
            raise KeyError(f"{key!r} is a {ref.get('_type')}, not a table")
        client_id, _, entry = ref["artifact_path"].removeprefix("wandb-client-artifact://").partition("/")
        artifact = next(a for a in self.artifacts if client_id in (a.client_id, a.sequence_client_id))
        with open(artifact.files[entry], encoding="utf-8") as fh:
            data = json.load(fh)

        def cell(v: Any) -> Any:
            if isinstance(v, dict) and v.get("_type") == "image-file":
                with open(artifact.files[v["path"]], "rb") as fh:
                    return ImageCell(fh.read(), int(v["width"]), int(v["height"]), v.get("caption"))
            return v

        return Table(list(data["columns"]), [[cell(v) for v in row] for row in data["data"]])

    def media_file(self, key: str) -> str:
        """The local file of a media value (``html-file``, …) logged under ``key``."""
        return os.path.join(self.run_dir, "files", self.row_with(key)[key]["path"])


def wandb_offline_env(root: Any) -> Dict[str, str]:
    """The environment for an offline W&B run that writes only under ``root``."""
    root = os.fspath(root)
    env = {k: os.path.join(root, k.lower()) for k in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    for d in env.values():
        os.makedirs(d, exist_ok=True)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_X_DISABLE_STATS="true", WANDB_CONSOLE="off")
    return env

