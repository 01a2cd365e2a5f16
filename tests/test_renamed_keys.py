"""Each renamed key: its old spelling gives one deprecation line naming the new one, and the same result."""

from __future__ import annotations

import warnings

import pytest
import torch
from jsonargparse import Namespace

from memwatch.audit.options import audit_parser, check_arguments, check_options
from memwatch.cli import memorization_with_membership
from memwatch.lightning_modules.diffusion import PixelDiffusionModule


def test_the_0_1_membership_keys_of_the_memorization_section_move_to_the_membership_section_with_one_line():
    old = Namespace(
        memorization=Namespace(init_args=Namespace(embedder_ckpt="e.ckpt", membership_every_n_epochs=5, membership_n_ref=12)),
        membership=None,
    )
    new = Namespace(
        memorization=Namespace(init_args=Namespace(embedder_ckpt="e.ckpt", membership_every_n_epochs=None, membership_n_ref=None)),
        membership=Namespace(class_path="memwatch.callbacks.MembershipCallback", init_args=Namespace(every_n_epochs=5, n_ref=12)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memorization_with_membership(old)
        memorization_with_membership(new)
    lines = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert lines == [
        "memorization.membership_every_n_epochs is deprecated: use membership.every_n_epochs",
        "memorization.membership_n_ref is deprecated: use membership.n_ref",
    ]
    assert old.membership.init_args.as_dict() == new.membership.init_args.as_dict() == {"every_n_epochs": 5, "n_ref": 12}
    assert old.memorization.init_args.membership_every_n_epochs is None


def test_a_memorization_section_alone_brings_the_membership_signal_at_its_defaults():
    config = Namespace(memorization=Namespace(init_args=Namespace(embedder_ckpt="e.ckpt")), membership=None)
    memorization_with_membership(config)
    assert config.membership.class_path == "memwatch.callbacks.MembershipCallback"


@pytest.mark.parametrize("old", ["--batch-size", "--batch_size"])
def test_the_audits_batch_size_is_the_checks_sample_batch_size_with_one_line(old, tmp_path):
    common = ["--embedder", "pixel", "--train", "t", "--val", "v", "--synthetic", "s", "--out", str(tmp_path / "o")]
    given = audit_parser().parse_args([*common, old, "4"])
    renamed = audit_parser().parse_args([*common, "--sample-batch-size", "4"])
    with pytest.warns(FutureWarning, match="^--batch-size is deprecated: use --sample-batch-size$") as caught:
        check_arguments(given)
    check_arguments(renamed)
    assert len([w for w in caught if issubclass(w.category, FutureWarning)]) == 1
    assert check_options(given) == check_options(renamed) and check_options(given).sample_batch_size == 4


def test_an_audit_block_of_one_is_accepted_as_the_callbacks_is(tmp_path):
    args = audit_parser().parse_args(
        ["--embedder", "pixel", "--train", "t", "--val", "v", "--synthetic", "s", "--out", str(tmp_path / "o"),
         "--sample-batch-size", "1"]
    )  # fmt: skip
    check_arguments(args)
    assert check_options(args).sample_batch_size == 1


def test_the_models_own_sample_batch_size_is_default_sample_batch_size_with_one_line():
    tiny = {"channels": (8, 8), "attention_levels": (False, False), "norm_num_groups": 8, "num_head_channels": 8}
    with pytest.warns(FutureWarning, match="^model.init_args.sample_batch_size is deprecated: use default_sample_batch_size$"):
        old = PixelDiffusionModule(**tiny, sample_batch_size=3)
    new = PixelDiffusionModule(**tiny, default_sample_batch_size=3)
    assert old.hparams == new.hparams and new.hparams.default_sample_batch_size == 3
    assert "sample_batch_size" not in new.hparams
    # sample() without a block size uses it: the same images as with the block given
    torch.manual_seed(0)
    new.image_spatial_size = old.image_spatial_size = (8, 8)
    old.load_state_dict(new.state_dict())
    assert torch.equal(old.sample(4, seed=1, num_inference_steps=2), new.sample(4, seed=1, num_inference_steps=2, sample_batch_size=3))
