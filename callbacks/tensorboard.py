"""The callback's TensorBoard extras: one custom-scalars page, the two correlation histograms, copy pairs.

Scalars go to every logger through `log_metrics`; these need TensorBoard's own writer and do
nothing for other loggers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from memwatch.memorization.detect import CopyReport
from memwatch.memorization.report import viewable

# One TensorBoard page (the CUSTOM SCALARS tab) with memorization (copies and the membership signal)
# next to the quality metrics that do not see it (the paper's over-training finding) and the loss.
TENSORBOARD_LAYOUT = {
    "memwatch": {
        "memorized training samples (N_mem) and copies (N_copies)": [
            "Multiline",
            ["memorization/n_mem", "memorization/n_copies"],
        ],
        "fraction memorized and fraction of copies": [
            "Multiline",
            ["memorization/frac_mem", "memorization/frac_copies"],
        ],
        "fraction of training patients memorized, 95% interval": [
            "Margin",
            [
                "memorization/frac_mem_patients",
                "memorization/frac_mem_patients_low",
                "memorization/frac_mem_patients_high",
            ],
        ],
        "fraction memorized above chance (excess) and chance level": [
            "Multiline",
            ["memorization/excess_frac_mem", "memorization/null_frac_mem", "memorization/frac_mem"],
        ],
        "membership AUC, training vs held-out images (Mann-Whitney, DeLong 95% interval)": [
            "Margin",
            [
                "memorization/membership_auc",
                "memorization/membership_auc_low",
                "memorization/membership_auc_high",
            ],
        ],
        "membership AUC and its control (two halves of the training images: no membership)": [
            "Multiline",
            ["memorization/membership_auc", "memorization/membership_auc_control"],
        ],
        "training images scored above the held-out 95th percentile (TPR at 5% FPR)": [
            "Multiline",
            ["memorization/membership_tpr_at_5fpr"],
        ],
        "Fréchet distance in embedder space (synthetic vs validation)": ["Multiline", ["memorization/fd"]],
        "MS-SSIM between synthetic samples (lower: more diverse)": ["Multiline", ["memorization/ms_ssim"]],
        "threshold τ": ["Multiline", ["memorization/tau"]],
        "cost: a check's seconds, and its share of the training time since the previous check": [
            "Multiline",
            ["memorization/check_seconds", "memorization/overhead"],
        ],
        "loss": ["Multiline", ["train/loss", "val/loss"]],
    }
}


def tensorboard_writers(trainer: Trainer) -> list:
    """The `SummaryWriter` of every TensorBoard logger of the trainer."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def add_layout(trainer: Trainer) -> None:
    """The custom-scalars page (`TENSORBOARD_LAYOUT`); rank 0 only, as every write."""
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(TENSORBOARD_LAYOUT)


def log_histograms(trainer: Trainer, report: CopyReport, prefix: str = "memorization/") -> None:
    """ρ_NN-val and ρ_NN-syn of every training image, as histograms at this step."""
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(f"{prefix}rho_nn_val", report.nn_val_corr.cpu(), trainer.global_step)
        writer.add_histogram(f"{prefix}rho_nn_syn", report.nn_syn_corr.cpu(), trainer.global_step)


def log_copy_pairs(
    trainer: Trainer,
    report: CopyReport,
    copies: dict[int, torch.Tensor],
    training_image: Callable[[int], torch.Tensor],
    prefix: str = "memorization/",
) -> None:
    """The shown copies beside their nearest training images, `[pairs, 1, H, 2W]` (training image | copy)."""
    if not copies:
        return
    pairs = []
    for j, copy in copies.items():
        train = torch.from_numpy(viewable(training_image(int(report.nn_train_index[j]))))
        pairs.append(torch.cat([train, torch.from_numpy(viewable(copy))], dim=1).clamp(0, 1))
    for writer in tensorboard_writers(trainer):
        writer.add_images(
            f"{prefix}copies", torch.stack(pairs)[:, None], trainer.global_step, dataformats="NCHW"
        )
