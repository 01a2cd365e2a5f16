"""`make demo`: the three-stage workflow on the built-in phantoms, through the real CLI.

autoencoder → embedder → latent diffusion, each `python cli.py fit --config configs/phantom_*.yaml`,
then a grid of generated samples beside real training images, saved as a PNG, and
`python cli.py audit` of the trained LDM, which writes the report and the shareable samples.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memwatch.datamodules import PhantomDataModule  # noqa: E402
from memwatch.lightning_modules import LatentDiffusionModule  # noqa: E402
from memwatch.memorization.history import read_history  # noqa: E402
from scripts.launch import fit, run_cli  # noqa: E402

console = Console()


def train(config: str, version: str, *extra: str) -> Path:
    """Run one stage through the CLI into `runs/CONFIG/VERSION/`, its output on the terminal; return its last
    checkpoint."""
    console.rule(f"[bold]{config}")
    console.print(f"cli.py fit --config configs/{config}.yaml --trainer.logger.init_args.version {version} "
                  + " ".join(extra), style="dim")  # fmt: skip
    run = fit(config, *extra, save_dir=ROOT / "runs", name=config, version=version, show=True, check=True)
    console.print(f"{config}: {run.seconds:.0f} s")
    return run.log_dir / "checkpoints" / "last.ckpt"


def audit(*args: str) -> None:
    """`python cli.py audit ARGS`, its output on the terminal."""
    console.print("cli.py audit " + " ".join(args), style="dim")
    run_cli("audit", *args, show=True, check=True)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 4) -> None:
    """`[N, 1, H, W]` in [0, 1] → one PNG, `columns` images per row, enlarged `scale` times."""
    images = images[:, 0].cpu().numpy()
    rows = -(-len(images) // columns)
    height, width = images.shape[1:]
    canvas = np.ones((rows * (height + 2), columns * (width + 2)), dtype=np.float32)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        canvas[r * (height + 2) : r * (height + 2) + height, c * (width + 2) : c * (width + 2) + width] = image
    picture = Image.fromarray((canvas * 255).round().astype(np.uint8))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def print_history(run_dir: Path) -> None:
    """The memorization checks of the LDM run as a table: per patient, with 95% intervals and chance level."""
    rows = read_history(run_dir)
    table = Table(title="Memorized training patients and copies during LDM training (N_syn = N_train)")
    columns = ("step", "patients", "95% CI", "chance", "copies", "95% CI", "τ", "FD", "MS-SSIM")
    for column in columns:
        table.add_column(column, justify="right")

    def share(row: dict, count: str, total: int, fraction: str) -> tuple[str, str]:
        low, high = row[f"{fraction}_ci"]
        return f"{row[count]}/{total}", f"{100 * low:.0f}–{100 * high:.0f}%"

    for row in rows:
        table.add_row(
            str(row["step"]), *share(row, "n_mem_patients", row["n_train_patients"], "frac_mem_patients"),
            f"{row['null_frac_mem_patients']:.0%}",
            *share(row, "n_copies", row["n_syn"], "frac_copies"), f"{row['tau']:.3f}",
            f"{row['fd']:.3g}", f"{row['ms_ssim']:.3f}",
        )  # fmt: skip
    console.print("chance: the share of patients a model that copies no one would score here "
                  "(memwatch.memorization.chance). FD (Fréchet distance of synthetic vs validation embeddings) and MS-SSIM "
                  "(between samples) are the quality metrics that, in the paper, do not reveal memorization.")
    console.print(table)


def main() -> None:
    version = datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    autoencoder = train("phantom_ae", version)
    embedder = train("phantom_simclr", version)
    ldm_ckpt = train(
        "phantom_ldm", version,
        "--model.init_args.autoencoder_ckpt", str(autoencoder),
        "--memorization.embedder_ckpt", str(embedder),
    )  # fmt: skip
    print_history(ldm_ckpt.parents[1])

    console.rule("[bold]samples")
    ldm = LatentDiffusionModule.from_checkpoint(ldm_ckpt, "ldm_ckpt")
    samples = ldm.sample(16, seed=0)
    data_args = torch.load(ldm_ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    data = PhantomDataModule(**{k: v for k, v in data_args.items() if not k.startswith("_")})
    training = torch.cat([batch["image"] for batch in data.reference_dataloader("train")])[:16]
    grid = ROOT / "runs" / "phantom_ldm" / version / "samples.png"
    save_grid(torch.cat([samples, training]), grid)
    console.print(f"Samples (top two rows) and training patients (bottom two rows): [bold]{grid}")

    console.rule("[bold]audit before sharing")
    out = ROOT / "runs" / "phantom_audit" / version
    audit("--embedder", str(embedder), "--data", "configs/phantom_ldm.yaml", "--ldm", str(ldm_ckpt), "--seed", "1",
          "--out", str(out / "report"), "--release-dir", str(out / "shareable"))  # fmt: skip
    console.print(f"Report: [bold]{out / 'report' / 'report.html'}[/bold] (open it in a browser; summary.json, "
                  f"pairs.csv, copies.png beside it); the samples that are not copies, with manifest.json: "
                  f"[bold]{out / 'shareable'}")
    run_cli("audit", "--verify-release", str(out / "shareable"), show=True, check=True)
    console.print(f"Whole demo: {time.perf_counter() - started:.0f} s")
    console.print("TensorBoard logs: [bold]tensorboard --logdir runs[/bold]  (then open http://localhost:6006)")


if __name__ == "__main__":
    main()
