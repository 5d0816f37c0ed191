"""Where metrics go besides ``metrics.jsonl``: TensorBoard event files and W&B (optional)."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from gvm_mega.runlog.records import RunLogError


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: ``time_stage1_s`` -> ``time/stage1_s``,
    ``eval_*`` -> ``eval/*``, everything else -> ``train/<key>``."""
    if key.startswith("time_"):
        return "time/" + key[5:]
    if key.startswith("eval_"):
        return "eval/" + key[5:]
    return "train/" + key


def _numeric(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars per iteration under ``RUN_DIR/tensorboard``.

    ``purge_step`` hides events at or after that step left by an interrupted run, so a
    resumed run's curves have no doubled segments.
    """

    def __init__(self, log_dir: str | Path, *, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an install requirement; say how to fix
            raise RunLogError(f"logging.tensorboard is true but TensorBoard cannot be imported "
                              f"({exc}); pip install tensorboard, or set "
                              f"logging.tensorboard=false") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["iteration"])
        for key, value in _numeric(record).items():
            self.writer.add_scalar(scalar_tag(key), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases logging, imported only when ``logging.wandb_project`` is set.

    The run id is kept in ``RUN_DIR/wandb_id`` so a resumed run continues the same W&B run.
    """

    def __init__(self, project: str, run_dir: str | Path, *, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise RunLogError("logging.wandb_project is set but wandb is not installed; "
                              "pip install wandb, or unset logging.wandb_project") from None
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, record: Mapping[str, Any]) -> None:
        values = {scalar_tag(k): v for k, v in _numeric(record).items()}
        self.run.log(values, step=int(record["iteration"]))

    def close(self) -> None:
        self.run.finish()
