"""Shared fixtures: tiny seeded models and small image folders made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantface.data import write_image
from quantface.models.reference import ReferenceConfig, ReferenceRestorer
from quantface.models.store import save_weights

TINY = ReferenceConfig(vae_channels=(8, 16), latent_channels=4, unet_channels=(16, 16), unet_attention=(False, True),
                       attention_head_dim=8, context_dim=16, prompt_channels=(8, 8, 8, 16), groups=4, working_size=32)


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random smooth RGB image (low-frequency noise upsampled), HWC uint8."""
    import cv2

    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def write_two_tiny_weights(root: Path) -> tuple[Path, Path]:
    """Two tiny weight stems under ``root/weights``: ``tiny`` (seed 0, the ``tiny_model``'s) and
    ``other`` (seed 1), for checks that a graph or recipe belongs to the weights it is run with."""
    stems = root / "weights" / "tiny", root / "weights" / "other"
    for seed, stem in enumerate(stems):
        torch.manual_seed(seed)
        save_weights(ReferenceRestorer(TINY).eval(), stem)
    return stems


def write_tiny_assets(root: Path, size: int, faces: int = 4) -> tuple[Path, Path]:
    """Under ``root``: the tiny model (seed 0) saved as ``weights/tiny`` and ``faces`` smooth random
    ``size``² images in ``faces/``; returns (weights stem, faces folder)."""
    torch.manual_seed(0)
    stem = root / "weights" / "tiny"
    save_weights(ReferenceRestorer(TINY).eval(), stem)
    rng = np.random.default_rng(0)
    for i in range(faces):
        write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, size))
    return stem, root / "faces"


@pytest.fixture
def tiny_model() -> ReferenceRestorer:
    torch.manual_seed(0)
    return ReferenceRestorer(TINY).eval()


@pytest.fixture
def tiny_weights(tmp_path: Path, tiny_model: ReferenceRestorer) -> Path:
    """Stem of a tiny model's weights saved as safetensors + JSON."""
    stem = tmp_path / "weights" / "tiny"
    stem.parent.mkdir()
    save_weights(tiny_model, stem)
    return stem


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five 48×40 images (non-square, so centre-cropping is exercised)."""
    folder = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for i in range(5):
        img = smooth_image(rng, 48)[:, :40]
        write_image(folder / f"{i:03d}.png", img)
    return folder
