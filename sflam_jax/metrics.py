"""Metric writers: an append-only JSONL file always, TensorBoard when asked.

``metrics.jsonl`` holds one JSON object per round and only values that the config and seed fix, so
two runs of the same config write the same file. Wall-clock timings go to ``timing.jsonl``.
"""

from __future__ import annotations

import json
import os

import numpy as np


def to_python(value):
    """Arrays and numpy scalars -> plain JSON values (lists for arrays)."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    array = np.asarray(value)
    if array.ndim:
        return array.tolist()
    return array.item()


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path``: readers see the old or the new file, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """The complete records of a JSONL file (a torn last line is dropped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


class JsonlWriter:
    """Append-only JSONL of per-round records, cut back to ``keep_through`` rounds on open.

    A resumed run restarts after its last checkpoint; records of later rounds (written before the
    run stopped) are dropped so that every round appears exactly once.
    """

    def __init__(self, path: str, keep_through: int):
        self.path = path
        kept = [r for r in read_jsonl(path) if r["round"] <= keep_through]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(to_python(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """metrics.jsonl, timing.jsonl and optionally TensorBoard scalars under ``workdir``."""

    def __init__(self, workdir: str, resume_round: int, tensorboard: bool = False):
        self.metrics = JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_round)
        self.timing = JsonlWriter(os.path.join(workdir, "timing.jsonl"), resume_round)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "metrics.tensorboard=True needs the tensorboardX package: "
                    "pip install 'sflam_jax[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=resume_round + 1
            )

    def write(self, record: dict, timing: dict) -> None:
        record = to_python(record)
        self.metrics.write(record)
        self.timing.write({"round": record["round"], **to_python(timing)})
        if self._tb is not None:
            for name, value in record.items():
                if isinstance(value, int | float) and name != "round":
                    self._tb.add_scalar(name, value, record["round"])
            self._tb.flush()

    def close(self) -> None:
        self.metrics.close()
        self.timing.close()
        if self._tb is not None:
            self._tb.close()
