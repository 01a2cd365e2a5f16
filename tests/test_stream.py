"""The streaming check: chunking changes nothing, pairs cross chunks, the kept images are the top ones, memory stays flat."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from memwatch.datamodules.phantom import render_phantom
from memwatch.lightning_modules import SimCLRModule
from memwatch.memorization.detect import nearest_correlation
from memwatch.memorization.quality import ms_ssim_diversity
from memwatch.memorization.stream import SamplesNotFinite, blocks, embed_stream, rng_preserved
from memwatch.memorization.variation import vary
from tests.helpers import ROOT

SIZE = (32, 32)


def phantom_sample(indices: range) -> torch.Tensor:
    """Sample `i` is a seeded variation of phantom `i % 5`: a function of `i` only, like the LDM's."""
    images = [
        vary(torch.from_numpy(render_phantom(f"phantom-{i % 5:04d}", SIZE))[None], seed=i)[0] for i in indices
    ]
    return torch.stack(images) if images else torch.empty(0, 1, *SIZE)


@pytest.fixture(scope="module")
def embedder(embedder_ckpt) -> SimCLRModule:
    return SimCLRModule.from_checkpoint(embedder_ckpt, "embedder_ckpt")


def stream(embedder, n: int, chunk_size: int, **options):
    return embed_stream(blocks(phantom_sample, range(n), chunk_size), embedder.embed, **options)


def test_results_do_not_depend_on_the_chunk_size(embedder):
    reference = embedder.embed(phantom_sample(range(0, 4)))
    rank_by = lambda embeddings: nearest_correlation(embeddings, reference)  # noqa: E731
    small, large = (stream(embedder, 23, size, score_pairs=True, keep=4, rank_by=rank_by) for size in (3, 16))
    torch.testing.assert_close(small.embeddings, large.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.pair_scores, large.pair_scores, atol=1e-6, rtol=0)
    assert small.kept.keys() == large.kept.keys()
    for index, image in small.kept.items():
        assert torch.equal(image, large.kept[index])


def test_pairs_span_chunks_and_match_scoring_all_at_once(embedder):
    images = phantom_sample(range(11))
    result = stream(embedder, 11, 3, score_pairs=True)  # chunks of 3: pairs (2, 3), (8, 9) cross chunks
    assert result.pair_scores.shape == (5,)  # the 11th image has no partner
    torch.testing.assert_close(result.pair_scores, ms_ssim_diversity(images[0:10:2], images[1:10:2]))


def test_it_keeps_the_images_ranked_highest_with_their_stream_index(embedder):
    score = lambda embeddings: embeddings[:, 0]  # noqa: E731 - any per-image score
    result = stream(embedder, 13, 4, keep=3, rank_by=score, first_index=20)
    everything = embedder.embed(phantom_sample(range(13)))[:, 0]
    top = (torch.argsort(everything, descending=True)[:3] + 20).tolist()
    assert sorted(result.kept) == sorted(top)
    for index in top:
        assert torch.equal(result.kept[index], phantom_sample(range(index - 20, index - 19))[0])


def test_nan_samples_are_a_training_failure_naming_the_sample(embedder):
    def diverged(indices: range) -> torch.Tensor:
        images = phantom_sample(indices)
        images[indices.index(6) if 6 in indices else slice(0, 0)] = float("nan")
        return images

    with pytest.raises(SamplesNotFinite, match=r"^check 2: 1 sample\(s\) have NaN or infinite pixels \(first: sample 6\)"):
        embed_stream(blocks(diverged, range(8), 4), embedder.embed, require_finite="check 2")


def test_bad_arguments_are_refused(embedder):
    with pytest.raises(ValueError, match="must be even"):
        stream(embedder, 4, 2, score_pairs=True, first_index=3)
    with pytest.raises(ValueError, match="needs rank_by"):
        stream(embedder, 4, 2, keep=2)
    with pytest.raises(ValueError, match="block_size=0"):
        list(blocks(phantom_sample, range(3), 0))
    with pytest.raises(ValueError, match="not at a multiple of block_size=4"):
        list(blocks(phantom_sample, range(2, 9), 4))


def test_random_states_are_restored():
    # NumPy's legacy global state is what MONAI's transforms and user code draw from.
    legacy = np.random
    torch.manual_seed(3)
    legacy.seed(3)
    expected = torch.rand(2), legacy.rand(2)
    torch.manual_seed(3)
    legacy.seed(3)
    with rng_preserved():
        torch.manual_seed(99)  # what a DataLoader (MONAI's reseeds) or a sampler might do
        torch.rand(5)
        legacy.rand(5)
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(legacy.rand(2), expected[1])


def test_peak_memory_does_not_grow_with_the_number_of_samples():
    # bench/check_memory.py measures RSS in fresh processes; holding every image at once is its control.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "check_memory.py"), "--n-samples", "32", "544", "--size", "96",
         "--embedder", "small", "--jobs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    image_mib = 96 * 96 * 4 / 2**20
    streamed = {run["n_samples"]: run["check_mib"] for run in figures["streamed"]}
    held = {run["n_samples"]: run["check_mib"] for run in figures["held"]}
    # Holding 512 more images costs about 512 × 36 KiB = 18 MiB: the measurement can see it...
    assert held[544] - held[32] > 0.6 * 512 * image_mib, figures
    # ...and the streaming check does not pay it.
    assert streamed[544] - streamed[32] < 0.2 * 512 * image_mib, figures
