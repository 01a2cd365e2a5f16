"""`flip_invariant` embeds the mirror images one at a time: the concatenated orbit's result, one image's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from memwatch.lightning_modules.simclr import SimCLRModule
from memwatch.memorization.embedders import mirror_images, mirror_orbit
from tests.helpers import ROOT

TINY = {
    "resnet": {"resnet_block": "basic", "resnet_layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)},
    "conv": {"channels": (8, 16), "hidden_dim": 16},
}


def tiny_embedder(spatial_dims: int, encoder: str, **overrides) -> SimCLRModule:
    """A tiny flip-invariant embedder whose BatchNorms (if any) hold random running statistics."""
    torch.manual_seed(0)
    module = SimCLRModule(
        spatial_dims=spatial_dims,
        encoder=encoder,
        embedding_dim=8,
        standardize_embedding=True,
        flip_invariant=True,
        **TINY[encoder],
        **overrides,
    )
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return module


def concatenated(module: SimCLRModule, images: torch.Tensor) -> torch.Tensor:
    """The orbit embedded as one batch, as `Representation` did before (8× the memory in 3D)."""
    orbit = mirror_orbit(images)
    return module.standardize(module.encoder(torch.cat(orbit)).unflatten(0, (len(orbit), -1)).mean(dim=0))


def test_mirror_images_are_the_orbit_one_at_a_time() -> None:
    images = torch.rand(2, 1, 3, 4, 5)
    views = mirror_images(images)
    assert next(views) is images  # the unflipped images, not a copy
    rest = list(views)
    assert len(rest) == 7 and all(
        torch.equal(a, b) for a, b in zip(rest, mirror_orbit(images)[1:], strict=True)
    )
    assert torch.equal(rest[-1], images.flip([2, 3, 4]))


@pytest.mark.parametrize("encoder", ["resnet", "conv"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_mirror_image_at_a_time_embeds_like_the_concatenated_orbit(
    spatial_dims: int, encoder: str
) -> None:
    module = tiny_embedder(spatial_dims, encoder).eval()
    images = torch.rand((3, 1) + (16,) * spatial_dims)
    with torch.no_grad():
        reference = concatenated(module, images)
        embeddings = module.represent(images)
        plain = module.standardize(module.encoder(images))
    torch.testing.assert_close(embeddings, reference, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the orbit matters: not the image alone


@pytest.mark.parametrize(("spatial_dims", "encoder"), [(2, "resnet"), (3, "conv")])
def test_a_traced_flip_invariant_embedder_embeds_like_the_module(spatial_dims: int, encoder: str) -> None:
    module = tiny_embedder(spatial_dims, encoder).eval()
    size = (16, 16, 8)[:spatial_dims]
    with torch.no_grad():
        # What export_torchscript traces, without its check (~10 s for the 8 unrolled conv encoders).
        traced = torch.jit.trace(module.representation(), torch.rand(2, 1, *size), check_trace=False)
        images = torch.rand(3, 1, *size)  # not the trace's batch size
        torch.testing.assert_close(traced(images), concatenated(module, images), atol=1e-6, rtol=0)


def test_training_keeps_the_concatenated_orbit_s_batch_statistics_and_gradients() -> None:
    # The ResNet's BatchNorm normalises by its batch in training: the whole orbit must stay one batch.
    images = torch.rand(4, 1, 16, 16)
    module, reference = tiny_embedder(2, "resnet").train(), tiny_embedder(2, "resnet").train()
    embeddings, expected = module.represent(images), concatenated(reference, images)
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], buffer, atol=1e-6, rtol=0, msg=name)
    embeddings.square().sum().backward()
    expected.square().sum().backward()
    for (name, parameter), other in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, other.grad, atol=1e-5, rtol=1e-4, msg=name)


# Run in a fresh interpreter, which forks one child per variant (one after another): each child
# resets its peak resident set (`/proc/self/clear_refs`), embeds, and reports its peak growth in MB.
# glibc gives blocks of 64 KiB and more their own mmap, returned on free, so the peak is that of
# the live tensors, not of the allocator's arenas.
PEAK_MEMORY = """
import json, os, sys
import torch
torch.set_num_threads(1)
from memwatch.lightning_modules.simclr import SimCLRModule
from memwatch.memorization.embedders import mirror_orbit

def megabytes(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(key + ":"))

def embed(variant):
    with torch.no_grad():
        if variant == "concatenated":  # as Representation did before
            orbit = mirror_orbit(images)
            return module.encoder(torch.cat(orbit)).unflatten(0, (len(orbit), -1)).mean(dim=0)
        module.hparams.flip_invariant = variant == "flip_invariant"
        return module.represent(images)

torch.manual_seed(0)
module = SimCLRModule(spatial_dims=3, encoder="conv", channels=(8, 16), hidden_dim=16, embedding_dim=8).eval()
images = torch.rand(4, 1, 64, 64, 64)  # activations of about 150 MB, the input 4 MB
embed("plain")  # warm up on the full size, before any child forks
peaks = {}
for variant in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
        before = megabytes("VmRSS")
        embed(variant)
        os.write(write, json.dumps(megabytes("VmHWM") - before).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        peaks[variant] = json.loads(answer.read())
    os.wait()
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_flip_invariant_peak_memory_is_that_of_one_image_not_the_orbit() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, "plain", "flip_invariant", "concatenated"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.splitlines()[-1])
    assert peaks["plain"] > 100, peaks  # activations dominate
    assert peaks["flip_invariant"] <= 1.3 * peaks["plain"], peaks
    assert peaks["concatenated"] >= 3 * peaks["plain"], peaks  # the measure tells the orbit from one image
