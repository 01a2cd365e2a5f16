"""`report.html`: verdict first with the summary's numbers, self-contained, patient pixels only when asked, ids escaped,
and it renders in a real browser without console errors."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from memwatch.memorization.html_report import overall_status
from memwatch.memorization.stats import binomial_interval
from tests.helpers import (
    REPORT_MAX_PAIRS,
    REPORT_N_NOVEL,
    REPORT_N_PATIENTS,
    REPORT_PLANTED_ROWS,
    parse,
    write_page,
)

CHANCE_KEYS = ("null_frac_mem", "null_frac_copies", "null_frac_mem_patients", "null_frac_mem_ci", "null_frac_copies_ci",
               "null_frac_mem_patients_ci", "excess_frac_mem", "excess_frac_copies", "excess_frac_mem_patients")  # fmt: skip


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


@pytest.mark.parametrize("spatial_size, planes", [((24, 24), 1), ((12, 14, 10), 3)], ids=["2d", "3d"])
def test_verdict_comes_first_with_the_summary_numbers_then_histogram_gallery_and_table(
    tmp_path, spatial_size, planes
):
    page, report = write_page(tmp_path, spatial_size)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert report.n_copies == len(REPORT_PLANTED_ROWS) and summary["n_mem_patients"] == len(REPORT_PLANTED_ROWS)
    parsed = parse(page)
    text = "".join(parsed.text)
    before_histogram = text[: text.index("[img histogram]")]

    low, high = binomial_interval(len(REPORT_PLANTED_ROWS), REPORT_N_PATIENTS)
    patient_sentence = (
        f"6 of 20 training patients (30.0%, 95% CI {pct(low)}–{pct(high)}%) have a near-copy among 20 synthetic "
        f"images; chance level {pct(summary['null_frac_mem_patients'])}%"
    )
    low, high = binomial_interval(len(REPORT_PLANTED_ROWS), 2 * REPORT_N_PATIENTS)
    image_sentence = f"6 of 40 training images (15.0%, 95% CI {pct(low)}–{pct(high)}%) have a near-copy"
    low, high = binomial_interval(len(REPORT_PLANTED_ROWS), len(REPORT_PLANTED_ROWS) + REPORT_N_NOVEL)
    copy_sentence = (
        f"6 of 20 synthetic images (30.0%, 95% CI {pct(low)}–{pct(high)}%) are near-copies of a training image; "
        f"chance level {pct(summary['null_frac_copies'])}%"
    )
    detector = summary["detector"]
    assert detector["sensitivity"] == 1.0  # every lightly varied training image is found
    detector_sentence = (
        f"the detector flagged 100% (95% CI {pct(detector['sensitivity_ci'][0])}–100%) of 40 varied training images "
        f"(known copies) and passed {pct(detector['specificity'])}%"
    )
    for sentence in (
        patient_sentence,
        image_sentence,
        copy_sentence,
        detector_sentence,
        f"τ = {summary['tau']:.3f}",
    ):
        assert sentence in before_histogram, sentence
    assert "Above chance" in before_histogram  # 30% of patients against a chance level of a few percent
    assert "not measured" not in text and "Warning" not in text

    gallery = [image for image in parsed.images if image.get("class") == "slice"]
    assert len(gallery) == 2 * planes * min(REPORT_MAX_PAIRS, report.n_copies)
    assert len(parsed.images) == len(gallery) + 1  # and the histogram
    assert text.index("[img slice]") > text.index("[img histogram]")
    assert text.index("Memorized training patients") > text.rindex("[img slice]")
    assert text.index("Inputs and provenance") > text.index("Memorized training patients")
    memorized_patients = {f"patient-{row // 2:02d}" for row in REPORT_PLANTED_ROWS}
    assert all(patient in text[text.index("Memorized training patients") :] for patient in memorized_patients)
    if planes == 3:
        assert all(f"{plane}" in text for plane in ("axial", "coronal", "sagittal"))

    assert "http://" not in page and "https://" not in page
    assert all(link.startswith("data:image/png;base64,") for link in parsed.links), parsed.links
    for image in parsed.images:
        png = base64.b64decode(image["src"].removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.format == "PNG" and decoded.width > 0 and decoded.height > 0
            decoded.verify()


def test_without_image_lookups_the_page_holds_no_patient_pixels(tmp_path):
    page, _ = write_page(tmp_path, with_images=False)
    parsed = parse(page)
    assert [image.get("class") for image in parsed.images] == ["histogram"]
    assert "Images are not shown" in "".join(parsed.text) and "log_images: true" in page
    assert not (tmp_path / "copies.png").exists()


def test_ids_are_escaped(tmp_path):
    page, _ = write_page(tmp_path, hostile_ids=True)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;patient-00" in page  # in the memorized-patients table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;img-000" in page  # in the gallery captions


def without(*keys):
    return lambda summary: {key: value for key, value in summary.items() if key not in keys}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: {**s, "detector": None}, "Detector self-check: skipped"),
        (without("detector"), "Detector self-check: not measured"),
        (
            lambda s: {**s, "detector": {**s["detector"], "sensitivity": 0.6, "sensitivity_ci": [0.4, 0.8]}},
            "Warning: the detector recognised only 60.0% of known copies (below 90%)",
        ),
        (without(*CHANCE_KEYS), "chance level not measured"),
        (
            lambda s: {
                **s,
                "release": {
                    "dir": "/share/<out>",
                    "n_released": 14,
                    "n_withheld": 6,
                    "manifest": "manifest.json",
                },
            },
            "Release: 14 synthetic files were copied to /share/<out>; 6 near-copies were withheld.",
        ),
        (
            without("n_mem_patients", "frac_mem_patients", "frac_mem_patients_ci"),
            "How many training patients have a near-copy among 20 synthetic images: not measured.",
        ),
    ],
    ids=[
        "detector-skipped",
        "detector-absent",
        "detector-weak",
        "no-chance-level",
        "release",
        "no-patient-counts",
    ],
)
def test_missing_or_weak_numbers_are_said_not_crashed_on(tmp_path, edit, expected):
    page, _ = write_page(tmp_path, with_images=False, summary_edit=edit)
    assert expected in "".join(parse(page).text)


@pytest.mark.parametrize(
    "rule, margin, expected",
    [
        ("paper", None, "Copy rule paper: a correlation of at least τ is enough."),
        ("distinct", 0.4, "also has to be clearly nearer to one patient than to any other, d1 ≤ 0.4·d2"),
    ],
    ids=["paper", "distinct"],
)
def test_the_verdict_names_the_copy_rule(tmp_path, rule, margin, expected):
    page, _ = write_page(tmp_path, with_images=False, summary_edit=lambda s: {**s, "rule": rule, "margin": margin})
    text = "".join(parse(page).text)
    assert expected in text[: text.index("[img histogram]")]
    assert json.loads((tmp_path / "summary.json").read_text())["rule"] == rule


@pytest.mark.parametrize("edit, shown", [(lambda s: s, True), (lambda s: {**s, "detector": None}, False)])
def test_a_measured_self_check_states_its_assumption_and_how_far_it_was_off(tmp_path, edit, shown):
    page, _ = write_page(tmp_path, with_images=False, summary_edit=edit)
    text = "".join(parse(page).text)
    assert ("What the self-check assumes" in text) == shown
    if shown:
        assert "points above the share of copies actually found" in text[: text.index("[img histogram]")]


def test_status_compares_the_interval_with_chance():
    base = {"frac_mem_patients": 0.10, "frac_mem_patients_ci": [0.06, 0.15], "null_frac_mem_patients": 0.05}
    assert overall_status(base)[0] == "bad"
    assert overall_status({**base, "frac_mem_patients_ci": [0.04, 0.15]})[0] == "unclear"
    assert (
        overall_status({**base, "frac_mem_patients": 0.03, "frac_mem_patients_ci": [0.01, 0.08]})[0] == "good"
    )
    assert (
        overall_status({**base, "frac_mem_patients": 0.0, "frac_mem_patients_ci": [0.0, 0.05]})[0] == "good"
    )
    weak = {"detector": {"sensitivity": 0.5}}
    assert overall_status({**base, "frac_mem_patients": 0.0, **weak})[0] == "unclear"
    assert overall_status({})[0] == "unclear"


# --- a real browser -----------------------------------------------------------------------


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium or Chrome installed (apt-get install chromium)")


def render(page: Path, folder: Path) -> tuple[str, Path, list[str]]:
    """Open `page` headless and offline: its DOM after load, a 1200×2000 screenshot, and the console's messages."""
    screenshot = folder / "screenshot.png"
    result = subprocess.run(
        [
            browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={folder / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
            f"--screenshot={screenshot}", "--window-size=1200,2000", "--dump-dom", page.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    # Chromium logs each console message, uncaught exceptions included, as "...:CONSOLE:<line>] "<message>", source: ..."
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return result.stdout, screenshot, console


def test_the_page_renders_in_a_real_browser_without_console_errors(tmp_path):
    broken = tmp_path / "broken" / "page.html"
    broken.parent.mkdir()
    broken.write_text('<!DOCTYPE html><p>x</p><script>throw new Error("deliberate")</script>')
    # the console check below sees an uncaught error
    assert any("deliberate" in line for line in render(broken, broken.parent)[2])

    page, _ = write_page(tmp_path / "report", spatial_size=(12, 14, 10))
    dom, screenshot, console = render(tmp_path / "report" / "report.html", tmp_path)
    assert console == []
    assert "6 of 20 training patients (30.0%" in dom and 'id="verdict"' in dom
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 2000)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # text, coloured boxes and images: not a blank page
