"""Step metrics to a JSONL file in the run directory, the console, and wandb (offline by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

CONSOLE_KEYS = (
    "reward/reward",
    "reward/format",
    "embedding/in_batch_hit@1",
    "actor/kl_to_ref",
    "timing_s/step",
)


class MetricLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.path.write_text("")
        self.backends = list(cfg.trainer.logger)
        self.wandb = None
        if "wandb" in self.backends:
            import wandb

            self.wandb = wandb.init(
                project=cfg.trainer.project_name,
                name=cfg.trainer.experiment_name,
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", cfg.trainer.wandb_mode),
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if "console" in self.backends:
            shown = " ".join(f"{k.split('/')[-1]}={metrics[k]:.3f}" for k in CONSOLE_KEYS if k in metrics)
            tqdm.write(f"step {step}: {shown}")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
