"""Autoencoder: shapes per configuration, training that reconstructs, adversarial warm-up, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules import PhantomDataModule
from errors import InputError
from lightning_modules import AutoencoderModule
from tests.conftest import quiet_trainer, tiny_autoencoder

SHAPE_CASES = [
    # kind, spatial_dims, channels, image size, latent size
    ("kl", 2, (16, 16), (32, 32), (16, 16)),
    ("kl", 2, (16, 16, 16), (32, 32), (8, 8)),
    ("vq", 2, (16, 16), (32, 32), (8, 8)),
    ("kl", 3, (16, 16), (16, 16, 8), (8, 8, 4)),
    ("vq", 3, (16,), (16, 16, 8), (8, 8, 4)),
]


@pytest.mark.parametrize(("kind", "dims", "channels", "size", "latent"), SHAPE_CASES)
def test_encode_decode_shapes(kind, dims, channels, size, latent):
    model = tiny_autoencoder(kind=kind, spatial_dims=dims, channels=channels, latent_channels=3).eval()
    images = torch.rand(2, 1, *size)
    with torch.no_grad():
        z = model.encode(images)
        assert z.shape == (2, 3, *latent)
        assert model.decode(z).shape == images.shape
    assert model.downsample_factor == size[0] // latent[0]


def _val_l1(model: AutoencoderModule, data: PhantomDataModule) -> float:
    images = next(iter(data.reference_dataloader("val")))["image"]
    model.eval()
    with torch.no_grad():
        reconstruction, _ = model.reconstruct(images)
    return float((reconstruction - images).abs().mean())


VQ = {"channels": (16,), "latent_channels": 3, "lr": 3e-3}  # one level: the same ×2 latent as the KL cases


@pytest.mark.parametrize(
    ("kind", "size", "steps", "overrides"),
    [("kl", (32, 32), 60, {}), ("vq", (32, 32), 60, VQ), ("kl", (16, 16, 16), 40, {}), ("vq", (16, 16, 16), 40, VQ)],
)
def test_reconstruction_error_falls(kind, size, steps, overrides):
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=size, n_patients=30, batch_size=8)
    data.setup()
    model = tiny_autoencoder(
        kind=kind, spatial_dims=len(size), adv_weight=0.01, adv_warmup_steps=steps // 2, disc_layers=2, **overrides
    )
    before = _val_l1(model, data)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(model, data)
    after = _val_l1(model, data)
    assert after < 0.5 * before, (before, after)
    assert after < 0.1
    # The discriminator is stepped too, but global_step counts batches (Lightning #17958 worked around).
    assert trainer.global_step == steps


def test_discriminator_waits_for_warmup():
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=8)
    model = tiny_autoencoder(adv_weight=0.1, adv_warmup_steps=3, disc_layers=2)
    initial = [p.detach().clone() for p in model.discriminator.parameters()]
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(model, data)
    assert all(torch.equal(a, b) for a, b in zip(initial, model.discriminator.parameters(), strict=True))
    quiet_trainer(max_steps=5, limit_val_batches=0).fit(model, data)
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.discriminator.parameters(), strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "gan"}, "kind='gan'"),
        ({"spatial_dims": 4}, "spatial_dims=4"),
        ({"channels": (16, 20), "norm_num_groups": 8}, "multiples of norm_num_groups"),
        ({"perceptual_weight": 0.1}, "perceptual_weights_path"),
        ({"perceptual_weight": 0.1, "perceptual_weights_path": "/nonexistent/resnet50.pth"}, "could not be loaded"),
    ],
)
def test_bad_arguments_fail_at_construction(overrides, message):
    with pytest.raises(InputError, match=message):
        tiny_autoencoder(**overrides)


def test_image_size_must_divide_by_downsampling():
    model = tiny_autoencoder(channels=(16, 16, 16))
    with pytest.raises(InputError, match=r"not divisible by 4.*spatial_size \[32, 32\]"):
        model.check_data(PhantomDataModule(spatial_size=(30, 30)))
    with pytest.raises(InputError, match="too small for a 3-layer patch discriminator"):
        tiny_autoencoder(adv_weight=0.01).check_data(PhantomDataModule(spatial_size=(16, 16)))
    with pytest.raises(InputError, match="data is 3D"):
        model.check_data(PhantomDataModule(spatial_size=(32, 32, 32)))
    model.check_data(PhantomDataModule(spatial_size=(32, 28)))
