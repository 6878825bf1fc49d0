"""Run logs on rank 0: one JSON object per line (metrics.jsonl) and, optionally, TensorBoard scalars."""
from __future__ import annotations

import json
import os
import time


class RunLog:
    def __init__(self, log_dir: str, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
