"""Where training numbers go: `WORKDIR/metrics.jsonl` (one JSON object per logged step, at least
`step` and `loss`) and TensorBoard scalars. Only process 0 writes; other hosts get a no-op.

Every file goes through `fileio` / tf.io.gfile, so WORKDIR may be a local path or a URL
(gs://, ram://). A resumed run restarts at its checkpoint's step, so lines written after that
step by the interrupted run are dropped (the file is rewritten atomically) before new ones come.
"""
from __future__ import annotations

import json
import math
import os

import jax

from stablerep_jax import fileio

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def _parse_lines(text: str, path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(text.splitlines()):   # a line cut short by a kill: drop it
                break
            raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
    return rows


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


class MetricWriter:
    """Writes JSON lines and TensorBoard scalars.

    `keep_through_step`: the step a run starts from (0 for a fresh run, the restored step on
    resume); rows of an existing metrics.jsonl past it are dropped. Local files are appended to
    (and flushed) line by line; URLs, which gfile cannot append to, are rewritten atomically.
    """

    def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True,
                 keep_through_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = metrics_path(workdir)
        self._rows: list[dict] = []
        self._append = None
        self._tb = None
        self._tf = None
        if not self.enabled:
            return
        fileio.makedirs(workdir)
        text = fileio.read_bytes(self.path).decode("utf-8") if fileio.exists(self.path) else None
        rows = _parse_lines(text, self.path) if text else []
        if keep_through_step is not None:
            rows = [r for r in rows if int(r.get("step", 0)) <= keep_through_step]
        if text != _dump(rows):      # rows dropped, a line cut short by a kill, or no file yet
            fileio.write_text_atomic(self.path, _dump(rows))
        self._rows = rows
        if not fileio.is_url(self.path):
            self._append = open(self.path, "a", encoding="utf-8")
            self._rows = []          # the file holds them; only URLs keep rows to rewrite
        if tensorboard:
            import tensorflow as tf  # TensorFlow is already a dependency (tf.data)
            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in scalars.items()}
        row = {"step": int(step), **clean}
        if self._append is not None:
            self._append.write(json.dumps(row) + "\n")
            self._append.flush()
        else:
            self._rows.append(row)
            fileio.write_text_atomic(self.path, _dump(self._rows))
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for key, value in clean.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self._tf.summary.scalar(key, value)
            self._tb.flush()

    def close(self) -> None:
        if self._append is not None:
            self._append.close()
            self._append = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_python(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_metrics(workdir: str) -> list[dict]:
    """Reads `metrics.jsonl` back (for tests, reports and the demo), local or URL."""
    path = metrics_path(workdir)
    return _parse_lines(fileio.read_bytes(path).decode("utf-8"), path)
