"""What Lightning costs per training step: `Trainer.fit` on our modules against a plain PyTorch loop. Prints one JSON object.

    python bench/training_overhead.py --steps 10 --warmup 2 --repeats 3 --threads 1

Two models and a null model, each trained three ways over the same networks (same initial
weights, seed 0), the same batches and the same optimizer (Adam, the module's own
`configure_optimizers`):

- `ldm`: `LatentDiffusionModule` of configs/phantom_ldm.yaml (UNet channels 64/128, 1000 DDPM
  steps) over a frozen KL autoencoder of configs/phantom_ae.yaml (channels 32/64, 3 latent
  channels, untrained: the timing does not depend on its weights), 32×32 phantoms, batch 16,
  so 16×16 latents;
- `null`: a module with next to no compute (one linear map of each image's mean, logged like
  ours), 200 steps a run: what the loop itself costs per step, in milliseconds;
- `ae`: `AutoencoderModule` of configs/phantom_ae.yaml with the adversarial term active from the
  first step (`adv_warmup_steps 0`): generator and discriminator passes, two optimizers
  (Lightning manual optimization), 32×32 phantoms, batch 8.

The ways:

- `lightning_minimal`: `Trainer(accelerator="cpu", devices=1, max_steps=...)` with no logger, no
  checkpointing, no progress bar, no model summary, no validation (`limit_val_batches=0`): the
  training loop itself, our `training_step` with its `self.log` calls;
- `lightning_user`: the same plus what the phantom configs have: a TensorBoardLogger
  (`log_every_n_steps 20`) into a temporary folder and the progress bar (written to a
  temporary file, not the terminal). Checkpointing stays off: its cadence is a separate issue
  (it saved one at every epoch end);
- `plain`: a hand-written loop over the module's own networks, scheduler and optimizers, doing
  the same arithmetic as `training_step` (the LDM: encode, scale, noise, add_noise, UNet, MSE;
  the AE: reconstruction + KL + adversarial generator loss, then the discriminator loss, each
  pass with the other network's parameters frozen, as Lightning's `toggle_optimizer` does).

Batches: the first `steps + warmup` training batches of `PhantomDataModule(spatial_size=(32, 32),
n_patients=200, val_fraction=0.2)` are materialised once (lists of dicts) and every run iterates
over the same list (Lightning through `DataLoader(batches, batch_size=None)`), so data loading is
out of the comparison. Each step's end is stamped (Lightning: a callback's `on_train_batch_end`;
plain: after `optimizer.step()`); a step time is the interval between two consecutive stamps
after `warmup` steps, so it includes everything the loop does between steps. Runs alternate
(ldm: lightning_minimal, plain, lightning_user, plain, ...; then the AE the same way) within one
process, `repeats` times. Ratio = Lightning / plain of the mean step time, per repetition
(against the plain runs of the same repetition), and of the medians over all steps. Each figure
comes twice: `wall` (time.perf_counter) and `cpu` (time.process_time of this process, all its
threads: the TensorBoard writer's too). With `--threads 1` the CPU time of a step is the work it
did, which other processes on a shared machine disturb much less than its wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from machine import describe_machine  # noqa: E402  (bench/machine.py: scripts run from bench/ on sys.path)
from torch.utils.data import DataLoader  # noqa: E402

from memwatch.datamodules import PhantomDataModule  # noqa: E402
from memwatch.lightning_modules import AutoencoderModule, LatentDiffusionModule  # noqa: E402
from memwatch.lightning_modules.autoencoder import kl_divergence  # noqa: E402

AE_ARGS = dict(kind="kl", spatial_dims=2, in_channels=1, channels=(32, 64), latent_channels=3, num_res_blocks=1, norm_num_groups=32,
               kl_weight=1e-6, adv_weight=0.01, adv_warmup_steps=0, lr=1e-3, disc_lr=1e-3)  # fmt: skip
LDM_ARGS = dict(channels=(64, 128), num_res_blocks=1, norm_num_groups=32, num_train_timesteps=1000, lr=2.5e-4)


def make_batches(batch_size: int, n: int) -> list[dict]:
    data = PhantomDataModule(spatial_size=(32, 32), n_patients=200, val_fraction=0.2, batch_size=batch_size)
    data.setup("fit")
    batches: list[dict] = []
    while len(batches) < n:
        batches += [{"image": b["image"].clone(), "id": list(b["id"])} for b in data.train_dataloader()]
    return batches[:n]


class NullModule(L.LightningModule):
    """Next to no compute (a 1-parameter linear map of each image's mean): what is left is the loop's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images.mean((1, 2, 3))[:, None]).pow(2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))  # as our modules log
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def make_model(kind: str) -> L.LightningModule:
    torch.manual_seed(0)
    if kind == "null":
        return NullModule()
    if kind == "ae":
        return AutoencoderModule(**AE_ARGS)
    ae_config = {**AE_ARGS, "adv_weight": 0.0}
    return LatentDiffusionModule(autoencoder_config=ae_config, **LDM_ARGS)


class StepStamps(Callback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


def run_lightning(kind: str, batches: list[dict], user: bool, tmp: Path) -> list[tuple[float, float]]:
    model = make_model(kind)
    stamps = StepStamps()
    options = dict(logger=False, enable_progress_bar=False)
    if user:
        options = dict(logger=L.pytorch.loggers.TensorBoardLogger(str(tmp), name=kind), log_every_n_steps=20,
                       enable_progress_bar=True)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, limit_val_batches=0,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[stamps], **options,
    )  # fmt: skip
    stdout, stderr = sys.stdout, sys.stderr
    with (tmp / "progress.txt").open("a") as sink:
        sys.stdout = sys.stderr = sink  # the progress bar renders, into a file
        try:
            trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    assert trainer.global_step == len(batches), trainer.global_step
    return stamps.stamps


def plain_ldm(batches: list[dict]) -> list[tuple[float, float]]:
    model = make_model("ldm")
    model.train()
    unet, autoencoder, scheduler = model.unet, model.autoencoder, model.scheduler
    optimizer = model.configure_optimizers()
    scale = None
    stamps = []
    for batch in batches:
        images = batch["image"]
        with torch.no_grad():
            z = autoencoder.encode_stage_2_inputs(images).float()
            if scale is None:
                scale = 1.0 / z.std()  # the latent scale factor, measured once as LatentDiffusionModule does
            z = z * scale
        noise = torch.randn(z.shape)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],))
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
        loss = F.mse_loss(unet(noisy, timesteps=timesteps).float(), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def plain_null(batches: list[dict]) -> list[tuple[float, float]]:
    model = make_model("null")
    optimizer = model.configure_optimizers()
    stamps = []
    for batch in batches:
        loss = model.loss(batch["image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def plain_ae(batches: list[dict]) -> list[tuple[float, float]]:
    model = make_model("ae")
    model.train()
    generator, discriminator = model.autoencoder, model.discriminator
    opt_g, opt_d = model.configure_optimizers()
    adversarial_loss, hp = model.adversarial_loss, model.hparams
    stamps = []
    for batch in batches:
        images = batch["image"]
        discriminator.requires_grad_(False)  # what toggle_optimizer(opt_g) does
        reconstruction, z_mu, z_sigma = generator(images)
        loss_g = F.l1_loss(reconstruction.float(), images.float()) + hp.kl_weight * kl_divergence(
            z_mu, z_sigma
        )
        logits_fake = discriminator(reconstruction.contiguous().float())[-1]
        loss_g = loss_g + hp.adv_weight * adversarial_loss(
            logits_fake, target_is_real=True, for_discriminator=False
        )
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        discriminator.requires_grad_(True)
        generator.requires_grad_(False)  # toggle_optimizer(opt_d)
        logits_fake = discriminator(reconstruction.contiguous().detach().float())[-1]
        logits_real = discriminator(images.contiguous().detach().float())[-1]
        loss_d = 0.5 * (
            adversarial_loss(logits_fake, target_is_real=False, for_discriminator=True)
            + adversarial_loss(logits_real, target_is_real=True, for_discriminator=True)
        )
        opt_d.zero_grad()
        (hp.adv_weight * loss_d).backward()
        opt_d.step()
        generator.requires_grad_(True)
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def intervals(stamps: list[tuple[float, float]], warmup: int, clock: int) -> list[float]:
    timed = [stamp[clock] for stamp in stamps[warmup - 1 :]]  # the first interval ends at step warmup + 1
    return [b - a for a, b in zip(timed, timed[1:], strict=False)]


def summarise(runs: dict[str, list[list[float]]], repeats: int) -> dict:
    """Mean step time per run; Lightning / plain ratios per repetition, of the means and of the medians."""
    means = {way: [statistics.fmean(run) for run in ways] for way, ways in runs.items()}
    medians = {way: statistics.median(sum(ways, [])) for way, ways in runs.items()}
    plain_per_repeat = [statistics.fmean(means["plain"][2 * r : 2 * r + 2]) for r in range(repeats)]
    entry: dict = {"mean_step_seconds": means, "median_step_seconds": medians}
    for way in ("lightning_minimal", "lightning_user"):
        entry[f"ratio_{way}_per_repeat"] = [m / p for m, p in zip(means[way], plain_per_repeat, strict=True)]
        entry[f"ratio_{way}_mean"] = statistics.fmean(means[way]) / statistics.fmean(means["plain"])
        entry[f"ratio_{way}_median"] = medians[way] / medians["plain"]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["ldm", "ae", "null"], choices=["ldm", "ae", "null"])
    parser.add_argument("--null-steps", type=int, default=200, help="timed steps per run of the null model")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    started = datetime.datetime.now(datetime.UTC)
    result: dict = {
        "date": started.isoformat(timespec="seconds"),
        "machine": describe_machine(("torch", "lightning", "monai")),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    n = args.steps + args.warmup
    ways = {"lightning_minimal": None, "plain": None, "lightning_user": None}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            batches = make_batches(
                16 if kind == "ldm" else 8, n if kind != "null" else args.null_steps + args.warmup
            )
            plain = {"ldm": plain_ldm, "ae": plain_ae, "null": plain_null}[kind]
            stamps_per_way: dict[str, list] = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way in ("lightning_minimal", "plain", "lightning_user", "plain"):
                    torch.manual_seed(0)
                    if way == "plain":
                        stamps = plain(batches)
                    else:
                        stamps = run_lightning(kind, batches, way == "lightning_user", Path(tmp))
                    stamps_per_way[way].append(stamps)
            entry = {"batch_size": len(batches[0]["id"]), "timed_steps": len(batches) - args.warmup}
            for clock, name in ((0, "wall"), (1, "cpu")):
                runs = {
                    way: [intervals(st, args.warmup, clock) for st in all_]
                    for way, all_ in stamps_per_way.items()
                }
                entry[name] = summarise(runs, args.repeats)
                entry[name]["lightning_minus_plain_median_ms"] = {
                    way: 1e3
                    * (entry[name]["median_step_seconds"][way] - entry[name]["median_step_seconds"]["plain"])
                    for way in ("lightning_minimal", "lightning_user")
                }
            result[kind] = entry
    result["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
