"""The figures of docs/RESULTS.md: one per finding, each from the runs' checks, with 95% intervals, and the
membership AUC beside N_mem where the runs have a membership history.

Small PNGs (80 dpi), since they are committed to docs/figures/.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from scripts.reproduce_runs import Check, Findings, Run  # noqa: E402

plt.rcParams.update({"axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8})

COLOURS = {"mem": "tab:red", "copies": "tab:purple", "plain": "tab:blue", "augmented": "tab:orange",
           "membership": "tab:green", "control": "tab:gray"}  # fmt: skip


def _band(axis, checks: Sequence[Check], key: str, colour: str, label: str, style: str = "-") -> None:
    steps = [c.step for c in checks]
    axis.plot(steps, [getattr(c, key) for c in checks], style, color=colour, label=label, marker=".")
    if style == "-":
        cis = [getattr(c, f"{key}_ci") for c in checks]
        axis.fill_between(
            steps, [lo for lo, _ in cis], [hi for _, hi in cis], color=colour, alpha=0.15, linewidth=0
        )


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_over_training(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for k, run in enumerate(findings.over_training):
        style = "-" if k == 0 else ":"
        _band(
            axes[0],
            run.history,
            "frac_mem",
            COLOURS["mem"],
            f"memorized (N_mem/N_train), seed {run.seed}",
            style,
        )
        _band(
            axes[0],
            run.history,
            "frac_copies",
            COLOURS["copies"],
            f"copies (N_copies/N_syn), seed {run.seed}",
            style,
        )
        for axis, key in ((axes[1], "fd"), (axes[2], "ms_ssim")):
            axis.plot([c.step for c in run.history], [getattr(c, key) for c in run.history], style, marker=".",
                      color="black", label=f"seed {run.seed}")  # fmt: skip
    axes[0].set(title=f"memorization (N_train = {findings.over_training[0].n_train}), 95% bands",
                xlabel="LDM training step", ylabel="fraction", ylim=(0, 1))  # fmt: skip
    axes[0].legend(fontsize=7)
    axes[1].set(title="FD, embedder space (syn vs val)", xlabel="LDM training step")
    axes[2].set(title="MS-SSIM between samples", xlabel="LDM training step")
    for axis in axes[1:]:
        axis.legend(fontsize=7)
    return _save(figure, path)


def plot_augmentation(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    for plain, augmented in zip(findings.over_training, findings.augmented, strict=True):
        for run, key in ((plain, "plain"), (augmented, "augmented")):
            label = f"{'with' if run.augment else 'without'} augmentation, seed {run.seed}"
            axes[0].plot([c.step for c in run.history], [c.frac_mem for c in run.history],
                         "-" if run.seed == findings.over_training[0].seed else ":", marker=".",
                         color=COLOURS[key], label=label)  # fmt: skip
    axes[0].set(
        title="memorized fraction over training",
        xlabel="LDM training step",
        ylabel="N_mem / N_train",
        ylim=(0, 1),
    )
    axes[0].legend(fontsize=7)
    width = 0.38
    for k, (plain, augmented) in enumerate(zip(findings.over_training, findings.augmented, strict=True)):
        for offset, run, key in ((-width / 2, plain, "plain"), (width / 2, augmented, "augmented")):
            low, high = run.last.frac_mem_ci
            axes[1].bar(k + offset, run.last.frac_mem, width, color=COLOURS[key],
                        yerr=[[run.last.frac_mem - low], [high - run.last.frac_mem]], capsize=3,
                        label=("with" if run.augment else "without") + " augmentation" if k == 0 else None)  # fmt: skip
    axes[1].set_xticks(range(len(findings.augmented)), [f"seed {r.seed}" for r in findings.augmented])
    axes[1].set(
        title=f"last check (step {findings.augmented[0].last.step}), 95% CI",
        ylim=(0, 1),
        ylabel="N_mem / N_train",
    )
    axes[1].legend(fontsize=7)
    return _save(figure, path)


def plot_training_size(findings: Findings, path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    sizes = [r.n_train for r in findings.by_size]
    for key, label in (
        ("frac_mem", "memorized (N_mem / N_train)"),
        ("frac_copies", "copies (N_copies / N_syn)"),
    ):
        values = [getattr(r.last, key) for r in findings.by_size]
        cis = [getattr(r.last, f"{key}_ci") for r in findings.by_size]
        axes[0].errorbar(sizes, values, yerr=[[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                                              [hi - v for v, (_, hi) in zip(values, cis, strict=True)]],
                         marker="o", capsize=3, color=COLOURS["mem" if key == "frac_mem" else "copies"], label=label)  # fmt: skip
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(sizes, [str(n) for n in sizes])
    axes[0].set(title=f"last check (step {findings.by_size[0].last.step}), 95% CI", xlabel="training patients (N_train)",
                ylabel="fraction", ylim=(0, 1))  # fmt: skip
    axes[0].legend(fontsize=7)
    for run in findings.by_size:
        axes[1].plot(
            [c.step for c in run.history],
            [c.frac_mem for c in run.history],
            marker=".",
            label=f"N_train = {run.n_train}",
        )
    axes[1].set(
        title="memorized fraction over training",
        xlabel="LDM training step",
        ylabel="N_mem / N_train",
        ylim=(0, 1),
    )
    axes[1].legend(fontsize=7)
    return _save(figure, path)


def _style(run: Run, k: int) -> str:
    """The line of the `k`-th run of a figure: the first solid (with its bands), later seeds dotted, the demo dashed."""
    return "-" if k == 0 else "--" if run.demo else ":"


def plot_membership(findings: Findings, path: Path) -> Path:
    """Per step, the membership AUC (95% band) and its control on the left axis, N_mem / N_train at the checks on
    the right."""
    figure, auc_axis = plt.subplots(figsize=(8, 4.8))
    mem_axis = auc_axis.twinx()
    runs = findings.with_membership
    for k, run in enumerate(runs):
        style = _style(run, k)
        points = run.membership
        _band(auc_axis, points, "auc", COLOURS["membership"], f"membership AUC, {run.label}", style)
        auc_axis.plot([p.step for p in points], [p.auc_control for p in points], style, color=COLOURS["control"],
                      label=f"control AUC (training halves), {run.label}")  # fmt: skip
        _band(mem_axis, run.history, "frac_mem", COLOURS["mem"], f"N_mem / N_train, {run.label}", style)
    auc_axis.axhline(0.5, linestyle=":", color="black", linewidth=0.8)
    sizes = ", ".join(sorted({str(run.n_train) for run in runs}, key=int))
    auc_axis.set(title=f"membership AUC and memorization (N_train = {sizes}), 95% bands",
                 xlabel="LDM training step", ylabel="AUC, training vs held-out", ylim=(0, 1))  # fmt: skip
    mem_axis.set(ylabel="N_mem / N_train", ylim=(0, 1))
    handles = [sum(pair, []) for pair in zip(auc_axis.get_legend_handles_labels(),
                                             mem_axis.get_legend_handles_labels(), strict=True)]  # fmt: skip
    # below the axes: inside, it would hide the AUC's rise, the figure's point
    auc_axis.legend(*handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return _save(figure, path)


def write_figures(findings: Findings, folder: Path) -> dict[str, Path]:
    """One figure per finding; `membership` only where a run has a membership history."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "over_training": plot_over_training(findings, folder / "over_training.png"),
        "augmentation": plot_augmentation(findings, folder / "augmentation.png"),
        "training_size": plot_training_size(findings, folder / "training_size.png"),
    }
    if findings.with_membership:
        figures["membership"] = plot_membership(findings, folder / "membership_vs_nmem.png")
    return figures
