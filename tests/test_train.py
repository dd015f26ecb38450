import numpy as np
import torch
from safetensors.torch import load_file

from quantface.train import TrainConfig, make_batch, train
from tests.conftest import TINY


def test_batches_are_a_function_of_seed_and_step():
    pool = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    cfg = TrainConfig(data="-", out="-", batch_size=3, size=32)
    a, b = make_batch(pool, cfg, 5), make_batch(pool, cfg, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(make_batch(pool, cfg, 6)[0], a[0])
    assert a[0].shape == (3, 3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1


def test_resumed_training_equals_uninterrupted(image_folder, tmp_path):
    """2 steps + resume for 2 more gives bit-identical weights to 4 steps in one go."""
    def run(out, steps, resume=True):
        cfg = TrainConfig(data=str(image_folder), out=str(out), steps=steps, batch_size=2, size=32, warmup=1,
                          checkpoint_every=2, resume=resume, threads=1)
        train(cfg, TINY)
        return load_file(str(out / "reference.safetensors"))

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "b" / "reference.json").is_file()
