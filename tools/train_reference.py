"""Train the embedded reference restorer on faces_hq/train (see quantface/train.py for the loop).

    python tools/train_reference.py --data ../shared/data/faces_hq/train --out runs/reference

Resumes from <out>/checkpoint.safetensors when present. Copy <out>/reference.{safetensors,json}
to quantface/models/weights/ to make them the embedded default.
"""

from __future__ import annotations

import argparse

from quantface.errors import exit_status
from quantface.train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/faces_hq/train", help="folder of HQ training faces")
    p.add_argument("--out", default="runs/reference", help="output folder (checkpoint and weights)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--size", type=int, default=TrainConfig.size, help="working size in pixels")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    cfg = TrainConfig(data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      size=a.size, limit=a.limit, checkpoint_every=a.checkpoint_every, resume=not a.no_resume,
                      threads=a.threads)
    return exit_status(lambda: train(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
