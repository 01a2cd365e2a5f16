"""What one membership evaluation costs beside the training epoch and the validation pass. One JSON.

    python bench/membership_cost.py                                   # configs/phantom_ldm.yaml, this machine's device
    python bench/membership_cost.py --config mrnet_ldm.yaml --spatial-size 64 64 16   # a 3D config, smaller

Builds the config's LDM over an autoencoder of its `*_ae.yaml` model section (random weights: the time
of a forward pass does not depend on them) on phantoms of the config's data section, and times, best
of `--repeats`, in one process:

- `epoch`: a training epoch (steps per epoch × one LDM step, forward, backward and Adam, at the
  config's batch);
- `validation`: one validation pass (`validation_step`'s loss on every held-out image, in batches of
  the config's batch size);
- `membership`: one evaluation as the callback runs it (`memorization.pipeline.score_membership`: the
  held-out images and as many training images, one UNet forward each, in blocks of the config's
  `memorization.sample_batch_size`), and the AUC.

`ratio` gives membership ÷ validation (target ≤ 1) and membership ÷ epoch; `overhead` the share of
the training time at the config's `membership.every_n_epochs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from bench.random_ldm import best_of, cost_arguments, random_ldm, training_step_seconds  # noqa: E402
from memwatch.memorization.pipeline import Placement, score_membership  # noqa: E402
from memwatch.memorization.stream import deterministic_kernels  # noqa: E402


def main() -> None:
    args = cost_arguments(__doc__, train_steps=5).parse_args()
    device = torch.device(args.device)
    built = random_ldm(args.config, device, args.spatial_size)
    model, data, batch_size = built.model, built.data, built.batch_size
    memorization = built.ldm_config["memorization"]
    images = next(iter(data.train_dataloader()))["image"].to(device)
    step_seconds = training_step_seconds(model, images, args.train_steps)
    n_train, n_val = len(data.train_ids), len(data.val_ids)
    steps_per_epoch = -(-n_train // batch_size)
    epoch_seconds = step_seconds * steps_per_epoch
    train, val = data.reference_dataset("train"), data.reference_dataset("val")

    def validation_pass() -> None:
        model.eval()
        with torch.no_grad():
            for start in range(0, n_val, batch_size):
                held_out = torch.stack(
                    [val[i]["image"] for i in range(start, min(start + batch_size, n_val))]
                )
                generator = torch.Generator().manual_seed(start)
                model.diffusion_loss(model.to_model_space(held_out.to(device)), generator=generator)
        model.train()

    evaluation = {}

    def membership() -> None:
        evaluation["last"] = score_membership(
            train, val, model.membership_scores, memorization["sample_batch_size"], Placement(device)
        )

    with deterministic_kernels():
        validation_seconds = best_of(args.repeats, device, validation_pass)
        membership_seconds = best_of(args.repeats, device, membership)
    every = (built.ldm_config.get("membership") or {}).get("every_n_epochs", 1)
    signal = evaluation["last"].signal
    result = {
        "config": args.config,
        "device": str(device),
        "spatial_size": list(data.spatial_size),
        "n_train": n_train,
        "n_val": n_val,
        "scored": {"train": signal.n_members, "held_out": signal.n_non_members},
        "batch_size": batch_size,
        "sample_batch_size": memorization["sample_batch_size"],
        "seconds": {
            "training_step": round(step_seconds, 4),
            "epoch": round(epoch_seconds, 4),
            "validation_pass": round(validation_seconds, 4),
            "membership": round(membership_seconds, 4),
        },
        "ratio": {
            "membership_over_validation": round(membership_seconds / validation_seconds, 3),
            "membership_over_epoch": round(membership_seconds / epoch_seconds, 3),
        },
        "membership_every_n_epochs": every,
        "overhead": round(membership_seconds / (epoch_seconds * every), 3),
        "machine": describe_machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
