"""`report.html`: the whole audit on one page for the person who approves a release, verdict first.

The page is self-contained: CSS inline, every picture a base64 PNG `data:` URI, no script and
no external address, so it opens offline and can be archived with the release decision. Patient
pixels appear only when the caller passes both image lookups; otherwise the page says why not.
Every number comes from the summary as written to `summary.json`; a number missing there (a
training check records fewer than an audit) reads "not measured".
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from memwatch.memorization.chance import MIN_SENSITIVITY
from memwatch.memorization.detect import CopyReport
from memwatch.memorization.release import describe_checkpoint

ImageLookup = Callable[[int], "np.ndarray | torch.Tensor"]
NOT_MEASURED = "not measured"
PLANES = ("axial", "coronal", "sagittal")
# What the self-check assumes and how far that was off on planted copies (bench/detector_quality.py,
# BENCHMARKS.md, "Detection on 3D and multi-image data"); keep the figures in step with that table.
SELF_CHECK_ASSUMPTION = (
    "What the self-check assumes: a copy changes its training image no more than the self-check's variations "
    "do (each of a flip, a rotation within ±5°, a contrast change and noise, with probability ½), and novel "
    "synthetic images resemble the training images as closely as held-out patients do. On planted copies that "
    "apply all of these changes and a brightness shift at once, in eight cases of five image families (2D and 3D), its "
    "sensitivity was at most 4 points above the share of copies actually found with the shipped embedder "
    "recipes, but 16–17 points above it with weaker embedders (a multi-image family, a 3D family it was not "
    "tuned on). Its specificity and chance level held within their intervals, except where novel images were "
    "averages of two training patients: the default rule flagged 5% of them against a predicted 0–2% "
    "(bench/detector_quality.py)."
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
.status { padding: 0.8em 1em; border-radius: 6px; font-size: 1.15em; font-weight: 600; margin: 1em 0; }
.status.good { background: #e3f4e6; border-left: 6px solid #2e7d32; }
.status.unclear { background: #fff4d6; border-left: 6px solid #b7791f; }
.status.bad { background: #fde2e1; border-left: 6px solid #c62828; }
.warning { background: #fde2e1; border-left: 6px solid #c62828; padding: 0.6em 1em; font-weight: 600; }
.note { background: #eef2f7; border-left: 6px solid #5b7db1; padding: 0.6em 1em; }
ul.verdict li { margin: 0.35em 0; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em;
        text-align: left; vertical-align: top; } th { background: #f3f3f3; }
.pair { display: flex; gap: 1.5em; align-items: flex-start; margin: 1em 0; padding-bottom: 0.8em;
        border-bottom: 1px dashed #ddd; flex-wrap: wrap; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #444; max-width: 520px; word-break: break-all; }
.planes { display: flex; gap: 4px; } .planes div { text-align: center; font-size: 0.75em; color: #666; }
img.slice { width: 160px; height: 160px; object-fit: contain; background: #000; image-rendering: pixelated; }
img.histogram { max-width: 100%; }
"""


def write_html_report(
    path: str | Path,
    report: CopyReport,
    train_ids: Sequence[str],
    syn_ids: Sequence[str],
    patients: Sequence[str],
    summary: Mapping[str, Any],
    histogram_png: bytes,
    shown: Sequence[int] = (),
    train_image: ImageLookup | None = None,
    syn_image: ImageLookup | None = None,
) -> Path:
    """Write `report.html` to `path`; returns `path`.

    Args:
        report: from `detect_copies`; `train_ids`, `patients` (per training row) and `syn_ids` name its rows.
        summary: the dict written to `summary.json` (`memorization.summary.headline` keys, `detector`, ...).
        histogram_png: the bytes of `histogram.png`, embedded as they are.
        shown: the synthetic rows whose pair the gallery shows, most similar first.
        train_image, syn_image: row index → image `[C, H, W]` or `[C, H, W, D]` in `[0, 1]`; without
            both the page holds no patient pixels.
    """
    path = Path(path)
    with_images = train_image is not None and syn_image is not None
    sections = [
        _header(summary, with_images),
        _verdict(summary),
        _detectors_section(summary),
        _membership_section(summary),
        "<h2>How close the synthetic images come to training images</h2>",
        f'<img class="histogram" alt="histogram of nearest-neighbour correlations" src="{_data_uri(histogram_png)}">',
        _histogram_caption(),
        _gallery(report, train_ids, syn_ids, patients, shown, train_image, syn_image)
        if with_images
        else _no_images_note(),
        _memorized_table(report, train_ids, syn_ids, patients),
        _provenance(summary),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_title(summary)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def percent(fraction: float) -> str:
    """A share as a person reads it: `0.0134` → `1.3%`; tiny non-zero shares are not rounded to 0."""
    value = 100.0 * float(fraction)
    if value == 0.0 or value == 100.0:
        return f"{value:.0f}%"
    if value < 0.1:
        return "<0.1%"
    if value > 99.9:
        return ">99.9%"
    return f"{value:.1f}%"


def _range(bounds: Sequence[float]) -> str:
    low, high = bounds
    return f"{percent(low).rstrip('%')}–{percent(high)}"


def _interval(bounds: Sequence[float] | None) -> str:
    return f"95% CI {_range(bounds)}" if bounds else f"95% CI {NOT_MEASURED}"


def _title(summary: Mapping[str, Any]) -> str:
    if summary.get("check") is not None:
        return f"memwatch training check {int(summary['check'])}"
    return "memwatch memorization audit"


def _header(summary: Mapping[str, Any], with_images: bool) -> str:
    lines = [f"<h1>{html.escape(_title(summary))}</h1>"]
    when = [f"created {html.escape(str(summary['created']))}"] if summary.get("created") else []
    if summary.get("epoch") is not None:
        when.append(f"epoch {int(summary['epoch'])}, step {int(summary.get('step') or 0)}")
    if when:
        lines.append(f"<p>{'; '.join(when)}</p>")
    if summary.get("generator"):
        lines.append(
            f'<p id="generator">Model audited: {html.escape(describe_checkpoint(summary["generator"]))}</p>'
        )
    level, sentence = overall_status(summary)
    lines.append(f'<div class="status {level}" id="status">{html.escape(sentence)}</div>')
    if with_images:
        lines.append(
            '<p class="warning">This page shows images of training patients: store and share it only as you '
            "would the training data itself.</p>"
        )
    return "\n".join(lines)


def overall_status(summary: Mapping[str, Any]) -> tuple[str, str]:
    """(`good`, `unclear` or `bad`, one sentence): how the observed shares compare with chance level."""
    fractions = [
        ("training patients with a near-copy", "frac_mem_patients"),
        ("training images with a near-copy", "frac_mem"),
        ("synthetic images that are near-copies", "frac_copies"),
    ]
    measured = [(label, key) for label, key in fractions if summary.get(key) is not None]
    if not measured:
        return "unclear", "No copy counts were measured."
    weak = _weak_detector(summary)
    caveat = " The detector's self-check is weak, so copies may be missed." if weak else ""
    if all(summary.get(key) == 0 for _, key in measured):
        level = "unclear" if weak else "good"
        return level, "No near-copies of training patients were found." + caveat
    with_chance = [(label, key) for label, key in measured if summary.get(f"null_{key}") is not None]
    if not with_chance:
        return (
            "unclear",
            "Near-copies were found, and the chance level was not measured to compare them with." + caveat,
        )
    for label, key in with_chance:
        low = (summary.get(f"{key}_ci") or [summary[key]])[0]
        if low > summary[f"null_{key}"]:
            return "bad", (
                f"Above chance: the share of {label} ({percent(summary[key])}, "
                f"{_interval(summary.get(f'{key}_ci'))}) lies clearly above the chance level "
                f"({percent(summary[f'null_{key}'])}); the model reproduces training patients." + caveat
            )
    above = [(label, key) for label, key in with_chance if summary[key] > summary[f"null_{key}"]]
    if above:
        label, key = above[0]
        return "unclear", (
            f"Possibly above chance: the share of {label} ({percent(summary[key])}) exceeds the chance level "
            f"({percent(summary[f'null_{key}'])}), but its 95% interval includes chance." + caveat
        )
    return "unclear" if weak else "good", (
        "At or below chance: no more near-copies than a model that copies nobody would show; the flagged "
        "synthetic images still resemble a training patient closely." + caveat
    )


def _weak_detector(summary: Mapping[str, Any]) -> bool:
    detector = summary.get("detector")
    return (
        bool(detector)
        and detector.get("sensitivity") is not None
        and detector["sensitivity"] < MIN_SENSITIVITY
    )


def _count_sentence(summary, count_key, fraction_key, total_key, subject, predicate) -> str:
    """ "`count` of `total` `subject` (share, interval) `predicate`; chance level …", or that it was not measured."""
    count, total, fraction = (summary.get(k) for k in (count_key, total_key, fraction_key))
    if count is None or not total or fraction is None:
        return f"How many {subject} {predicate}: {NOT_MEASURED}."
    null, null_range = summary.get(f"null_{fraction_key}"), summary.get(f"null_{fraction_key}_ci")
    chance = f"chance level {percent(null) if null is not None else NOT_MEASURED}"
    if null is not None and null_range:
        chance += f" (95% range of a model that copies nobody: {_range(null_range)})"
    share = f"{percent(fraction)}, {_interval(summary.get(f'{fraction_key}_ci'))}"
    return f"{int(count)} of {int(total)} {subject} ({share}) {predicate}; {chance}."


def _verdict(summary: Mapping[str, Any]) -> str:
    n_syn = summary.get("n_syn")
    among = f"among {int(n_syn)} synthetic images" if n_syn else "among the synthetic images"
    items = [
        _count_sentence(summary, "n_mem_patients", "frac_mem_patients", "n_train_patients", "training patients",
                        f"have a near-copy {among}"),
        _count_sentence(summary, "n_mem", "frac_mem", "n_train", "training images", f"have a near-copy {among}"),
        _count_sentence(summary, "n_copies", "frac_copies", "n_syn", "synthetic images",
                        "are near-copies of a training image"),
    ]  # fmt: skip
    lines = ['<h2>Verdict</h2>\n<ul class="verdict" id="verdict">']
    lines += [f"<li>{html.escape(item)}</li>" for item in items]
    lines.append(f"<li>{html.escape(_detector_sentence(summary))}</li>")
    if summary.get("detector"):
        lines.append(f'<li id="self-check-assumption">{html.escape(SELF_CHECK_ASSUMPTION)}</li>')
    lines.append(f"<li>{html.escape(_threshold_sentence(summary))}</li>")
    if summary.get("release"):
        lines.append(f"<li>{html.escape(_release_sentence(summary['release']))}</li>")
    lines.append("</ul>")
    if _weak_detector(summary):
        lines.append(
            f'<p class="warning" id="detector-warning">Warning: the detector recognised only '
            f"{percent(summary['detector']['sensitivity'])} of known copies (below {MIN_SENSITIVITY:.0%}), so it "
            "misses copies and the counts above are likely too low. Train the embedder longer or on more images "
            "before relying on this report.</p>"
        )
    return "\n".join(lines)


def _detectors_section(summary: Mapping[str, Any]) -> str:
    """One section per embedder when the audit compared several, and where they agree."""
    detectors = summary.get("detectors") or {}
    by_embedder = detectors.get("by_embedder") or {}
    if len(by_embedder) < 2:
        return ""
    keys = ("n_train", "n_train_patients", "n_syn", "percentile", "rule", "margin")
    totals = {key: summary.get(key) for key in keys}
    n_syn = summary.get("n_syn")
    among = f"among {int(n_syn)} synthetic images" if n_syn else "among the synthetic images"
    lines = [
        "<h2>Each detector</h2>",
        f"<p>{len(by_embedder)} embedders counted copies. The verdict above is the first one's; a synthetic image "
        "that any of them flags is withheld from a release.</p>",
    ]
    for name, numbers in by_embedder.items():
        merged = {**totals, **numbers}
        items = [
            _count_sentence(merged, "n_mem_patients", "frac_mem_patients", "n_train_patients", "training patients",
                            f"have a near-copy {among}"),
            _count_sentence(merged, "n_copies", "frac_copies", "n_syn", "synthetic images",
                            "are near-copies of a training image"),
            _detector_sentence(merged),
            _threshold_sentence(merged),
        ]  # fmt: skip
        lines.append(f'<section class="detector-section"><h3>{html.escape(name)}</h3><ul>')
        lines += [f"<li>{html.escape(item)}</li>" for item in items]
        lines.append("</ul></section>")
    agreement = [
        f"<li>flagged by any: {int(detectors.get('n_copies_any', 0))}; by all: {int(detectors.get('n_copies_all', 0))}</li>"
    ]
    for pair in detectors.get("pairwise") or []:
        first, second = (html.escape(name) for name in pair["detectors"])
        share = f" ({percent(pair['agreement'])} agree)" if pair.get("agreement") is not None else ""
        agreement.append(
            f"<li>{first} and {second}: both {pair['both']}, only {first} {pair['only_first']}, only {second} "
            f"{pair['only_second']}, neither {pair['neither']}{share}</li>"
        )
    lines.append("<h3>Where they agree</h3><ul>" + "".join(agreement) + "</ul>")
    return "\n".join(lines)


MEMBERSHIP_EXPLANATION = (
    "What this measures: the model scores each image by its own denoising loss (an autoencoder by its "
    "reconstruction error), and the AUC is the chance that a training image scores better than a held-out image: "
    "0.5 when the model fits both alike, higher when it fits its training images better. The control compares "
    "two halves of the training images, all of them training images, so its AUC is what the comparison gives "
    "without any membership (for instance from images that differ between the splits)."
)


def _auc(value: float, bounds: Sequence[float] | None) -> str:
    interval = f"95% CI {bounds[0]:.3f}–{bounds[1]:.3f}" if bounds else f"95% CI {NOT_MEASURED}"
    return f"AUC {value:.3f}, {interval}"


def _membership_section(summary: Mapping[str, Any]) -> str:
    """The membership signal (`memwatch.memorization.membership`) when the summary has one, or why it was skipped."""
    membership = summary.get("membership")
    if membership is None:
        return ""
    lines = ['<section id="membership"><h2>Membership signal</h2>']
    if "skipped" in membership:
        lines.append(
            f'<p class="note" id="membership-skipped">Not measured: {html.escape(str(membership["skipped"]))}</p>'
        )
        return "\n".join(lines + ["</section>"])
    signal = _auc(membership["auc"], membership.get("auc_ci"))
    control = membership.get("auc_control")
    if control is not None:
        control_text = _auc(control, membership.get("auc_control_ci"))
        verdict = (
            f"Above control: training images score higher than held-out images ({signal}), and the interval lies "
            f"wholly above the control's ({control_text}): the model fits its training images better than new patients."
            if membership.get("above_control")
            else "Not above control: training images do not score detectably higher against held-out images than "
            f"the control's two halves of training images do against each other ({signal}; control {control_text})."
        )
    else:
        control_text = f"{NOT_MEASURED} (too few training images for two halves)"
        verdict = (
            f"Above 0.5: training images score higher than held-out images ({signal}); there is no control "
            "(too few training images), so a difference between the splits' images may explain it."
            if membership.get("above_control")
            else f"Not above 0.5: training images do not score detectably higher than held-out images ({signal}); "
            "there is no control (too few training images)."
        )
    tpr = membership.get("tpr_at_5fpr")
    items = [
        f"Training against held-out images: {signal} (method: {membership.get('method') or NOT_MEASURED}).",
        "Training images that score above 95% of the held-out images (true-positive rate at 5% false positives): "
        f"{percent(tpr) if tpr is not None else NOT_MEASURED}.",
        f"Control, two halves of the training images against each other: {control_text}.",
        f"Scored: {_count(membership.get('n_train'))} training and {_count(membership.get('n_held_out'))} held-out images.",
    ]
    lines.append(f'<p class="note" id="membership-verdict">{html.escape(verdict)}</p>')
    lines.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>")
    lines.append(f"<p>{html.escape(MEMBERSHIP_EXPLANATION)}</p>")
    return "\n".join(lines + ["</section>"])


def _count(value: Any) -> str:
    return str(int(value)) if value is not None else NOT_MEASURED


def _release_sentence(release: Mapping[str, Any]) -> str:
    sentence = (
        f"Release: {int(release.get('n_released', 0))} synthetic files were copied to {release.get('dir', '')}; "
        f"{int(release.get('n_withheld', 0))} near-copies were withheld."
    )
    if release.get("manifest"):
        sentence += f" The checksum of every released file is in {release['manifest']} there."
    return sentence


def _detector_sentence(summary: Mapping[str, Any]) -> str:
    if "detector" not in summary:
        return f"Detector self-check: {NOT_MEASURED}."
    detector = summary["detector"]
    if detector is None:
        return (
            "Detector self-check: skipped (no varied training images were checked), so how many copies the "
            f"detector misses is {NOT_MEASURED}."
        )
    return (
        f"Detector self-check: the detector flagged {percent(detector['sensitivity'])} "
        f"({_interval(detector.get('sensitivity_ci'))}) of {int(detector['n_positive'])} varied training images "
        f"(known copies) and passed {percent(detector['specificity'])} ({_interval(detector.get('specificity_ci'))}) "
        f"of {int(detector['n_negative'])} held-out images (new patients)."
    )


def _threshold_sentence(summary: Mapping[str, Any]) -> str:
    tau, percentile = summary.get("tau"), summary.get("percentile")
    if tau is None:
        return f"Threshold τ: {NOT_MEASURED}."
    reference = (
        f"the {percentile:g}th percentile of how closely each training image resembles its most similar held-out "
        "image (a different patient)"
        if percentile is not None
        else "a percentile of how closely training images resemble held-out images"
    )
    near_copy = f"A near-copy is an embedding correlation of at least τ = {tau:.3f} with a training image"
    return f"{near_copy}: {reference}.{_rule_sentence(summary)}"


def _rule_sentence(summary: Mapping[str, Any]) -> str:
    rule, margin = summary.get("rule"), summary.get("margin")
    if rule == "distinct" and margin is not None:
        return (
            " Copy rule distinct: a close sample also has to be clearly nearer to one patient than to any "
            f"other, d1 ≤ {margin:g}·d2 (d = √(2(1 − ρ)) to the nearest patient's image and to the nearest "
            "other patient's)."
        )
    if rule == "paper":
        return " Copy rule paper: a correlation of at least τ is enough."
    return ""


def _histogram_caption() -> str:
    return (
        "<p>Each training image is counted twice: in blue by its correlation with the most similar held-out "
        "image (a different patient: what resemblance between people looks like), in orange with the most "
        "similar synthetic image. Orange to the right of the dashed line τ are near-copies; a model that copies "
        "nobody keeps orange about where blue is.</p>"
    )


def _no_images_note() -> str:
    return (
        '<h2>Closest pairs</h2>\n<p class="note" id="no-images">Images are not shown, so this page holds no patient '
        "pixels: they are shown only when asked for. Training checks show them with <code>log_images: true</code> in "
        "the memorization section of the config; <code>cli.py audit</code> always shows them.</p>"
    )


def _gallery(report, train_ids, syn_ids, patients, shown, train_image, syn_image) -> str:
    lines = ["<h2>Closest pairs: training image beside its synthetic near-copy</h2>"]
    if not shown:
        tau = f"{report.tau:.3f}"
        lines.append(f"<p>No synthetic image reaches τ = {tau}: there are no near-copies to show.</p>")
        return "\n".join(lines)
    lines.append(
        f"<p>The {len(shown)} most similar of {report.n_copies} near-copies, most similar first.</p>"
    )
    for rank, j in enumerate(shown, start=1):
        i = int(report.nn_train_index[j])
        train_caption = f"training image {train_ids[i]} (patient {patients[i]})"
        syn_caption = f"synthetic image {syn_ids[j]}, correlation {float(report.nn_train_corr[j]):.3f}"
        lines.append(
            '<div class="pair">'
            f"<div><strong>{rank}.</strong></div>"
            f"{_figure(train_image(i), train_caption)}{_figure(syn_image(j), syn_caption)}</div>"
        )
    return "\n".join(lines)


def _figure(image: np.ndarray | torch.Tensor, caption: str) -> str:
    slices = image_planes(image)
    label = html.escape(caption)
    cells = "".join(
        f'<div><img class="slice" alt="{label}, {name}" src="{_data_uri(png_bytes(plane))}">'
        f"{'<br>' + name if len(slices) > 1 else ''}</div>"
        for name, plane in slices
    )
    return f'<figure><div class="planes">{cells}</div><figcaption>{label}</figcaption></figure>'


def image_planes(image: np.ndarray | torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """`[C, H, W]` → `[("image", [H, W])]`; `[C, H, W, D]` → the middle slice across each spatial axis (first channel).

    Axial fixes D (as `copies.png` shows), coronal fixes W, sagittal fixes H (MONAI's RAS-like `(H, W, D)`).
    """
    array = (
        image.detach().cpu().float().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, np.float32)
    )
    first = array[0]
    if first.ndim == 2:
        return [("image", first)]
    if first.ndim != 3:
        raise ValueError(f"an image of shape {list(array.shape)}: expected [C, H, W] or [C, H, W, D]")
    h, w, d = first.shape
    return [
        ("axial", first[:, :, d // 2]),
        ("coronal", first[:, w // 2, :]),
        ("sagittal", first[h // 2, :, :]),
    ]


def png_bytes(plane: np.ndarray) -> bytes:
    """A `[H, W]` picture in `[0, 1]` as 8-bit grey PNG bytes."""
    grey = (np.clip(np.nan_to_num(plane), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _memorized_table(report: CopyReport, train_ids, syn_ids, patients) -> str:
    by_patient: dict[str, list[int]] = {}
    for i in torch.nonzero(report.memorized).flatten().tolist():
        by_patient.setdefault(patients[i], []).append(i)
    lines = ["<h2>Memorized training patients</h2>"]
    if not by_patient:
        lines.append("<p>No training patient has a near-copy.</p>")
        return "\n".join(lines)
    rows = []
    for patient, images in by_patient.items():
        closest = max(images, key=lambda i: float(report.nn_syn_corr[i]))
        rows.append((float(report.nn_syn_corr[closest]), patient, images, closest))
    rows.sort(key=lambda row: (-row[0], row[1]))
    lines.append(
        '<table id="memorized"><tr><th>patient</th><th>memorized training images</th>'
        "<th>nearest synthetic image</th><th>correlation</th></tr>"
    )
    for correlation, patient, images, closest in rows:
        lines.append(
            f"<tr><td>{html.escape(str(patient))}</td><td>{html.escape(', '.join(str(train_ids[i]) for i in images))}</td>"
            f"<td>{html.escape(str(syn_ids[int(report.nn_syn_index[closest])]))}</td><td>{correlation:.3f}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _provenance(summary: Mapping[str, Any]) -> str:
    rows = [(f"input: {key}", value) for key, value in (summary.get("inputs") or {}).items()]
    rows += [(f"generator: {key}", value) for key, value in (summary.get("generator") or {}).items() if value is not None]
    labels = {
        "created": "created",
        "check": "training check",
        "epoch": "epoch",
        "step": "step",
        "n_train": "training images",
        "n_train_patients": "training patients",
        "n_val": "held-out images",
        "n_syn": "synthetic images",
        "tau": "τ",
        "percentile": "percentile",
        "rule": "copy rule",
        "margin": "copy rule's margin (distinct: d1 ≤ margin·d2)",
        "ci_method": "interval method",
        "null_method": "chance-level method",
        "fd": "Fréchet distance (synthetic vs held-out, embedder space)",
        "ms_ssim": "MS-SSIM between synthetic samples (lower: more diverse)",
    }
    rows += [(label, summary[key]) for key, label in labels.items() if summary.get(key) is not None]
    lines = ['<h2>Inputs and provenance</h2>\n<table id="provenance">']
    for label, value in rows:
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(text)}</td></tr>")
    lines.append("</table>")
    lines.append(
        "<p>The same numbers are in <code>summary.json</code>; every synthetic image is listed in "
        "<code>pairs.csv</code> and every training image in <code>train_nn.csv</code> beside this page.</p>"
    )
    return "\n".join(lines)
