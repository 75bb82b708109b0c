"""metrics.jsonl (through the one JSONL appender) and TensorBoard when it is installed."""

from __future__ import annotations

import contextlib
from pathlib import Path

from jtok.io import append_jsonl
from jtok.run.files import METRICS_FILE, TENSORBOARD_DIR


class MetricsLog:
    """Appends one line per record; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # Not fsync'd per line: a crash loses at most the lines past the last checkpoint,
        # which a resume drops anyway (jtok.run.rundir.truncate_metrics).
        append_jsonl(self.path, record, durable=False)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
