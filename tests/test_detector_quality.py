"""Image families, planted-copy sets, and the planted-copy benchmark at a tiny size through the real CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from bench.detector_quality import clopper_pearson, main, score
from datamodules.families import FAMILIES, planted_variation, render, write_planted_copy_set
from errors import InputError


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_is_deterministic_per_id_different_across_ids_and_in_unit_range(family: str) -> None:
    images = [render(family, f"patient-{k}", (48, 40)) for k in range(6)]
    again = render(family, "patient-0", (48, 40))
    assert again.dtype == np.float32 and again.shape == (1, 48, 40)
    assert np.array_equal(again, images[0])
    for image in images:
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.03
    differences = [np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]]
    assert min(differences) > 0.01, "two patients of one family look alike"


def test_families_are_told_apart_by_their_ids_not_by_a_shared_seed() -> None:
    # The same id in two families gives two different images (each family seeds by its own name too).
    assert not np.allclose(render("vessels", "x", (32, 32)), render("tissue", "x", (32, 32)))


def test_bad_family_or_size_is_an_input_error() -> None:
    with pytest.raises(InputError, match="family='bones'"):
        render("bones", "x", (32, 32))
    with pytest.raises(InputError, match="spatial_size="):
        render("vessels", "x", (32, 32, 32))


def test_planted_variation_is_the_source_flipped_and_rotated_with_another_contrast() -> None:
    source = render("radiograph", "p", (64, 64))
    copy, drawn = planted_variation(source, np.random.default_rng(3))
    assert copy.shape == source.shape and copy.dtype == np.float32 and 0 <= copy.min() <= copy.max() <= 1
    assert abs(drawn["rotation_degrees"]) <= 5 and 0.8 <= drawn["gamma"] <= 1.25 and abs(drawn["brightness"]) <= 0.08
    unflipped = np.flip(copy, axis=1 + drawn["flip_axis"])
    centre = (slice(None), slice(16, 48), slice(16, 48))
    assert np.corrcoef(unflipped[centre].ravel(), source[centre].ravel())[0, 1] > 0.8
    assert np.abs(copy - source).mean() > 0.02


def test_planted_copy_set_holds_the_stated_copies_and_novel_patients(tmp_path) -> None:
    planted = write_planted_copy_set(tmp_path / "set", "vessels", n_train=10, n_val=6, n_copies=4, n_novel=5, spatial_size=(32, 32))
    names = {split: sorted(p.stem for p in (tmp_path / "set" / split).glob("*.png")) for split in ("train", "val", "synthetic")}
    assert (len(names["train"]), len(names["val"]), len(names["synthetic"])) == (10, 6, 9)
    assert not set(names["train"]) & set(names["val"])
    assert sorted([*planted["copies"], *planted["novel"]]) == names["synthetic"]
    assert set(planted["copies"].values()) <= set(names["train"]) and len(set(planted["copies"].values())) == 4
    assert json.loads((tmp_path / "set" / "planted.json").read_text()) == planted
    with Image.open(tmp_path / "set" / "train" / f"{names['train'][0]}.png") as image:
        assert image.mode == "L" and image.size == (32, 32)
    with pytest.raises(InputError, match="is not empty"):
        write_planted_copy_set(tmp_path / "set", "vessels", n_train=10, n_val=6, n_copies=4, n_novel=5)
    with pytest.raises(InputError, match="n_copies=11"):
        write_planted_copy_set(tmp_path / "other", "vessels", n_train=10, n_copies=11)


def test_score_counts_flagged_copies_attribution_and_flagged_novel_images(tmp_path) -> None:
    planted = {"copies": {"s0": "t0", "s1": "t1", "s2": "t2"}, "novel": ["s3", "s4"]}
    rows = [("s0", "t0", True), ("s1", "t9", True), ("s2", "t2", False), ("s3", "t0", True), ("s4", "t1", False)]
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["synthetic_id", "nearest_train_id", "correlation", "is_copy"])
        writer.writerows((s, t, 0.5, flag) for s, t, flag in rows)
    scored = score(path, planted)
    assert scored["sensitivity"] == pytest.approx(2 / 3, abs=1e-4) and scored["attributed"] == pytest.approx(1 / 3, abs=1e-4)
    assert scored["specificity"] == 0.5 and scored["n_novel_flagged"] == 1 and scored["retrieved"] == pytest.approx(2 / 3, abs=1e-4)
    assert scored["median_correlation_copies"] == scored["median_correlation_novel"] == 0.5
    low, high = scored["sensitivity_ci"]
    assert low < 2 / 3 < high
    with pytest.raises(ValueError, match="lacks 1"):
        score(path, {"copies": {"s9": "t0"}, "novel": []})


def test_clopper_pearson_is_exact_at_the_edges_and_narrows_with_more_trials() -> None:
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    assert clopper_pearson(9, 10)[0] == pytest.approx(0.5550, abs=1e-4)  # the textbook value
    assert np.diff(clopper_pearson(90, 100)) < np.diff(clopper_pearson(9, 10))


def test_the_benchmark_at_a_tiny_size_retrieves_planted_copies_and_scores_them_above_novel_images(tmp_path, capsys) -> None:
    output = main(
        [
            "--families", "vessels", "--n-train", "32", "--n-val", "24", "--n-copies", "12", "--n-novel", "16",
            "--size", "32", "--work-dir", str(tmp_path), "--threads", "1",
            "--fit-arg=--trainer.max_steps=50", "--fit-arg=--model.init_args.channels=[16,32,64,128]",
            "--fit-arg=--model.init_args.embedding_dim=32",
        ]
    )  # fmt: skip
    assert json.loads(capsys.readouterr().out) == output
    (family,) = output["families"]
    for key in ("sensitivity", "specificity", "n_copies_flagged", "n_novel_flagged", "fit_seconds", "tau", "sensitivity_ci"):
        assert key in family
    assert family["n_copies"] == 12 and family["n_novel"] == 16 and family["fit_seconds"] > 0
    # Chance retrieval is 1/32; measured 1.00 with the flip-invariant default (0.83 before), copies' median correlation 0.88 against
    # 0.59 for novel images after these 50 steps (0.90 against 0.64 after 100). At this size τ is too coarse for sensitivity to be
    # a stable claim (24 held-out images); the correlation gap and the retrieval are.
    assert family["retrieved"] >= 0.5, family
    assert family["median_correlation_copies"] > family["median_correlation_novel"], family
    assert (tmp_path / "vessels" / "checkpoints" / "last.ckpt").is_file()
