"""The pixel-space DDPM: the LDM's sampling contract without an autoencoder, resume, and its config through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memwatch.errors import InputError
from memwatch.lightning_modules import PixelDiffusionModule
from tests.helpers import ROOT, fit, last_ckpt, memorization_history

TINY = dict(channels=(16, 16), norm_num_groups=8, num_head_channels=8, num_train_timesteps=100, num_inference_steps=4)
TINY_FLAGS = [
    "--model.init_args.channels", "[16, 16]", "--model.init_args.norm_num_groups", "8",
    "--model.init_args.num_head_channels", "8", "--model.init_args.num_train_timesteps", "100",
    "--data.init_args.n_patients", "64", "--data.init_args.val_fraction", "0.5",  # the embedder fixture's split
]  # fmt: skip


@pytest.mark.parametrize("size", [(16, 16), (8, 8, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_sample_i_depends_only_on_seed_and_i(size, scheduler):
    torch.manual_seed(0)
    model = PixelDiffusionModule(spatial_dims=len(size), **TINY).eval()
    model.image_spatial_size = size
    eight = model.sample(8, seed=3, scheduler=scheduler, sample_batch_size=3)
    four = model.sample(4, seed=3, scheduler=scheduler, sample_batch_size=4)
    last_two = model.sample(2, seed=3, scheduler=scheduler, sample_batch_size=1, start_index=6)
    assert eight.shape == (8, 1, *size) and float(eight.min()) >= 0.0 and float(eight.max()) <= 1.0
    torch.testing.assert_close(four, eight[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_two, eight[6:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eight[0], eight[1])
    assert not torch.allclose(model.sample(1, seed=4, scheduler=scheduler), eight[:1])


def test_training_in_minus_one_to_one_and_bad_options():
    model = PixelDiffusionModule(**TINY)
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1)
    assert model.to_model_space(images).flatten().tolist() == [-1.0, 0.0, 1.0]
    torch.testing.assert_close(model.to_images(model.to_model_space(images)), images)
    with pytest.raises(InputError, match="does not know its image size"):
        model.sample(1)
    with pytest.raises(InputError, match="spatial_dims=4 must be 2 or 3"):
        PixelDiffusionModule(spatial_dims=4, **TINY)
    with pytest.raises(InputError, match="multiples of norm_num_groups"):
        PixelDiffusionModule(channels=(12, 16), norm_num_groups=8)


def test_the_ddpm_config_trains_with_the_callback_and_resumes(embedder_ckpt, tmp_path):
    memorization = ["--memorization.embedder_ckpt", str(embedder_ckpt), "--memorization.num_inference_steps", "2",
                    "--data.init_args.spatial_size", "[32, 32]"]  # fmt: skip
    first = fit("phantom_ddpm.yaml", tmp_path, *TINY_FLAGS, *memorization, steps=2)
    run_dir = Path(first.trainer.log_dir)
    assert run_dir.parent.name == "phantom_ddpm"
    (row,) = memorization_history(run_dir)  # check_at_start: a baseline after the first epoch
    assert int(row["n_syn"]) == int(row["n_train"]) == 32 and row["check"] == 0
    resumed = fit("phantom_ddpm.yaml", tmp_path, *TINY_FLAGS, *memorization, "--ckpt_path", str(last_ckpt(first)), steps=4)
    assert resumed.trainer.global_step == 4
    reloaded = PixelDiffusionModule.load_from_checkpoint(last_ckpt(resumed), map_location="cpu", weights_only=True)
    assert reloaded.image_spatial_size == (32, 32)
    samples = reloaded.sample(2, seed=0, num_inference_steps=2)
    assert samples.shape == (2, 1, 32, 32)
    assert (ROOT / "configs" / "phantom_ddpm.yaml").is_file()
