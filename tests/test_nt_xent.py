"""The embedder's loss is NT-Xent: equal to a hand-written reference and to closed-form cases."""

from __future__ import annotations

import math

import pytest
import torch

from memwatch.lightning_modules.simclr import SimCLRModule


def module_loss(temperature: float):
    module = SimCLRModule(encoder="conv", channels=(8,), hidden_dim=8, embedding_dim=4, temperature=temperature)
    return module.nt_xent


def reference_nt_xent(originals: torch.Tensor, variations: torch.Tensor, temperature: float) -> float:
    """Chen et al. 2020, eq. 1, averaged over all 2K anchors: explicit loops over the 2K views."""
    views = [v / v.norm() for v in torch.cat([originals, variations]).double()]
    n, k = len(views), len(originals)
    total = 0.0
    for i in range(n):
        positive = (i + k) % n
        logits = [float(views[i] @ views[j]) / temperature for j in range(n) if j != i]
        total += -float(views[i] @ views[positive]) / temperature + math.log(sum(math.exp(x) for x in logits))
    return total / n


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8, 17])
def test_loss_equals_reference(batch_size: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(batch_size)
    originals = torch.randn(batch_size, 6, generator=generator, dtype=torch.float64)
    variations = originals + 0.5 * torch.randn(batch_size, 6, generator=generator, dtype=torch.float64)
    loss = module_loss(temperature)(originals, variations)
    # MONAI keeps the temperature as a float32 tensor (0.07 → 0.0700000003), a ~4e-9 relative error.
    assert loss.item() == pytest.approx(reference_nt_xent(originals, variations, temperature), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("batch_size", [2, 5])
def test_identical_views_give_log_of_the_view_count(batch_size: int) -> None:
    views = torch.ones(batch_size, 3, dtype=torch.float64)
    assert module_loss(0.5)(views, views).item() == pytest.approx(math.log(2 * batch_size - 1), rel=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_aligned_pairs_with_orthogonal_negatives(batch_size: int, temperature: float) -> None:
    # Each anchor: positive cos 1, the 2K-2 negatives cos 0 → log(1 + (2K-2) e^{-1/T}).
    views = torch.eye(batch_size, dtype=torch.float64)
    expected = math.log(1 + (2 * batch_size - 2) * math.exp(-1 / temperature))
    assert module_loss(temperature)(views, 3.0 * views).item() == pytest.approx(expected, rel=1e-7, abs=1e-12)


def test_aligned_pairs_with_opposite_negatives() -> None:
    # K=2, pair one along +e1, pair two along -e1: positive cos 1, both negatives cos -1.
    originals = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    expected = math.log(1 + 2 * math.exp(-2 / 0.5))
    assert module_loss(0.5)(originals, originals).item() == pytest.approx(expected, rel=1e-12)


def test_orthogonal_positives_with_identical_negatives() -> None:
    # K=2, both originals e1, both variations e2: the positive has cos 0, one negative cos 1.
    originals = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    variations = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    expected = math.log(math.exp(1 / 0.5) + 2)
    assert module_loss(0.5)(originals, variations).item() == pytest.approx(expected, rel=1e-12)
