"""`metrics.jsonl`: one JSON object per logged step, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path

from nlc.fsutil import write_atomic

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        """A fresh log, or (resume_step given) the existing one cut back to the rows up to that step:
        rows a crashed run logged after its last checkpoint are replaced by the resumed run's."""
        self.path = Path(out_dir) / METRICS
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [row for row in rows if row["step"] <= resume_step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
