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
    """`resumed_step`: the step a resumed run's checkpoint holds (see `keep_metrics`); wandb continues
    the run `run_id`."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, resumed_step: int = 0, run_id: str | None = None
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        keep_metrics(self.path, resumed_step)
        self.backends = list(cfg.trainer.logger)
        self.wandb = None
        self.run_id = run_id
        if "wandb" in self.backends:
            import wandb

            if run_id:  # a wandb service inherited from a parent may still hold the killed run's stream
                os.environ.pop("WANDB_SERVICE", None)
            self.wandb = wandb.init(
                project=cfg.trainer.project_name,
                name=cfg.trainer.experiment_name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", cfg.trainer.wandb_mode),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
            self.run_id = self.wandb.id

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


def keep_metrics(path: Path, last_step: int) -> None:
    """Cut a metrics.jsonl back to the rows of steps up to `last_step` (0: empty it). A resumed run
    makes the later steps again, so they are neither lost nor doubled."""
    kept = [row for row in read_metrics(path) if row["step"] <= last_step] if last_step else []
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
