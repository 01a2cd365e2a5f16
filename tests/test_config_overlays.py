"""The augmentation configs are overlays: alone, or as a second `--config` after their base, each
resolves to its base with `augment: true` and a run name of its own, as the full copies they replaced did."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, printed_config

ALL_OVERLAYS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "config" in yaml.safe_load(p.read_text()))
OVERLAYS = [p for p in ALL_OVERLAYS if p.stem.endswith("_aug")]


def base_of(overlay: Path) -> Path:
    return overlay.parent / yaml.safe_load(overlay.read_text())["config"]


def test_the_augmentation_configs_and_the_membership_example_are_the_overlays():
    assert [p.name for p in ALL_OVERLAYS] == [
        "chestxray_ldm_aug.yaml", "mrnet_ldm_aug.yaml", "nifti_ldm_aug.yaml", "phantom_ldm_membership.yaml"
    ]  # fmt: skip
    assert all(next(iter(yaml.safe_load(p.read_text()))) == "config" for p in ALL_OVERLAYS)  # keys above it are lost


def test_the_membership_example_is_the_phantom_ldm_stopped_by_the_membership_interval():
    overlay = ROOT / "configs" / "phantom_ldm_membership.yaml"
    expected = printed_config("--config", str(base_of(overlay)))
    expected["trainer"]["logger"]["init_args"]["name"] = overlay.stem
    expected["early_stopping"]["init_args"] |= {
        "monitor": "memorization/membership_auc_low", "divergence_threshold": 0.6
    }  # fmt: skip
    assert printed_config("--config", str(overlay)) == expected


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_an_overlay_alone_or_after_its_base_is_its_base_with_augmentation_and_its_own_run_name(
    overlay, monkeypatch, tmp_path
):
    base = base_of(overlay)
    expected = printed_config("--config", str(base))
    assert expected["data"]["init_args"]["augment"] is False
    expected["data"]["init_args"]["augment"] = True
    expected["trainer"]["logger"]["init_args"]["name"] = overlay.stem
    assert printed_config("--config", str(overlay)) == expected
    assert printed_config("--config", str(base), "--config", str(overlay)) == expected
    # By name from elsewhere: the base is found next to the overlay, not in the working directory.
    monkeypatch.chdir(tmp_path)
    assert printed_config(f"--config={overlay.name}") == expected


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_an_overlay_holds_its_whole_data_section_for_the_audit(overlay):
    # `cli.py audit --data CONFIG` reads the data section from the file alone, without the base.
    data = yaml.safe_load(overlay.read_text())["data"]
    base_data = yaml.safe_load(base_of(overlay).read_text())["data"]
    assert data == {**base_data, "init_args": {**base_data["init_args"], "augment": True}}
