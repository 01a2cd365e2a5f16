"""The paper's variation v: reproducible per image, same shape and dtype, still an image in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from memwatch.datamodules.phantom import render_phantom
from memwatch.errors import InputError
from memwatch.memorization.variation import variation_transform, vary


def phantoms(n: int, spatial_size: tuple[int, ...] = (32, 32)) -> torch.Tensor:
    return torch.stack([torch.from_numpy(render_phantom(f"patient-{i}", spatial_size)) for i in range(n)])


def test_variation_is_reproducible_and_independent_of_batch_size() -> None:
    images = phantoms(6)
    varied = vary(images, seed=3)
    assert torch.equal(varied, vary(images, seed=3))
    assert torch.equal(varied[:2], vary(images[:2], seed=3))
    assert not torch.equal(varied, vary(images, seed=4))


def test_variation_changes_images_but_keeps_shape_dtype_and_range() -> None:
    images = phantoms(8).double()
    varied = vary(images, seed=0)
    assert varied.shape == images.shape and varied.dtype == torch.float64
    assert varied.min() >= 0.0 and varied.max() <= 1.0
    changed = (varied - images).abs().flatten(1).amax(dim=1) > 0.01
    assert changed.all()


def test_variation_without_seed_follows_torch_seed() -> None:
    images = phantoms(3)
    torch.manual_seed(7)
    first = vary(images)
    torch.manual_seed(7)
    assert torch.equal(first, vary(images))


def test_variation_of_volumes() -> None:
    volumes = phantoms(2, (16, 16, 8))
    assert vary(volumes, seed=1).shape == (2, 1, 16, 16, 8)


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 1, 4, 4, 4, 4)])
def test_variation_refuses_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="images of shape"):
        vary(torch.rand(shape))


def test_variation_transform_refuses_1d() -> None:
    with pytest.raises(InputError, match="spatial_dims=1"):
        variation_transform(1)
