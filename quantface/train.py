"""Training loop of the reference restorer, top to bottom.

Pairs are made on the fly: an HQ face from ``faces_hq/train`` (centre-cropped and resized to the
working size once, kept in memory), randomly flipped, degraded with ``quantface.degradation``. The
batch of step k is drawn from ``default_rng([seed, k])`` and sample j of it is degraded with
(seed, k·batch + j), so a run resumed from a checkpoint sees exactly the batches an uninterrupted
run would. Loss: L1 + λ·(1 − SSIM) against the HQ face; Adam with linear warm-up and cosine decay.

Checkpoints are safetensors only (model, Adam moments and step counts; the step and config in the
metadata), written atomically, so resuming never unpickles anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantface.checkpoint import load_checkpoint, save_checkpoint
from quantface.config import JsonConfig
from quantface.data import load_folder
from quantface.degradation import DegradationConfig, degrade
from quantface.errors import ConfigError
from quantface.metrics import ssim_map
from quantface.models.reference import ReferenceConfig, ReferenceRestorer, count_parameters
from quantface.models.store import save_weights
from quantface.pipeline import images_to_tensor


@dataclass
class TrainConfig(JsonConfig):
    data: str
    out: str
    steps: int = 3000
    batch_size: int = 8
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup: int = 100
    ssim_weight: float = 0.2
    second_stage_prob: float = 0.2
    seed: int = 0
    size: int = 128
    limit: int | None = None  # use only the first N training images
    checkpoint_every: int = 200
    resume: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be positive")
        if not 0.0 <= self.second_stage_prob <= 1.0:
            raise ConfigError("second_stage_prob must be in [0, 1]")


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_batch(hq_pool: np.ndarray, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (lq, hq) batch of ``step`` as tensors in [-1, 1]; a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    idx = rng.integers(0, len(hq_pool), cfg.batch_size)
    flips = rng.random(cfg.batch_size) < 0.5
    two = rng.random(cfg.batch_size) < cfg.second_stage_prob
    hqs, lqs = [], []
    for j, (i, flip, second) in enumerate(zip(idx, flips, two)):
        hq = hq_pool[i][:, ::-1] if flip else hq_pool[i]
        hq = np.ascontiguousarray(hq)
        lq, _ = degrade(hq, cfg.seed, step * cfg.batch_size + j, DegradationConfig(second_stage=bool(second)))
        hqs.append(hq)
        lqs.append(lq)
    return images_to_tensor(lqs), images_to_tensor(hqs)


def train(cfg: TrainConfig, model_config: ReferenceConfig | None = None) -> Path:
    """Train the reference restorer; returns the folder holding ``reference.safetensors``/``.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_config = model_config or ReferenceConfig(working_size=cfg.size)
    torch.manual_seed(cfg.seed)
    model = ReferenceRestorer(model_config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    ckpt = out / "checkpoint.safetensors"
    start = 0
    if cfg.resume and ckpt.exists():
        start = load_checkpoint(ckpt, dict(model.named_parameters()), opt)
        print(f"resumed from {ckpt} at step {start}")

    t0 = time.time()
    pool = load_folder(cfg.data, cfg.size, cfg.limit)
    if pool.skipped:
        print(pool.report())
    hq_pool = np.stack(pool.images)
    print(f"{len(hq_pool)} training faces at {cfg.size}px loaded in {time.time() - t0:.0f}s; "
          f"model {count_parameters(model) / 1e6:.2f} M parameters")

    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", dynamic_ncols=True)
    for step in bar:
        lq, hq = make_batch(hq_pool, cfg, step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        pred = model(lq)
        l1 = (pred - hq).abs().mean()
        s = ssim_map((pred.clamp(-1, 1) + 1) / 2, (hq + 1) / 2).mean()
        loss = l1 + cfg.ssim_weight * (1.0 - s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", ssim=f"{s.item():.3f}", lr=f"{_lr_at(cfg, step):.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, dict(model.named_parameters()), opt, step + 1,
                            {"train_config": cfg.to_json(), "model_config": model.config.to_json()})
    bar.close()
    model.eval()
    save_weights(model, out / "reference")
    print(f"trained {cfg.steps} steps in {time.time() - t0:.0f}s; weights in {out}")
    return out
