"""``gvm-mega train``: the GVM-RAFT / GRPO iteration loop (:class:`Trainer`)."""
from gvm_mega.trainer.loop import Trainer
from gvm_mega.trainer.setup import SetupError

__all__ = ["SetupError", "Trainer", "train"]


def train(cfg, run_dir=None):
    """Run (or resume) training for ``cfg``; returns the run directory."""
    return Trainer(cfg, run_dir).train()
