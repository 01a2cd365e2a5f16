"""Latent diffusion: batch-invariant seeded sampling, output range and shape, checkpoint round trip."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from memwatch.datamodules import PhantomDataModule
from memwatch.errors import InputError
from memwatch.lightning_modules import LatentDiffusionModule
from memwatch.lightning_modules.latent_diffusion import sample_generator
from tests.helpers import quiet_trainer

TINY_UNET = dict(
    channels=(16, 32), norm_num_groups=8, num_head_channels=8, num_train_timesteps=100, num_inference_steps=6
)


@pytest.fixture(scope="module")
def trained_ldm(autoencoder_ckpt, tmp_path_factory):
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=8)
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET)
    trainer = quiet_trainer(max_steps=6, limit_val_batches=1)
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("ldm") / "ldm.ckpt"
    trainer.save_checkpoint(path)
    return model, path


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_sample_i_depends_only_on_seed_and_i(trained_ldm, scheduler):
    model, _ = trained_ldm
    four = model.sample(4, seed=11, scheduler=scheduler, sample_batch_size=4)
    eight = model.sample(8, seed=11, scheduler=scheduler, sample_batch_size=3)
    torch.testing.assert_close(four, eight[:4], atol=1e-5, rtol=0)
    shifted = model.sample(3, seed=11, scheduler=scheduler, start_index=5, sample_batch_size=2)
    torch.testing.assert_close(shifted, eight[5:], atol=1e-5, rtol=0)
    other_seed = model.sample(4, seed=12, scheduler=scheduler)
    assert (other_seed - four).abs().max() > 1e-2


def test_samples_have_the_data_shape_and_range(trained_ldm):
    model, _ = trained_ldm
    samples = model.sample(3, seed=0)
    assert samples.shape == (3, 1, 16, 16)
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert samples.std() > 0
    assert model.sample(0, seed=0).shape == (0, 1, 16, 16)


def test_seeds_do_not_collide():
    draw = lambda seed, i: torch.randn(4, generator=sample_generator(seed, i))  # noqa: E731
    assert not torch.equal(draw(0, 1), draw(1, 0))
    assert not torch.equal(draw((3, 0), 7), draw((3, 1), 7))
    assert torch.equal(draw((3, 1), 7), draw((3, 1), 7))


def test_scale_factor_and_image_size_survive_checkpoint(trained_ldm, autoencoder_ckpt):
    model, path = trained_ldm
    assert model.scale_factor > 0
    reloaded = LatentDiffusionModule.from_checkpoint(path, "ldm_ckpt")
    assert float(reloaded.scale_factor) == float(model.scale_factor)
    assert reloaded.image_spatial_size == (16, 16)
    torch.testing.assert_close(reloaded.sample(2, seed=5), model.sample(2, seed=5), atol=1e-5, rtol=0)
    # The checkpoint carries the autoencoder: it reloads without the autoencoder file.
    assert reloaded.hparams.autoencoder_config["channels"] == [16, 16] or tuple(
        reloaded.hparams.autoencoder_config["channels"]
    ) == (16, 16)


def test_scale_factor_is_one_over_latent_std(autoencoder_ckpt):
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=16)
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET)
    torch.manual_seed(0)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    images = torch.cat([b["image"] for b in data.reference_dataloader("train")])
    assert len(images) == 16  # the first batch holds every training image
    with torch.no_grad():
        z = torch.cat([model.autoencoder.encode_stage_2_inputs(images) for _ in range(8)])
    # the module's value comes from one posterior sample per image, this from eight
    assert float(model.scale_factor) == pytest.approx(1.0 / float(z.std()), rel=0.05)


def test_v_prediction_trains(autoencoder_ckpt):
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=20, batch_size=8)
    model = LatentDiffusionModule(
        autoencoder_ckpt=str(autoencoder_ckpt), prediction_type="v_prediction", **TINY_UNET
    )
    quiet_trainer(max_steps=2, limit_val_batches=1).fit(model, data)
    assert model.sample(2, seed=0).shape == (2, 1, 16, 16)


def test_autoencoder_stays_frozen(trained_ldm):
    model, _ = trained_ldm
    model.train()
    assert not model.autoencoder.training
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


def test_bad_checkpoints_and_sizes(autoencoder_ckpt, trained_ldm, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        LatentDiffusionModule(autoencoder_ckpt=str(tmp_path / "missing.ckpt"))
    with pytest.raises(
        InputError, match="is a checkpoint of LatentDiffusionModule, not of AutoencoderModule"
    ):
        LatentDiffusionModule(autoencoder_ckpt=str(trained_ldm[1]))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        LatentDiffusionModule(autoencoder_ckpt=str(garbage))
    with pytest.raises(InputError, match="autoencoder_ckpt is not set"):
        LatentDiffusionModule()
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET)
    with pytest.raises(InputError, match=r"not divisible by 4 \(autoencoder ×2, UNet ×2\)"):
        model.check_data(PhantomDataModule(spatial_size=(18, 18)))
    with pytest.raises(InputError, match="never fitted|image size"):
        model.sample(1, seed=0)


def test_flash_attention_is_an_argument_with_the_same_output(autoencoder_ckpt):
    from monai.networks.blocks.selfattention import SABlock

    def attention_flags(model):
        return {m.use_flash_attention for m in model.unet.modules() if isinstance(m, SABlock)}

    unet = {**TINY_UNET, "attention_levels": (False, True)}
    default = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **unet)
    # Saved unresolved, so the hparams of a GPU run reload on a CPU.
    assert default.hparams.use_flash_attention is None
    assert attention_flags(default) == {torch.cuda.is_available()}
    flash = LatentDiffusionModule.from_hparams({**default.hparams, "use_flash_attention": True})
    explicit = LatentDiffusionModule.from_hparams({**default.hparams, "use_flash_attention": False})
    assert attention_flags(flash) == {True} and attention_flags(explicit) == {False}
    explicit.load_state_dict(flash.state_dict())  # the flag changes no parameter
    torch.manual_seed(0)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([0, 50, 99])
    with torch.no_grad():
        torch.testing.assert_close(
            flash.unet(x, timesteps=t), explicit.unet(x, timesteps=t), atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_samples_under_bf16_autocast(trained_ldm, scheduler, monkeypatch):
    model, _ = trained_ldm
    seen = {"unet": set(), "step": set()}
    hook = model.unet.register_forward_hook(lambda module, args, output: seen["unet"].add(output.dtype))
    scheduler_class = type(model.make_scheduler(scheduler))
    step = scheduler_class.step

    def recording_step(self, model_output, timestep, sample, *args, **kwargs):
        seen["step"].add((model_output.dtype, sample.dtype, torch.is_autocast_enabled("cpu")))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(scheduler_class, "step", recording_step)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            five = model.sample(5, seed=3, scheduler=scheduler, sample_batch_size=5)
            ones = model.sample(5, seed=3, scheduler=scheduler, sample_batch_size=1)
            shifted = model.sample(2, seed=3, scheduler=scheduler, sample_batch_size=2, start_index=3)
    finally:
        hook.remove()
    assert seen["unet"] == {torch.bfloat16}  # the UNet did run in bf16
    assert seen["step"] == {(torch.float32, torch.float32, False)}  # the scheduler did not
    assert five.dtype == torch.float32 and five.shape == (5, 1, 16, 16)
    assert torch.isfinite(five).all() and five.min() >= 0.0 and five.max() <= 1.0
    # bf16 convolutions of a batch of 5 and of 1 may round differently; the noise is the same.
    torch.testing.assert_close(ones, five, atol=2e-2, rtol=0)
    torch.testing.assert_close(shifted, five[3:], atol=2e-2, rtol=0)
    full = model.sample(5, seed=3, scheduler=scheduler, sample_batch_size=5)
    torch.testing.assert_close(five, full, atol=5e-2, rtol=0)  # bf16 sampling stays close to float32
