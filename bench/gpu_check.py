"""One short GPU check of the MRNet-size stages under bf16-mixed: step times, peak memory, NaN or not.

    python bench/gpu_check.py                                   # on a GPU: 256×256×32, the mrnet_*.yaml models
    python bench/gpu_check.py --size 32 32 32 --device cpu --steps 2 --n-syn 4     # the same path, tiny, on CPU

Builds the networks of `configs/mrnet_ae.yaml`, `mrnet_simclr.yaml` and `mrnet_ldm.yaml` (their
`model.init_args`, so the figures follow the configs) on random 3D phantoms, trains each for a
few steps through Lightning at `--precision`, the autoencoder past its adversarial warm-up, then
runs one memorization check of `--n-syn` samples through the callback's streaming path
(`memorization.stream.embed_stream`, sampling and embedding under the same autocast). Prints
JSON: per stage the median step seconds, the peak device memory in GiB, and whether every
loss and gradient stayed finite. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from datamodules import PhantomDataModule  # noqa: E402
from lightning_modules import AutoencoderModule, LatentDiffusionModule, SimCLRModule  # noqa: E402
from memorization.stream import chunked, embed_stream  # noqa: E402


def model_args(config: str) -> dict:
    return dict(yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["init_args"])


class StepProbe(L.Callback):
    """Seconds per training step (device work waited for) and whether losses and gradients stay finite."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.finite = True

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = self._now(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.finite &= all(bool(torch.isfinite(g).all()) for g in grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(self._now(pl_module) - self.started)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.finite &= bool(torch.isfinite(loss).all())


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train(module: L.LightningModule, data: PhantomDataModule, args: argparse.Namespace, folder: Path) -> dict:
    device = torch.device(args.device)
    reset_peak(device)
    probe = StepProbe()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe], default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(module, data)
    timed = probe.seconds[1:] or probe.seconds  # the first step pays for cuDNN autotuning and allocation
    return {
        "median_step_seconds": round(statistics.median(timed), 4),
        "peak_gib": peak_gib(device),
        "finite": probe.finite,
        "trainer": trainer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 32])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--n-syn", type=int, default=64, help="samples in the memorization check")
    parser.add_argument("--inference-steps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    L.seed_everything(0)
    figures: dict = {"size": args.size, "precision": args.precision, "device": str(device)}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ae_args = model_args("mrnet_ae.yaml") | {"adv_warmup_steps": 2}  # the adversarial term from step 3
        ldm_args = model_args("mrnet_ldm.yaml")
        data = PhantomDataModule(spatial_size=args.size, n_patients=20, batch_size=2)
        ldm_data = PhantomDataModule(spatial_size=args.size, n_patients=20, batch_size=4)  # the configs' batches

        autoencoder = AutoencoderModule(**ae_args)
        result = train(autoencoder, data, args, folder)
        result.pop("trainer").save_checkpoint(folder / "ae.ckpt")
        figures["autoencoder"] = result

        embedder = SimCLRModule(**model_args("mrnet_simclr.yaml"))
        result = train(embedder, PhantomDataModule(spatial_size=args.size, n_patients=20, batch_size=8), args, folder)
        figures["embedder"] = result | {"trainer": None}

        ldm = LatentDiffusionModule(**(ldm_args | {"autoencoder_ckpt": str(folder / "ae.ckpt")}))
        result = train(ldm, ldm_data, args, folder)
        trainer = result.pop("trainer")
        figures["ldm"] = result

        reset_peak(device)
        embedder.to(device)
        ldm.to(device)
        started = time.perf_counter()
        check = embed_stream(
            chunked(
                lambda r: ldm.sample(len(r), seed=0, num_inference_steps=args.inference_steps,
                                     sample_batch_size=ldm_args["sample_batch_size"], start_index=r.start),
                range(args.n_syn), ldm_args["sample_batch_size"],
            ),
            embedder.embed, score_pairs=True, autocast=trainer.precision_plugin.forward_context,
            require_finite="gpu_check", device=device,
        )  # fmt: skip
        figures["check"] = {
            "n_syn": args.n_syn,
            "sample_batch_size": ldm_args["sample_batch_size"],
            "seconds": round(time.perf_counter() - started, 2),
            "seconds_sampling": round(check.seconds["images"], 2),
            "peak_gib": peak_gib(device),
            "finite": bool(torch.isfinite(check.embeddings).all()) and not math.isnan(float(check.pair_scores.mean())),
        }
    figures["embedder"].pop("trainer", None)
    figures["machine"] = describe_machine()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
