"""The one GPU check: what training, sampling and a memorization check cost at the real configs' sizes.

    python bench/gpu_check.py --out gpu_check.json   # one H100/H200, the configs' sizes, in --max-minutes 8
    python bench/gpu_check.py --smoke                 # the same code paths, tiny, on a CPU in under a minute

`--smoke` divides every axis by 16 (at least 32: the autoencoders' patch discriminator), caps batches at
2, trains 2 steps per stage and samples with 2 inference steps, block sizes 1 and 2, in float32 unless
`--precision` says otherwise: on a CPU, bf16 gradients of 3D convolutions over 2×2×2 maps (the UNets'
deepest level at these sizes) come back non-finite now and then (about 3 in 100 in torch 2.13).

Reads the model and data sections of `configs/{mrnet,chestxray,nifti,dicom}_{ae,simclr,ldm}.yaml`
(random weights, random phantoms of `datamodules.PhantomDataModule` at each config's `spatial_size`
and `batch_size`, each config's trainer precision: bf16-mixed) and measures, one function each:

- `stages`: each stage's median training-step seconds (after the first step), peak GiB and whether every
  loss and gradient stayed finite, per config (dicom is measured once with nifti when their models and
  sizes are the same, and says so);
- `sampling`: seconds per sample and peak GiB of the LDM per block size (`sample_batch_size` 4, 8, 16, 32,
  larger ones skipped after the UNet ran out of memory; in 3D also `decode_batch_size` 4), the UNet loop
  and the decoder timed apart, and `sampler_graphs` on vs off at the fastest block size;
- `check_ratio`: a check's estimated seconds (N_train samples at the measured seconds per sample plus the
  embedder's `embed` per sample) over the training seconds between two checks (LDM step seconds × steps
  per epoch × `every_n_epochs`), for each LDM config's `memorization:` settings and the best ones measured;
- `invariance`: with `deterministic_kernels()`, the MRNet LDM's blocks sampled alone vs inside the runs of
  `blocks(...)` over `block_shard(n, B, rank, world_size)` for world sizes 1, 2, 3 (`torch.equal`),
  CUDA graphs vs eager, and the same samples drawn at `sample_batch_size` 4 vs 16 (max abs difference);
- `flip_memory`: peak GiB and seconds of the MRNet embedder's `embed` of 16 volumes with `flip_invariant`
  (and `standardize_input`) vs without.

Every measurement is wrapped: a failure (out of memory, say) becomes `{"error": "<one line>"}` and the next
one runs, with the CUDA cache emptied between them. Each section has a share of `--max-minutes`; once a
section's share (and what earlier sections left) is spent, its remaining measurements are skipped with a
note. A line per measurement goes to stderr; stdout receives one JSON object (also written to `--out`).
Nothing is written outside a temporary folder and `--out`.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the time budget counts the imports too

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext, redirect_stdout  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision, Precision  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from memwatch.datamodules import PhantomDataModule  # noqa: E402
from memwatch.lightning_modules import AutoencoderModule, LatentDiffusionModule, SimCLRModule  # noqa: E402
from memwatch.memorization.distributed import block_shard  # noqa: E402
from memwatch.memorization.stream import Stopwatch, blocks, deterministic_kernels  # noqa: E402

REAL_DATA = ("mrnet", "chestxray", "nifti", "dicom")
STAGES = {"ae": "autoencoder", "simclr": "embedder", "ldm": "ldm"}
# Where each section's time ends, as a cumulative share of --max-minutes: a section may use what earlier
# ones left, never what later ones need.
SECTION_ENDS = {"stages": 0.40, "sampling": 0.74, "check_ratio": 0.80, "invariance": 0.92, "flip_memory": 1.0}
# N_train of each dataset, where its configs do not set n_train (the check draws N_syn = N_train samples).
TRAINING_SETS = {
    "mrnet": (904, "MRNet sagittal, the authors' fold 0: 904 training volumes (configs/mrnet_ae.yaml)"),
    "nifti": (242, "the paper's CT patches: 242 training / 58 held out (configs/nifti_ldm.yaml)"),
    "dicom": (240, "about 240 training volumes, as the warm-up of configs/dicom_ae.yaml assumes"),
}
# --smoke: each axis ÷16 (at least 32, what the autoencoders' 3-layer patch discriminator needs), batches ≤ 2.
SMOKE_SIZE_DIVISOR, SMOKE_MIN_SIZE, SMOKE_MAX_BATCH = 16, 32, 2
DEFAULT_MAX_OVERHEAD = 0.25  # MemorizationCallback's max_overhead where a config sets none


# --- the configs ---------------------------------------------------------------------------------


def read_config(dataset: str, stage: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / f"{dataset}_{stage}.yaml").read_text())


def model_args(dataset: str, stage: str) -> dict:
    """A stage's `model.init_args` without checkpoint paths: the modules here have random weights."""
    args = dict(read_config(dataset, stage)["model"]["init_args"])
    args.pop("autoencoder_ckpt", None)
    return args


def data_args(dataset: str, stage: str) -> dict:
    return dict(read_config(dataset, stage)["data"]["init_args"])


def autoencoder_config(dataset: str) -> dict:
    """The autoencoder's complete hyperparameters: they build the LDM's autoencoder without a checkpoint."""
    return dict(AutoencoderModule(**model_args(dataset, "ae")).hparams)


def config_callbacks(dataset: str, stage: str) -> list[L.Callback]:
    """The config's own trainer callbacks (the LDMs' EMA weight averaging, whose update a step pays for)."""
    callbacks = []
    for spec in read_config(dataset, stage)["trainer"].get("callbacks") or []:
        module, name = spec["class_path"].rsplit(".", 1)
        callbacks.append(getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {})))
    return callbacks


def without_paths(section: dict) -> dict:
    return {key: value for key, value in section.items() if not key.endswith("_ckpt")}


def same_measurements(dataset: str, other: str) -> bool:
    """Whether two datasets' configs train and sample the same networks at the same sizes: measured once."""

    def what_is_measured(name: str) -> list:
        return [
            (
                model_args(name, stage),
                data_args(name, stage)["spatial_size"],
                data_args(name, stage)["batch_size"],
                read_config(name, stage)["trainer"]["precision"],
                without_paths(read_config(name, stage).get("memorization") or {}),
            )
            for stage in STAGES
        ]

    return what_is_measured(dataset) == what_is_measured(other)


def training_set_size(dataset: str) -> tuple[int, str]:
    n_train = data_args(dataset, "ldm").get("n_train")
    if isinstance(n_train, int):
        return n_train, f"n_train: {n_train} in configs/{dataset}_ldm.yaml"
    return TRAINING_SETS[dataset]


# --- the run: sizes, time, memory, failures --------------------------------------------------------


@dataclass
class Run:
    device: torch.device
    smoke: bool
    train_steps: int
    blocks_per_setting: int
    block_sizes: tuple[int, ...]
    small_decode_batch: int
    compared_batch_sizes: tuple[int, int]
    precision: str | None  # None: each config's trainer precision
    max_seconds: float
    folder: Path

    def spatial_size(self, dataset: str, stage: str = "ldm") -> tuple[int, ...]:
        size = data_args(dataset, stage)["spatial_size"]
        if not self.smoke:
            return tuple(size)
        return tuple(max(SMOKE_MIN_SIZE, s // SMOKE_SIZE_DIVISOR // 16 * 16) for s in size)

    def batch(self, batch_size: int) -> int:
        return min(batch_size, SMOKE_MAX_BATCH) if self.smoke else batch_size

    def inference_steps(self, steps: int) -> int:
        return 2 if self.smoke else steps

    def precision_of(self, dataset: str, stage: str = "ldm") -> str:
        return self.precision or read_config(dataset, stage)["trainer"]["precision"]

    def autocast(self, dataset: str, stage: str = "ldm") -> Callable:
        """The trainer's forward context at the config's precision (bf16 autocast under bf16-mixed)."""
        precision = self.precision_of(dataset, stage)
        if precision.endswith("-mixed"):
            return MixedPrecision(precision, self.device.type).forward_context
        return Precision().forward_context

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def time_left(self, section: str) -> bool:
        return self.elapsed() < SECTION_ENDS[section] * self.max_seconds


def say(run: Run, text: str) -> None:
    print(f"[{run.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)


def error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure(run: Run, section: str, label: str, function: Callable[..., dict], *args: Any) -> dict:
    """`function(*args)`; `{"error": ...}` if it raises, `{"skipped": ...}` once `section`'s time is spent."""
    if not run.time_left(section):
        say(run, f"{label}: skipped (time budget)")
        return {"skipped": f"{section}'s share of --max-minutes {run.max_seconds / 60:g} was spent"}
    free_memory(run.device)
    say(run, f"{label} ...")
    try:
        result = function(*args)
    except Exception as error:  # noqa: BLE001 - a failure is this measurement's result; the others run
        result = {"error": error_line(error)}
    free_memory(run.device)
    say(run, f"{label}: {summary(result)}")
    return result


def summary(result: dict) -> str:
    shown = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    return ", ".join(f"{k} {v}" for k, v in list(shown.items())[:6]) or "done"


def random_images(count: int, spatial_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 1, *spatial_size, generator=generator).to(device)


# --- 1. training steps -----------------------------------------------------------------------------


class StepProbe(L.Callback):
    """Seconds per full training batch (device work waited for); whether losses and gradients stay finite.

    Finiteness is kept as device flags and read after training: no host synchronisation inside a step.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.flags: list[torch.Tensor] = []

    @property
    def finite(self) -> bool:
        return all(bool(flag) for flag in self.flags)

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = self._now(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:  # finite when every gradient is (and none is too large to square in float32)
            self.flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = self._now(pl_module) - self.started  # after the config's callbacks (EMA) ran: listed last
        if len(batch["image"]) == trainer.datamodule.batch_size:  # an epoch's smaller last batch: not timed
            self.seconds.append(seconds)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.flags.append(torch.isfinite(loss.detach()).all())


def phantoms(dataset: str, run: Run) -> PhantomDataModule:
    """Random phantoms at the dataset's size, enough training images for its largest batch, one held out."""
    largest = max(run.batch(data_args(dataset, stage)["batch_size"]) for stage in STAGES)
    return PhantomDataModule(
        spatial_size=run.spatial_size(dataset), n_patients=largest + 1, val_fraction=0.01, batch_size=largest
    )


def train_stage(dataset: str, stage: str, data: PhantomDataModule, run: Run) -> dict:
    args = model_args(dataset, stage)
    if stage == "ae":  # with the adversarial term from the 2nd step on
        module = AutoencoderModule(**(args | {"adv_warmup_steps": 1}))
    elif stage == "simclr":
        module = SimCLRModule(**args)
    else:
        module = LatentDiffusionModule(**args, autoencoder_config=autoencoder_config(dataset))
    # One set of phantoms serves the three stages, each at its own batch size.
    data.batch_size = run.batch(data_args(dataset, stage)["batch_size"])
    probe = StepProbe()
    trainer = L.Trainer(
        accelerator="gpu" if run.device.type == "cuda" else "cpu", devices=1,
        precision=run.precision_of(dataset, stage), max_steps=run.train_steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*config_callbacks(dataset, stage), probe],
        default_root_dir=run.folder,
    )  # fmt: skip
    try:
        trainer.fit(module, data)
    finally:  # the next stage's peak must not include this trainer's optimizer states and EMA copy
        data.trainer = None
    timed = probe.seconds[1:] or probe.seconds  # the first step pays for allocation and kernel selection
    return {
        "batch_size": data.batch_size,
        "precision": run.precision_of(dataset, stage),
        "timed_steps": len(timed),
        "median_step_seconds": round(statistics.median(timed), 4),
        "peak_gib": peak_gib(run.device),
        "finite": probe.finite,
    }


def stage_measurements(dataset: str, run: Run) -> dict:
    """Every stage of one dataset's configs, trained for a few steps on one set of phantoms."""
    data = phantoms(dataset, run)
    result: dict[str, Any] = {"spatial_size": list(run.spatial_size(dataset))}
    for stage, key in STAGES.items():
        label = f"stages/{dataset}/{key}"
        result[key] = measure(run, "stages", label, train_stage, dataset, stage, data, run)
    return result


# --- 2. sampling ---------------------------------------------------------------------------------


def sampling_ldm(dataset: str, run: Run) -> LatentDiffusionModule:
    """The config's LDM with random weights, ready to sample at the run's size (latent scale factor 1).

    MONAI zero-initialises the UNet's last convolution of each residual block and its output, so a random
    UNet would predict zeros: those are initialised as PyTorch's defaults, so that the UNet's arithmetic
    (and its dependence on the batch) reaches the samples.
    """
    ldm = LatentDiffusionModule(**model_args(dataset, "ldm"), autoencoder_config=autoencoder_config(dataset))
    ldm.image_spatial_size = run.spatial_size(dataset)
    ldm.scale_factor.fill_(1.0)
    torch.manual_seed(0)
    for layer in ldm.unet.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() > 1 and not weight.any():
            layer.reset_parameters()
    return ldm.to(run.device).eval()


def time_sampling(
    ldm: LatentDiffusionModule,
    dataset: str,
    block_size: int,
    decode_size: int,
    run: Run,
    graphs: bool = False,
) -> dict:
    """`blocks_per_setting` blocks as `sample` draws them (the UNet loop, then the decoder), each part timed.

    Under deterministic kernels and the config's autocast, as a check runs. The first block pays for
    kernel selection (and, with `graphs`, for the capture); the figures are the mean over the others.
    """
    steps = run.inference_steps(read_config(dataset, "ldm")["memorization"]["num_inference_steps"])
    setting = {"sample_batch_size": block_size, "decode_batch_size": decode_size, "sampler_graphs": graphs}
    times, finite, where = [], True, "UNet loop"
    # `sample` is `decode_samples(denoise_indices(...))` per block: its two halves, timed apart.
    with torch.no_grad(), deterministic_kernels(), ldm.sampler_graphs() if graphs else nullcontext():
        try:
            for k in range(run.blocks_per_setting):
                clock, where = Stopwatch(run.device), "UNet loop"
                with run.autocast(dataset)():
                    latents = ldm.denoise_indices(
                        range(k * block_size, (k + 1) * block_size), 0, steps, "ddim", ldm.model_space_shape()
                    )
                    unet_seconds, where = clock.lap(), "decoder"
                    images = ldm.decode_samples(latents, decode_size)
                    decode_seconds = clock.lap()
                finite &= bool(torch.isfinite(images).all())
                times.append((unet_seconds, decode_seconds))
                del latents, images
        except torch.cuda.OutOfMemoryError as error:
            return setting | {
                "error": f"out of memory in the {where}: {error_line(error)}",
                "out_of_memory": where,
            }
    timed = times[1:] or times
    unet = statistics.mean(t[0] for t in timed) / block_size
    decode = statistics.mean(t[1] for t in timed) / block_size
    return setting | {
        "num_inference_steps": steps,
        "blocks": len(times),
        "seconds_per_sample": round(unet + decode, 5),
        "unet_seconds_per_sample": round(unet, 5),
        "decode_seconds_per_sample": round(decode, 5),
        "first_block_seconds": round(sum(times[0]), 3),
        "peak_gib": peak_gib(run.device),
        "finite": finite,
    }


def fastest(settings: list[dict]) -> dict | None:
    measured = [s for s in settings if "seconds_per_sample" in s]
    return min(measured, key=lambda s: s["seconds_per_sample"]) if measured else None


def speedup(before: dict, after: dict, key: str) -> float:
    return round(before[key] / after[key], 3)


def sampling_sweep(dataset: str, run: Run) -> dict:
    """Seconds per sample per block size (and decode batch size in 3D), then CUDA graphs at the fastest."""
    ldm = sampling_ldm(dataset, run)
    settings: list[dict] = []
    unet_limit = decode_limit = None  # the smallest batch at which the UNet, the decoder ran out of memory
    for block_size in run.block_sizes:
        decode_sizes = [block_size]
        if ldm.spatial_dims == 3 and run.small_decode_batch < block_size:
            decode_sizes.append(run.small_decode_batch)
        for decode_size in decode_sizes:
            setting = {"sample_batch_size": block_size, "decode_batch_size": decode_size}
            if unet_limit is not None:
                settings.append(setting | {"skipped": f"the UNet ran out of memory at {unet_limit}"})
                continue
            if decode_limit is not None and decode_size >= decode_limit:
                settings.append(setting | {"skipped": f"the decoder ran out of memory at {decode_limit}"})
                continue
            label = f"sampling/{dataset}/B{block_size}/decode{decode_size}"
            arguments = (ldm, dataset, block_size, decode_size, run)
            result = setting | measure(run, "sampling", label, time_sampling, *arguments)
            if result.get("out_of_memory") == "UNet loop":
                unet_limit = block_size
            elif result.get("out_of_memory") == "decoder":
                decode_limit = decode_size
            settings.append(result)
    eager = fastest(settings)
    graphs: dict = {"skipped": "no block size was measured"}
    if eager is not None:
        arguments = (ldm, dataset, eager["sample_batch_size"], eager["decode_batch_size"], run, True)
        graphs = measure(run, "sampling", f"sampling/{dataset}/graphs", time_sampling, *arguments)
        graphs["captured"] = run.device.type == "cuda"  # on a CPU sampler_graphs() changes nothing
        if "seconds_per_sample" in graphs:
            graphs["speedup_over_eager"] = speedup(eager, graphs, "seconds_per_sample")
            graphs["unet_speedup_over_eager"] = speedup(eager, graphs, "unet_seconds_per_sample")
    best = fastest([*settings, graphs] if graphs.get("captured") else settings)
    keys = ("sample_batch_size", "decode_batch_size", "sampler_graphs", "seconds_per_sample", "peak_gib")
    return {
        "spatial_size": list(ldm.image_spatial_size),
        "latent_shape": list(ldm.model_space_shape()),
        "precision": run.precision_of(dataset),
        "settings": settings,
        "graphs": graphs,
        "best": {k: best[k] for k in keys} if best else None,
    }


# --- 3. a check's cost against training ------------------------------------------------------------


def embed_seconds_per_sample(dataset: str, block_size: int, run: Run) -> float:
    """The config's embedder's `embed` of one block of random images, as a check embeds each block."""
    embedder = SimCLRModule(**model_args(dataset, "simclr")).to(run.device)
    images = random_images(block_size, run.spatial_size(dataset), run.device)
    with deterministic_kernels(), run.autocast(dataset)():
        embedder.embed(images)  # kernel selection
        clock = Stopwatch(run.device)
        embedder.embed(images)
        return clock.lap() / block_size


def measured_setting(sampling: dict, block_size: int, decode_batch_size: int, graphs: bool) -> dict | None:
    candidates = [*sampling.get("settings", []), sampling.get("graphs", {})]
    return next(
        (
            s
            for s in candidates
            if "seconds_per_sample" in s
            and (s["sample_batch_size"], s["decode_batch_size"], s["sampler_graphs"])
            == (block_size, decode_batch_size, graphs)
        ),
        None,
    )


def check_ratio(dataset: str, stages: dict, sampling: dict, run: Run) -> dict:
    """A check's estimated seconds over the training seconds between two checks, as set and at best."""
    ldm_step = stages.get("ldm", {})
    if "median_step_seconds" not in ldm_step:
        raise RuntimeError(f"no LDM step time: stages/{dataset}/ldm has {summary(ldm_step)}")
    memorization = read_config(dataset, "ldm")["memorization"]
    n_train, source = training_set_size(dataset)
    n_samples = memorization.get("n_samples") or n_train
    steps_per_epoch = math.ceil(n_train / ldm_step["batch_size"])
    epoch_seconds = ldm_step["median_step_seconds"] * steps_per_epoch
    training_seconds = epoch_seconds * memorization["every_n_epochs"]
    max_overhead = memorization.get("max_overhead", DEFAULT_MAX_OVERHEAD)
    embedding: dict[int, float] = {}

    def estimate(setting: dict | None) -> dict:
        if setting is None:
            return {"error": "this setting was not measured (see sampling)"}
        block_size = setting["sample_batch_size"]
        if block_size not in embedding:
            embedding[block_size] = embed_seconds_per_sample(dataset, block_size, run)
        check_seconds = n_samples * (setting["seconds_per_sample"] + embedding[block_size])
        return {
            "sample_batch_size": block_size,
            "decode_batch_size": setting["decode_batch_size"],
            "sampler_graphs": setting["sampler_graphs"],
            "sample_seconds_per_sample": setting["seconds_per_sample"],
            "embed_seconds_per_sample": round(embedding[block_size], 5),
            "check_seconds": round(check_seconds, 1),
            "ratio": round(check_seconds / training_seconds, 6),
            "every_n_epochs_within_max_overhead": math.ceil(check_seconds / (max_overhead * epoch_seconds)),
        }

    configured_block = run.batch(memorization["sample_batch_size"])
    configured = measured_setting(
        sampling,
        configured_block,
        run.batch(memorization.get("decode_batch_size") or memorization["sample_batch_size"]),
        bool(memorization.get("sampler_graphs", False)),
    )
    return {
        "n_train": n_train,
        "n_train_source": source,
        "n_samples": n_samples,
        "ldm_batch_size": ldm_step["batch_size"],
        "steps_per_epoch": steps_per_epoch,
        "every_n_epochs": memorization["every_n_epochs"],
        "ldm_step_seconds": ldm_step["median_step_seconds"],
        "training_seconds_between_checks": round(training_seconds, 1),
        "max_overhead": max_overhead,
        "config": estimate(configured),
        "best": estimate(sampling.get("best")),
    }


# --- 4. the same samples on any number of ranks ----------------------------------------------------


def invariance_probe(run: Run) -> dict:
    """The MRNet LDM's samples: each block alone, in ranks' runs of blocks, graphed, at two batch sizes."""
    dataset = "mrnet"
    ldm = sampling_ldm(dataset, run)
    memorization = read_config(dataset, "ldm")["memorization"]
    block_size = run.batch(memorization["sample_batch_size"])
    n = 3 * block_size + block_size // 2  # the last block padded, its padding dropped
    steps = run.inference_steps(memorization["num_inference_steps"])

    def draw(indices: range, batch_size: int = block_size) -> torch.Tensor:
        options = {
            "num_inference_steps": steps,
            "sample_batch_size": batch_size,
            "start_index": indices.start,
        }
        return ldm.sample(len(indices), seed=0, **options)

    def run_of_blocks(indices: range) -> list[torch.Tensor]:
        return list(blocks(draw, indices, block_size))

    result: dict[str, Any] = {"block_size": block_size, "n": n, "num_inference_steps": steps}
    with deterministic_kernels(), run.autocast(dataset)():
        alone = torch.cat([draw(range(k, k + block_size))[: n - k] for k in range(0, n, block_size)])
        result["shares"], result["blocks_alone_equal_runs"] = {}, {}
        for world_size in (1, 2, 3):
            shares = [block_shard(n, block_size, rank, world_size) for rank in range(world_size)]
            ranks = torch.cat([image for share in shares for image in run_of_blocks(share)])
            result["shares"][str(world_size)] = [[share.start, share.stop] for share in shares]
            result["blocks_alone_equal_runs"][str(world_size)] = torch.equal(ranks, alone)
        try:
            with ldm.sampler_graphs():
                graphed = torch.cat(run_of_blocks(range(n)))
            result["graphs"] = {
                "captured": run.device.type == "cuda",
                "equal_eager": torch.equal(graphed, alone),
                "max_abs_difference": float((graphed - alone).abs().max()),
            }
        except Exception as error:  # noqa: BLE001 - the other results stand without graphs
            result["graphs"] = {"error": error_line(error)}
        small, large = run.compared_batch_sizes
        indices = range(large)
        difference = (draw(indices, small) - draw(indices, large)).abs().max()
        result["batch_size_difference"] = {
            "sample_batch_sizes": [small, large],
            "max_abs_difference": float(difference),
            "note": "the same samples at two batch sizes (they differ on a GPU): why a check draws blocks",
        }
    result["finite"] = bool(torch.isfinite(alone).all())
    return result


# --- 5. the flip-invariant embedding's memory --------------------------------------------------------


def flip_memory(run: Run) -> dict:
    """Peak GiB and seconds of `embed` of 16 MRNet-size volumes, with the mirror orbit and without."""
    dataset = "mrnet"
    count = run.batch(16)
    images = random_images(count, run.spatial_size(dataset, "simclr"), run.device)
    result: dict[str, Any] = {"volumes": count, "spatial_size": list(images.shape[2:])}
    variants = {"plain": {}, "flip_invariant": {"flip_invariant": True, "standardize_input": True}}
    for name, options in variants.items():
        embedder = SimCLRModule(**(model_args(dataset, "simclr") | options)).to(run.device)
        with deterministic_kernels(), run.autocast(dataset, "simclr")():
            embedder.embed(images)  # kernel selection
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            clock = Stopwatch(run.device)
            embeddings = embedder.embed(images)
            seconds = clock.lap()
        result[name] = {
            "seconds": round(seconds, 4),
            "peak_gib": peak_gib(run.device),
            "finite": bool(torch.isfinite(embeddings).all()),
        }
        del embedder, embeddings
        free_memory(run.device)
    result["seconds_ratio"] = round(result["flip_invariant"]["seconds"] / result["plain"]["seconds"], 2)
    if run.device.type == "cuda":
        result["peak_ratio"] = round(result["flip_invariant"]["peak_gib"] / result["plain"]["peak_gib"], 2)
    return result


# --- the run -------------------------------------------------------------------------------------


def make_run(args: argparse.Namespace, folder: Path) -> Run:
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here: run it on a GPU, or pass --smoke (tiny, on a CPU)")
    return Run(
        device=device,
        smoke=args.smoke,
        train_steps=args.steps or (2 if args.smoke else 6),
        blocks_per_setting=2,
        block_sizes=(1, 2) if args.smoke else (4, 8, 16, 32),
        small_decode_batch=1 if args.smoke else 4,
        compared_batch_sizes=(1, 2) if args.smoke else (4, 16),
        precision=args.precision or ("32-true" if args.smoke else None),
        max_seconds=60 * args.max_minutes,
        folder=folder,
    )


def measure_all(run: Run) -> dict:
    results: dict[str, Any] = {}
    # A dataset whose configs train and sample the same networks at the same sizes as an earlier one's.
    measured_with = {
        dataset: next((other for other in REAL_DATA[:k] if same_measurements(dataset, other)), None)
        for k, dataset in enumerate(REAL_DATA)
    }

    def same_as(dataset: str) -> dict:
        note = f"{dataset}'s configs train and sample the same networks at the same sizes: measured once"
        return {"same_as": measured_with[dataset], "note": note}

    results["stages"] = {
        dataset: same_as(dataset)
        if measured_with[dataset]
        else measure(run, "stages", f"stages/{dataset}", stage_measurements, dataset, run)
        for dataset in REAL_DATA
    }
    results["sampling"] = {
        dataset: same_as(dataset)
        if measured_with[dataset]
        else measure(run, "sampling", f"sampling/{dataset}", sampling_sweep, dataset, run)
        for dataset in REAL_DATA
    }
    results["check_ratio"] = {
        "assumptions": [
            "one GPU; under DDP the training steps and a check's samples both divide by the number of GPUs",
            "steps per epoch = ceil(N_train / the LDM's batch_size); a check draws n_samples (N_train)",
            "a check's seconds = n_samples × (sampling + embedding seconds per sample); reference images are "
            "embedded once per fit; copy detection, MS-SSIM and gathering are left out (small beside those)",
            "the LDM step includes the config's callbacks (EMA), not validation or data loading",
            "a dataset whose stages say same_as takes that dataset's measurements, with its own N_train",
        ]
    }
    for dataset in REAL_DATA:
        source = measured_with[dataset] or dataset
        results["check_ratio"][dataset] = measure(
            run, "check_ratio", f"check_ratio/{dataset}", check_ratio, dataset,
            results["stages"][source], results["sampling"][source], run,
        )  # fmt: skip
    results["invariance"] = measure(run, "invariance", "invariance", invariance_probe, run)
    results["flip_memory"] = measure(run, "flip_memory", "flip_memory", flip_memory, run)
    return results


def json_safe(value: Any) -> Any:
    """NaN and infinities as strings: the output stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps and samples, on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--precision", default=None, help="default: the configs' (smoke: 32-true)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per stage (6; smoke 2)")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="the time budget of the run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        raise SystemExit(f"gpu_check: --out {args.out}: the folder {args.out.parent} does not exist")
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(sys.stderr):  # stdout: the JSON alone
        run = make_run(args, Path(tmp))
        figures: dict[str, Any] = {
            "settings": {
                "smoke": run.smoke,
                "device": str(run.device),
                "precision": run.precision or "each config's trainer precision",
                "train_steps": run.train_steps,
                "blocks_per_setting": run.blocks_per_setting,
                "block_sizes": list(run.block_sizes),
                "max_minutes": args.max_minutes,
            }
        }
        if run.device.type == "cuda":
            properties = torch.cuda.get_device_properties(run.device)
            figures["settings"] |= {
                "gpu": properties.name,
                "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
            }
        figures |= measure_all(run)
        figures["machine"] = describe_machine(("torch", "numpy", "lightning", "monai"))
        figures["seconds"] = round(run.elapsed(), 1)
    text = json.dumps(json_safe(figures), indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
