"""What a memorization check costs beside the training it watches, and what each sampling lever buys. One JSON.

    python bench/check_cost.py                                  # configs/phantom_ldm.yaml, this machine's device
    python bench/check_cost.py --config mrnet_ldm.yaml --spatial-size 64 64 16 --n-samples 8   # a 3D config, smaller

Builds the config's LDM over an autoencoder of its `*_ae.yaml` model section and the embedder of its
`*_simclr.yaml` (random weights: the time of a forward pass does not depend on them), on phantoms of
the config's data section. In one process, one after the other, best of `--repeats`:

- `training`: seconds per LDM training step (forward, backward, Adam) at the config's batch, and the
  training seconds between two checks (steps per epoch × `every_n_epochs`; an epoch of the phantoms
  is N_train / batch steps);
- `check`: a check of N_train samples (the paper's N_syn = N_train) at the config's `memorization:`
  settings, split into the UNet loop, decoding, embedding, copy detection and quality (MS-SSIM + FD);
- `levers`: the sampling of that check redone with one lever changed at a time: the loop as it was
  before (timesteps on the device, each read back with `int(t)` at every step), `decode_batch_size`
  4 and 1, `sampler_graphs` (CUDA graphs; on a CPU the same code as without), `sample_batch_size`
  4 / 8 / 16 / 32 (seconds per sample), and deterministic kernels off;
- `ratio`: check seconds ÷ training seconds between checks, before (the old loop) and after.

On a CPU most levers change nothing: they remove GPU costs (a read-back per step waits for the GPU;
kernel launches are what a graph saves). The CPU figure shows where a check's time goes.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from bench.random_ldm import best_of, config, cost_arguments, random_ldm, training_step_seconds  # noqa: E402
from memwatch.lightning_modules import LatentDiffusionModule, SimCLRModule  # noqa: E402
from memwatch.lightning_modules.diffusion import sample_generator  # noqa: E402
from memwatch.memorization import detect_copies, frechet_distance  # noqa: E402
from memwatch.memorization.quality import ms_ssim_diversity  # noqa: E402
from memwatch.memorization.stream import blocks, deterministic_kernels  # noqa: E402


def old_denoise(model: LatentDiffusionModule, indices: range, steps: int) -> torch.Tensor:
    """The sampling loop before this change: timesteps on the device, each read back with int(t) at every step."""
    scheduler = model.make_scheduler("ddim")
    scheduler.set_timesteps(num_inference_steps=steps, device=model.device)
    shape = model.model_space_shape()
    x = torch.stack([torch.randn(shape, generator=sample_generator(0, i)) for i in indices]).to(model.device)
    for t in scheduler.timesteps:
        timesteps = torch.full((x.shape[0],), int(t), device=model.device, dtype=torch.long)
        prediction = model.unet(x, timesteps=timesteps).float()
        x, _ = scheduler.step(prediction, int(t), x)
    return x


def main() -> None:
    parser = cost_arguments(__doc__, train_steps=10)
    parser.add_argument("--n-samples", type=int, help="samples per check (default: N_train of the phantoms)")
    args = parser.parse_args()
    device = torch.device(args.device)
    built = random_ldm(args.config, device, args.spatial_size)
    model, data, stem = built.model, built.data, built.stem
    memorization = built.ldm_config["memorization"]
    embedder_args = config(f"{stem}_simclr.yaml")["model"]["init_args"]
    embedder = SimCLRModule(**embedder_args).to(device).eval()

    images = next(iter(data.train_dataloader()))["image"].to(device)
    step_seconds = training_step_seconds(model, images, args.train_steps)
    n_train = len(data.train_ids)
    steps_per_epoch = -(-n_train // built.batch_size)
    between_checks = step_seconds * steps_per_epoch * memorization["every_n_epochs"]

    n = args.n_samples or n_train
    steps = memorization["num_inference_steps"]
    block = memorization["sample_batch_size"]
    decode = memorization.get("decode_batch_size") or block
    model.eval()
    reference = embedder.embed(torch.stack([data.reference_dataset("train")[i]["image"] for i in range(n_train)]).to(device))
    held_out = embedder.embed(torch.stack([d["image"] for d in data.reference_dataset("val")]).to(device))

    def sample_all(block_size: int = block, decode_size: int = decode, graphs: bool = False) -> list[torch.Tensor]:
        context = model.sampler_graphs() if graphs else nullcontext()
        with torch.no_grad(), context:
            draw = lambda r: model.sample(  # noqa: E731
                len(r), seed=0, num_inference_steps=steps, sample_batch_size=block_size, start_index=r.start,
                decode_batch_size=decode_size,
            )
            return list(blocks(draw, range(n), block_size))

    def unet_only(block_size: int = block) -> None:
        with torch.no_grad():
            for start in range(0, n, block_size):
                model.denoise_indices(
                    range(start, start + block_size), 0, steps, "ddim", model.model_space_shape()
                )

    def old_unet_only() -> None:
        with torch.no_grad():
            for start in range(0, n, block):
                old_denoise(model, range(start, start + block), steps)

    with deterministic_kernels():
        samples = torch.cat(sample_all())
        seconds = {
            "sampling": best_of(args.repeats, device, sample_all),
            "unet_loop": best_of(args.repeats, device, unet_only),
        }
        seconds["decode"] = max(0.0, seconds["sampling"] - seconds["unet_loop"])
        with torch.no_grad():
            seconds["embed"] = best_of(args.repeats, device, lambda: [embedder.embed(b) for b in samples.split(block)])
            syn = embedder.embed(samples)
            seconds["detect"] = best_of(args.repeats, device, lambda: detect_copies(reference, held_out, syn))
            pairs = len(samples) - len(samples) % 2
            seconds["quality"] = best_of(
                args.repeats, device,
                lambda: (ms_ssim_diversity(samples[0:pairs:2], samples[1:pairs:2]), frechet_distance(syn, held_out)),
            )  # fmt: skip
        check = seconds["sampling"] + seconds["embed"] + seconds["detect"] + seconds["quality"]
        old_sampling = best_of(args.repeats, device, old_unet_only) + seconds["decode"]
        levers = {
            "loop_before (int(t) per step)": old_sampling,
            "loop_after": seconds["sampling"],
            "decode_batch_size 4": best_of(args.repeats, device, lambda: sample_all(decode_size=4)),
            "decode_batch_size 1": best_of(args.repeats, device, lambda: sample_all(decode_size=1)),
            "sampler_graphs": best_of(args.repeats, device, lambda: sample_all(graphs=True)),
        }
        per_sample = {}
        for size in (4, 8, 16, 32):
            per_sample[size] = best_of(args.repeats, device, lambda s=size: sample_all(block_size=s)) / n
    with torch.no_grad():
        levers["deterministic kernels off"] = best_of(args.repeats, device, sample_all)
    before = old_sampling + seconds["embed"] + seconds["detect"] + seconds["quality"]
    result = {
        "config": args.config,
        "device": str(device),
        "spatial_size": list(data.spatial_size),
        "n_train": n_train,
        "n_samples": n,
        "num_inference_steps": steps,
        "sample_batch_size": block,
        "decode_batch_size": decode,
        "training": {
            "step_seconds": round(step_seconds, 4),
            "steps_per_epoch": steps_per_epoch,
            "every_n_epochs": memorization["every_n_epochs"],
            "seconds_between_checks": round(between_checks, 2),
        },
        "check": {
            "seconds": round(check, 3),
            "share": {key: round(value / check, 4) for key, value in seconds.items() if key != "sampling"},
        },
        "levers_seconds": {key: round(value, 3) for key, value in levers.items()},
        "sampling_seconds_per_sample_by_block": {size: round(value, 4) for size, value in per_sample.items()},
        "ratio": {"before": round(before / between_checks, 4), "after": round(check / between_checks, 4)},
        "machine": describe_machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
