"""What the CPU/GPU cost benchmarks share: a config's LDM at random weights on phantoms, and timers.

The time of a forward pass does not depend on the weights, so `random_ldm` builds the config's LDM
over an autoencoder of its `*_ae.yaml` model section, on phantoms of its data section (the phantom
config's patients, or 40 for another dataset's config), ready to train and sample.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from memwatch.datamodules import PhantomDataModule
from memwatch.lightning_modules import AutoencoderModule, LatentDiffusionModule

ROOT = Path(__file__).resolve().parents[1]


def cost_arguments(docstring: str, train_steps: int) -> argparse.ArgumentParser:
    """The options of every benchmark built on `random_ldm`: the config, the device, a smaller size, repeats and
    timed training steps (`train_steps` by default); described by the first line of `docstring`."""
    parser = argparse.ArgumentParser(description=docstring.splitlines()[0])
    parser.add_argument("--config", default="phantom_ldm.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--spatial-size", type=int, nargs="+", help="override the data's spatial_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=train_steps)
    return parser


def config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def best_of(repeats: int, device: torch.device, work: Callable[[], object]) -> float:
    """The fastest of `repeats` runs of `work`, in seconds (the device synchronized around each)."""
    times = []
    for _ in range(repeats):
        started = synchronized(device)
        work()
        times.append(synchronized(device) - started)
    return min(times)


def training_step_seconds(model: LatentDiffusionModule, images: torch.Tensor, steps: int) -> float:
    """Median seconds of one LDM training step on `images` (diffusion loss, backward, Adam on the UNet) over
    `steps` timed steps, after one untimed step that allocates."""
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = model.diffusion_loss(model.to_model_space(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()
    return statistics.median(best_of(1, images.device, train_step) for _ in range(steps))


@dataclass
class RandomLDM:
    model: LatentDiffusionModule
    data: PhantomDataModule
    ldm_config: dict  # the config file's sections
    stem: str  # the dataset's name: phantom, mrnet, ...
    batch_size: int


def random_ldm(config_name: str, device: torch.device, spatial_size: Sequence[int] | None = None) -> RandomLDM:
    """`config_name`'s LDM (random weights, latent scale 1) on phantoms of its data section, `spatial_size` if given."""
    ldm_config = config(config_name)
    stem = config_name.removesuffix(".yaml").removesuffix("_ldm")
    data_args = {k: v for k, v in ldm_config["data"]["init_args"].items() if k in ("spatial_size", "batch_size")}
    if spatial_size:
        data_args["spatial_size"] = list(spatial_size)
    phantom = config("phantom_ldm.yaml")["data"]["init_args"] if stem == "phantom" else {"n_patients": 40}
    data = PhantomDataModule(**{**phantom, **data_args})
    data.setup("fit")
    torch.manual_seed(0)
    autoencoder = {k: v for k, v in config(f"{stem}_ae.yaml")["model"]["init_args"].items() if k != "perceptual_weights"}
    autoencoder = {k: v for k, v in AutoencoderModule(**autoencoder).hparams.items() if not k.startswith("_")}
    model_args = {k: v for k, v in ldm_config["model"]["init_args"].items() if k != "autoencoder_ckpt"}
    model = LatentDiffusionModule(**model_args, autoencoder_config=autoencoder).to(device)
    model.image_spatial_size = tuple(data.spatial_size)
    model.scale_factor.fill_(1.0)
    return RandomLDM(model, data, ldm_config, stem, data_args["batch_size"])
