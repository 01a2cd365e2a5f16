"""The audit's verdict on the terminal: a rich table, and a release's verification."""

from __future__ import annotations

import sys


def print_audit(summary: dict) -> None:
    """The audit's verdict as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    from memwatch.memorization.chance import weak_detector_warning
    from memwatch.memorization.release import describe_checkpoint

    def share(count: int, total: int, key: str) -> str:
        low, high = summary[f"{key}_ci"]
        chance = summary.get(f"null_{key}")
        beyond = f", chance {chance:.1%}" if chance is not None else ""
        return f"{count} / {total} ({summary[key]:.1%}, 95% CI {low:.1%}–{high:.1%}{beyond})"

    table = Table(title=f"audit: {summary['out']}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(
        "training patients memorized",
        share(summary["n_mem_patients"], summary["n_train_patients"], "frac_mem_patients"),
    )
    table.add_row(
        "training images memorized (N_mem)", share(summary["n_mem"], summary["n_train"], "frac_mem")
    )
    table.add_row(
        "synthetic samples that are copies", share(summary["n_copies"], summary["n_syn"], "frac_copies")
    )
    detector = summary.get("detector")
    if detector:
        table.add_row(
            "detector self-check: sensitivity / specificity",
            f"{detector['sensitivity']:.1%} / {detector['specificity']:.1%} "
            f"({detector['n_positive']} varied training / {detector['n_negative']} held-out images)",
        )
    table.add_row(f"τ ({summary['percentile']:g}th percentile)", f"{summary['tau']:.4f}")
    if summary.get("rule") == "distinct":
        table.add_row("copy rule", f"distinct: ρ ≥ τ and nearer one patient, d1 ≤ {summary['margin']:g}·d2")
    elif summary.get("rule"):
        table.add_row("copy rule", f"{summary['rule']}: ρ ≥ τ")
    detectors = summary.get("detectors") or {}
    if len(detectors.get("by_embedder") or {}) > 1:
        for name, numbers in detectors["by_embedder"].items():
            table.add_row(
                f"embedder {name}: patients memorized / copies",
                f"{numbers['n_mem_patients']} / {numbers['n_copies']} (τ {numbers['tau']:.4f})",
            )
        table.add_row(
            "copies flagged by any / by every embedder",
            f"{detectors['n_copies_any']} / {detectors['n_copies_all']}",
        )
    for key, label in [
        ("fd", "Fréchet distance (embeddings, vs validation)"),
        ("ms_ssim", "MS-SSIM between samples"),
    ]:
        if summary.get(key) is not None:
            table.add_row(label, f"{summary[key]:.4f}")
    if "membership" in summary:
        table.add_row("membership signal (training vs held-out AUC)", membership_line(summary["membership"]))
    if "release" in summary:
        release = summary["release"]
        table.add_row(
            f"released to {release['dir']}", f"{release['n_released']} (withheld {release['n_withheld']})"
        )
    Console().print(table)
    if summary.get("generator"):  # below the table: the path and hash are wider than its value column
        print(f"model audited: {describe_checkpoint(summary['generator'])}")
    weak = detector and weak_detector_warning(detector["sensitivity"], detector["n_positive"], "--embedder")
    if weak:
        print(f"warning: {weak}", file=sys.stderr)


def membership_line(membership: dict) -> str:
    """The membership signal in one line: AUC and interval, its control, whether it lies above; or why skipped."""
    if "skipped" in membership:
        return f"skipped: {membership['skipped']}"
    low, high = membership["auc_ci"]
    line = f"{membership['auc']:.3f} (95% CI {low:.3f}–{high:.3f})"
    above = membership.get("above_control")
    if membership.get("auc_control") is None:  # too few training images for two halves: compared with 0.5
        return line + f", no control (too few training images): {'above' if above else 'not above'} 0.5"
    c_low, c_high = membership["auc_control_ci"]
    line += f", control {membership['auc_control']:.3f} ({c_low:.3f}–{c_high:.3f})"
    return line + (": above control" if above else ": not above its control")


def print_verification(result: dict) -> bool:
    """Say whether a released folder, and the checkpoints its manifest names, still match it; True when they do."""
    checkpoints = {state: [c for c in result.get("checkpoints", []) if c["state"] == state]
                   for state in ("unchanged", "changed", "missing")}  # fmt: skip
    for checkpoint in checkpoints["missing"]:
        print(
            f"notice: the {checkpoint['role']} checkpoint {checkpoint['path']} is no longer there: "
            "not compared with the sha256 manifest.json records for it",
            file=sys.stderr,
        )
    if result["verified"]:
        unchanged = ", ".join(c["role"] for c in checkpoints["unchanged"])
        print(
            f"verified: the {result['n_files']} file{'s' if result['n_files'] != 1 else ''} of {result['dir']} match its manifest (audit of {result['created']})"
            + (f"; unchanged checkpoints: {unchanged}" if unchanged else "")
        )
        return True
    for change in ("changed", "added", "missing"):
        for name in result[change]:
            print(f"{change}: {name}", file=sys.stderr)
    reasons = [
        f"the {c['role']} checkpoint {c['path']} has changed since the audit (its sha256 is not the one in "
        "manifest.json: audit the model it holds now before sharing its samples)"
        for c in checkpoints["changed"]
    ]
    if any(result[change] for change in ("changed", "added", "missing")):
        counts = ", ".join(f"{len(result[change])} {change}" for change in ("changed", "added", "missing"))
        reasons.insert(0, f"{result['dir']} differs from its manifest ({counts})")
    print(f"error: {'; '.join(reasons)}: do not share {result['dir']} as audited", file=sys.stderr)
    return False
