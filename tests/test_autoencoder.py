"""Autoencoder: shapes per configuration, training that reconstructs, adversarial warm-up, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from monai.networks.blocks import SABlock

from memwatch.datamodules import PhantomDataModule
from memwatch.errors import InputError
from memwatch.lightning_modules import AutoencoderModule
from tests.helpers import quiet_trainer, tiny_autoencoder

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
    [
        ("kl", (32, 32), 60, {}),
        ("vq", (32, 32), 60, VQ),
        ("kl", (16, 16, 16), 40, {}),
        ("vq", (16, 16, 16), 40, VQ),
    ],
)
def test_reconstruction_error_falls(kind, size, steps, overrides):
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=size, n_patients=30, batch_size=8)
    data.setup()
    model = tiny_autoencoder(
        kind=kind,
        spatial_dims=len(size),
        adv_weight=0.01,
        adv_warmup_steps=steps // 2,
        disc_layers=2,
        **overrides,
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
        (
            {"perceptual_weight": 0.1, "perceptual_weights_path": "/nonexistent/resnet50.pth"},
            "could not be loaded",
        ),
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


def _flash_flags(model: AutoencoderModule) -> set[bool]:
    """`use_flash_attention` of the model's attention blocks (one in the encoder, one in the decoder here)."""
    flags = [block.use_flash_attention for block in model.modules() if isinstance(block, SABlock)]
    assert len(flags) == 2
    return set(flags)


def _mean_reconstruction(model: AutoencoderModule, images: torch.Tensor) -> torch.Tensor:
    """Decoded posterior mean: deterministic, unlike `reconstruct`, which samples."""
    with torch.no_grad():
        return model.autoencoder.decode(model.autoencoder.encode(images)[0])


def test_flash_attention_defaults_to_cuda_availability_and_a_checkpoint_with_it_reloads_on_cpu(tmp_path):
    attention = {"channels": (16, 16), "attention_levels": (False, True)}
    assert _flash_flags(tiny_autoencoder(**attention)) == {torch.cuda.is_available()}
    assert _flash_flags(tiny_autoencoder(**attention, use_flash_attention=False)) == {False}

    # A checkpoint written with flash attention (as on a GPU) is rebuilt from its hparams on a CPU,
    # and computes what the same weights compute with MONAI's explicit attention.
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=6, batch_size=3)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(tiny_autoencoder(**attention, use_flash_attention=True), data)
    trainer.save_checkpoint(tmp_path / "ae.ckpt")
    reloaded = AutoencoderModule.from_checkpoint(tmp_path / "ae.ckpt", "autoencoder_ckpt").eval()
    assert reloaded.hparams.use_flash_attention is True and _flash_flags(reloaded) == {True}
    plain = tiny_autoencoder(**attention, use_flash_attention=False).eval()
    plain.load_state_dict(reloaded.state_dict())  # the flag changes no parameter name
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(
        _mean_reconstruction(reloaded, images), _mean_reconstruction(plain, images), rtol=1e-4, atol=1e-5
    )


def test_generator_and_discriminator_passes_leave_each_others_gradients_alone():
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=8)
    model = tiny_autoencoder(adv_weight=0.1, adv_warmup_steps=1, disc_layers=2)
    seen: list[tuple[str, list, list]] = []

    def grads(module: torch.nn.Module) -> list:
        return [None if p.grad is None else p.grad.clone() for p in module.parameters()]

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for name, optimizer in zip("gd", trainer.optimizers, strict=True):
                optimizer.register_step_pre_hook(
                    lambda *_, name=name: seen.append(
                        (name, grads(pl_module.autoencoder), grads(pl_module.discriminator))
                    )
                )

    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[Watch()]).fit(model, data)
    assert [name for name, _, _ in seen] == ["g", "g", "d", "g", "d"]
    # Each pass leaves the other network's gradients as the other network's last step left them.
    last = {"ae": None, "disc": None}
    for name, ae, disc in seen:
        own, other, other_now = ("ae", "disc", disc) if name == "g" else ("disc", "ae", ae)
        assert all(g is not None for g in (ae if name == "g" else disc))
        if last[other] is None:
            assert all(g is None for g in other_now), f"the {name} pass put gradients into {other}"
        else:
            assert all(torch.equal(a, b) for a, b in zip(other_now, last[other], strict=True)), name
        last[own] = ae if name == "g" else disc
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored after toggling"


@pytest.mark.parametrize(
    ("strategy", "adv_weight", "find_unused"),
    [("ddp", 0.01, True), ("ddp_spawn", 0.01, True), ("ddp", 0.0, None), ("auto", 0.01, None)],
)
def test_ddp_looks_for_unused_parameters_only_with_a_discriminator(strategy, adv_weight, find_unused):
    trainer = L.Trainer(
        accelerator="cpu", devices=2 if strategy != "auto" else 1, strategy=strategy, logger=False
    )
    model = tiny_autoencoder(adv_weight=adv_weight)
    model.trainer = trainer
    model.setup("fit")
    assert getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters") is find_unused


def test_ddp_without_unused_parameter_detection_is_refused_with_a_discriminator():
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_false", logger=False
    )
    model = tiny_autoencoder(adv_weight=0.01)
    model.trainer = trainer
    with pytest.raises(InputError, match="use --trainer.strategy ddp"):
        model.setup("fit")
