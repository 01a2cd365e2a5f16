"""Audit reports: the files a person reads before sharing synthetic data, written all at once or not at all.

`write_report` turns a `CopyReport` into `summary.json`, `pairs.csv`, `train_nn.csv`,
`histogram.png`, (when given pixels) `copies.png`, and `report.html` (all of it on one page).
They are written into a staging folder (`memorization.output_folders.staged_outputs`) that moves
into place only when everything in it is written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from memwatch.memorization.detect import CopyReport  # noqa: E402
from memwatch.memorization.html_report import ImageLookup, write_html_report  # noqa: E402
from memwatch.memorization.stats import memorized_patients  # noqa: E402

REPORT_FILES = ("summary.json", "pairs.csv", "train_nn.csv", "histogram.png", "copies.png", "report.html")


def write_report(
    folder: str | Path,
    report: CopyReport,
    train_ids: Sequence[str],
    syn_ids: Sequence[str],
    summary: Mapping[str, Any] | None = None,
    train_image: ImageLookup | None = None,
    syn_image: ImageLookup | None = None,
    max_pairs: int = 16,
    train_patients: Sequence[str] | None = None,
) -> list[Path]:
    """Write the audit files of `report` into `folder`; returns their paths.

    Args:
        report: from `detect_copies(train, val, syn)`.
        train_ids, syn_ids: the id of each row of `train` and of `syn`.
        summary: extra entries for `summary.json` (`memorization.summary.headline`, inputs, quality metrics).
        train_image, syn_image: row index → image `[C, *spatial]`; with both, `copies.png`
            shows each of the `max_pairs` most similar copies beside its training image
            (the middle slice of the last axis for 3D), and `report.html` shows them too (three
            planes for 3D). Without them no patient pixels are written.
        train_patients: the patient of each row of `train` (default: each image its own patient).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(train_ids) != len(report.nn_val_corr) or len(syn_ids) != len(report.nn_train_corr):
        raise ValueError(
            f"{len(train_ids)} training / {len(syn_ids)} synthetic ids for a report on "
            f"{len(report.nn_val_corr)} / {len(report.nn_train_corr)} samples"
        )
    patients = list(train_patients) if train_patients is not None else list(train_ids)
    if len(patients) != len(train_ids):
        raise ValueError(f"{len(patients)} patient ids for {len(train_ids)} training images")
    summary_file = _write_summary(
        folder / "summary.json", report, train_ids, syn_ids, patients, summary or {}
    )
    histogram = _plot_histogram(folder / "histogram.png", report)
    written = [
        summary_file,
        _write_pairs(folder / "pairs.csv", report, train_ids, syn_ids, patients),
        _write_train_nn(folder / "train_nn.csv", report, train_ids, syn_ids, patients),
        histogram,
    ]
    with_images = train_image is not None and syn_image is not None
    if with_images:
        written.append(
            _plot_copies(folder / "copies.png", report, train_ids, syn_ids, train_image, syn_image, max_pairs)
        )
    page = write_html_report(
        folder / "report.html", report, train_ids, syn_ids, patients,
        json.loads(summary_file.read_text()), histogram.read_bytes(),
        shown=copy_order(report)[:max_pairs] if with_images else (),
        train_image=train_image, syn_image=syn_image,
    )  # fmt: skip
    return [*written, page]


def copy_order(report: CopyReport) -> list[int]:
    """Rows of the synthetic copies, most similar to their training sample first."""
    copies = torch.nonzero(report.is_copy).flatten()
    order = torch.argsort(report.nn_train_corr[copies], descending=True, stable=True)
    return copies[order].tolist()


def _write_summary(
    path: Path, report: CopyReport, train_ids, syn_ids, patients, extra: Mapping[str, Any]
) -> Path:
    memorized = torch.nonzero(report.memorized).flatten().tolist()
    summary = {
        "n_train": len(train_ids),
        "n_syn": len(syn_ids),
        **report.scalars(),
        "percentile": report.percentile,
        "rule": report.rule,
        "margin": report.margin,
        **extra,
        "memorized_train_ids": [train_ids[i] for i in memorized],
        "memorized_patient_ids": memorized_patients(report.memorized, patients),
        "copy_syn_ids": [syn_ids[j] for j in copy_order(report)],
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _write_pairs(path: Path, report: CopyReport, train_ids, syn_ids, patients) -> Path:
    """One row per synthetic sample; `other_patient_correlation` (ρ2) is empty under the paper's rule, which
    does not compute it, and -1 where no other patient exists; `is_copy` follows `report.rule`."""
    other = report.nn_other_patient_corr
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([
            "synthetic_id", "nearest_train_id", "nearest_train_patient_id", "correlation",
            "other_patient_correlation", "is_copy",
        ])  # fmt: skip
        for j, syn_id in enumerate(syn_ids):
            nearest = int(report.nn_train_index[j])
            writer.writerow([
                syn_id, train_ids[nearest], patients[nearest], f"{float(report.nn_train_corr[j]):.6f}",
                "" if other is None else f"{float(other[j]):.6f}", bool(report.is_copy[j]),
            ])  # fmt: skip
    return path


def _write_train_nn(path: Path, report: CopyReport, train_ids, syn_ids, patients) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "train_id",
                "patient_id",
                "nearest_val_correlation",
                "nearest_synthetic_id",
                "nearest_synthetic_correlation",
                "memorized",
            ]
        )
        for i, train_id in enumerate(train_ids):
            writer.writerow([
                train_id,
                patients[i],
                f"{float(report.nn_val_corr[i]):.6f}",
                syn_ids[int(report.nn_syn_index[i])],
                f"{float(report.nn_syn_corr[i]):.6f}",
                bool(report.memorized[i]),
            ])  # fmt: skip
    return path


def _plot_histogram(path: Path, report: CopyReport) -> Path:
    figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    values = torch.cat([report.nn_val_corr, report.nn_syn_corr]).numpy()
    bins = np.linspace(min(float(values.min()), report.tau) - 1e-3, 1.0, 41)
    axes.hist(report.nn_val_corr.numpy(), bins=bins, alpha=0.6, label="ρ NN-val (train → nearest held-out)")
    axes.hist(report.nn_syn_corr.numpy(), bins=bins, alpha=0.6, label="ρ NN-syn (train → nearest synthetic)")
    axes.axvline(
        report.tau,
        color="black",
        linestyle="--",
        label=f"τ = {report.tau:.3f} ({report.percentile:g}th pct.)",
    )
    axes.set_xlabel("Pearson correlation of embeddings")
    axes.set_ylabel("training samples")
    axes.set_title(f"{report.n_mem} of {len(report.nn_val_corr)} training samples memorized")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def viewable(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """`[C, H, W]` or `[C, H, W, D]` → the `[H, W]` picture a person looks at (first channel, middle slice)."""
    array = (
        image.detach().cpu().float().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, dtype=np.float32)
    )
    array = array[0]
    if array.ndim == 3:
        array = array[..., array.shape[-1] // 2]
    return array


def _plot_copies(path: Path, report, train_ids, syn_ids, train_image, syn_image, max_pairs: int) -> Path:
    rows = copy_order(report)[:max_pairs]
    if not rows:
        figure, axes = plt.subplots(figsize=(4, 1.5), layout="constrained")
        axes.axis("off")
        axes.text(0.5, 0.5, f"no copies at τ = {report.tau:.3f}", ha="center", va="center")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
    columns = 2 * min(4, len(rows))
    lines = -(-len(rows) // (columns // 2))
    figure, grid = plt.subplots(
        lines, columns, figsize=(1.8 * columns, 2.1 * lines), squeeze=False, layout="constrained"
    )
    for axes in grid.flat:
        axes.axis("off")
    per_line = columns // 2
    for k, j in enumerate(rows):
        i = int(report.nn_train_index[j])
        left, right = grid[k // per_line, 2 * (k % per_line)], grid[k // per_line, 2 * (k % per_line) + 1]
        left.imshow(viewable(train_image(i)), cmap="gray", vmin=0, vmax=1)
        left.set_title(f"train {train_ids[i]}", fontsize=7)
        right.imshow(viewable(syn_image(j)), cmap="gray", vmin=0, vmax=1)
        right.set_title(f"{syn_ids[j]} ρ={float(report.nn_train_corr[j]):.3f}", fontsize=7)
    figure.suptitle(
        f"training image | synthetic copy ({len(rows)} most similar of {report.n_copies})", fontsize=9
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
