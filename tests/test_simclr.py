"""`SimCLRModule`: embedding shapes, bad arguments, logged health signals, checkpoints, and retrieval."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from memwatch.datamodules.phantom import PhantomDataModule
from memwatch.errors import InputError
from memwatch.lightning_modules.simclr import SimCLRModule, embedding_std, top1_retrieval
from memwatch.memorization.variation import vary
from tests.helpers import quiet_trainer

TINY_RESNET = {
    "resnet_block": "basic",
    "resnet_layers": (1, 1, 1, 1),
    "channels": (8, 8, 16, 16),
    "embedding_dim": 16,
}


def pearson_top1(queries: torch.Tensor, references: torch.Tensor) -> float:
    """Fraction of queries whose highest-Pearson-correlation reference has the same index."""
    queries = queries - queries.mean(dim=1, keepdim=True)
    references = references - references.mean(dim=1, keepdim=True)
    correlation = (queries / queries.norm(dim=1, keepdim=True)) @ (
        references / references.norm(dim=1, keepdim=True)
    ).T
    return (correlation.argmax(dim=1) == torch.arange(len(queries))).float().mean().item()


EMBED_CASES = [
    # (arguments, input shape, output shape)
    ({}, (1, 1, 64, 64), (1, 128)),  # the paper's 2D embedder: ResNet-50, 1-channel stem, L = 128
    ({"spatial_dims": 2, **TINY_RESNET}, (2, 1, 32, 32), (2, 16)),
    (
        {"spatial_dims": 2, "in_channels": 2, "resnet_layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)},
        (3, 2, 16, 16),
        (3, 128),
    ),
    ({"spatial_dims": 3, **TINY_RESNET}, (2, 1, 16, 16, 16), (2, 16)),
    (
        {"spatial_dims": 3, "encoder": "conv", "channels": (8, 16), "hidden_dim": 16, "embedding_dim": 32},
        (2, 1, 16, 16, 8),
        (2, 32),
    ),
    (
        {"spatial_dims": 2, "encoder": "conv", "channels": (8,), "hidden_dim": 16, "embedding_dim": 8},
        (1, 1, 32, 32),
        (1, 8),
    ),
]


@pytest.mark.parametrize(("arguments", "input_shape", "output_shape"), EMBED_CASES)
def test_embed_shape(arguments: dict, input_shape: tuple, output_shape: tuple) -> None:
    embeddings = SimCLRModule(**arguments).embed(torch.rand(input_shape, dtype=torch.float64))
    assert embeddings.shape == output_shape
    assert embeddings.dtype == torch.float32 and not embeddings.requires_grad
    assert torch.isfinite(embeddings).all()


def test_embed_runs_in_eval_mode_and_restores_modes() -> None:
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET).train()
    module.encoder.layer1.eval()
    images = torch.rand(4, 1, 32, 32)
    embeddings = module.embed(images)
    # In eval mode batch norm uses running statistics, so one image embeds alike alone or in a batch.
    torch.testing.assert_close(embeddings[1:2], module.embed(images[1:2]))
    assert module.training and module.encoder.training and not module.encoder.layer1.training
    assert not torch.allclose(embeddings.norm(dim=1), torch.ones(4)), (
        "embed must return raw, not normalised, vectors"
    )


@pytest.mark.parametrize("batch_size", [64, 1])
@pytest.mark.parametrize("shape", [(2, 1, 16, 16, 16), (2, 3, 32, 32)])
def test_embed_refuses_images_of_the_wrong_shape(shape: tuple, batch_size: int) -> None:
    with pytest.raises(InputError, match="cannot be embedded"):
        SimCLRModule(spatial_dims=2, **TINY_RESNET).embed(torch.rand(shape), batch_size=batch_size)


@pytest.mark.parametrize(
    "arguments",
    [
        {"spatial_dims": 2, **TINY_RESNET},
        {"spatial_dims": 3, "encoder": "conv", "channels": (8,), "hidden_dim": 16},
    ],
)
def test_embed_in_chunks_equals_one_pass(arguments: dict) -> None:
    module = SimCLRModule(**arguments)
    images = torch.rand(11, 1, *(16,) * arguments["spatial_dims"], dtype=torch.float64)
    whole = module.embed(images, batch_size=len(images))
    for batch_size in (1, 4, 64):
        chunked = module.embed(images, batch_size=batch_size)
        assert chunked.shape == whole.shape and chunked.dtype == torch.float32 and not chunked.requires_grad
        assert chunked.device == next(module.parameters()).device
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert module.embed(images[:0]).shape == (0, module.hparams.embedding_dim)
    with pytest.raises(InputError, match="batch_size=0"):
        module.embed(images, batch_size=0)


def test_embed_runs_the_encoder_one_chunk_at_a_time() -> None:
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET)
    seen = []
    module.encoder.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[0]))
    module.embed(torch.rand(10, 1, 16, 16), batch_size=4)
    assert seen == [4, 4, 2]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"temperature": 0.005}, "temperature=0.005"),
        ({"spatial_dims": 1}, "spatial_dims=1"),
        ({"spatial_dims": 4}, "spatial_dims=4"),
        ({"encoder": "vit"}, "encoder='vit'"),
        ({"resnet_block": "wide"}, "resnet_block='wide'"),
        ({"resnet_layers": (1, 1, 1)}, "resnet_layers="),
        ({"channels": (8, 16)}, "channels="),
        ({"encoder": "conv", "channels": (12,)}, "channels="),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"projection_dim": -1}, "projection_dim=-1"),
        ({"brightness_shift": 1.0}, "brightness_shift=1.0"),
    ],
)
def test_bad_arguments_raise_input_error(arguments: dict, named: str) -> None:
    with pytest.raises(InputError, match=named.replace("(", r"\(").replace("[", r"\[")):
        SimCLRModule(**arguments)


def test_embedding_std_is_zero_when_collapsed_and_one_over_root_n_for_orthogonal_rows() -> None:
    assert embedding_std(torch.ones(6, 4)).item() == pytest.approx(0.0, abs=1e-7)
    assert embedding_std(5.0 * torch.eye(9)).item() == pytest.approx(1 / 3, rel=1e-6)


def test_top1_retrieval_counts_queries_whose_nearest_reference_is_their_own() -> None:
    references = torch.eye(4)
    assert top1_retrieval(references + 0.1, references).item() == 1.0
    assert top1_retrieval(references.flip(0), references).item() == pytest.approx(0.0)
    assert top1_retrieval(references[[1, 0, 2, 3]], references).item() == pytest.approx(0.5)


def test_fit_logs_losses_health_signal_and_retrieval_with_a_cosine_schedule() -> None:
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=10, batch_size=4)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET, lr=1e-3)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"] > 0
    assert 0 < metrics["train/embedding_std"] <= 1
    assert metrics["val/loss"] > 0 and 0 <= metrics["val/top1_retrieval"] <= 1
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), (
        "cosine decays to 0 at the last step"
    )
    assert (
        module.hparams.gather_negatives is True
    )  # a no-op on one process (tests/test_ddp_training.py for 2)


def test_endless_run_is_refused_by_the_cosine_schedule() -> None:
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=4, batch_size=2)
    with pytest.raises(InputError, match="max_steps"):
        quiet_trainer(max_epochs=-1).fit(SimCLRModule(spatial_dims=2, **TINY_RESNET), data)


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path) -> None:
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=6, batch_size=3)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    path = tmp_path / "embedder.ckpt"
    trainer.save_checkpoint(path)

    reloaded = SimCLRModule.from_checkpoint(path, "embedder_ckpt")
    images = torch.rand(5, 1, 16, 16)
    assert torch.equal(reloaded.embed(images), module.embed(images))
    assert reloaded.hparams == module.hparams
    assert reloaded.image_spatial_size == (16, 16)


@pytest.mark.slow
def test_variation_of_a_training_image_retrieves_its_own_patient_after_training() -> None:
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(32, 32), n_patients=40, batch_size=16)
    module = SimCLRModule(
        spatial_dims=2,
        resnet_block="basic",
        resnet_layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        embedding_dim=32,
        lr=1e-3,
    )
    data.setup("fit")
    training_images = torch.cat([batch["image"] for batch in data.reference_dataloader("train")])
    queries = [vary(training_images, seed=seed) for seed in (100, 101, 102)]

    def retrieval_rate() -> float:
        references = module.embed(training_images)
        return sum(pearson_top1(module.embed(q), references) for q in queries) / len(queries)

    untrained = retrieval_rate()
    quiet_trainer(max_steps=150, limit_val_batches=0).fit(module, data)
    trained = retrieval_rate()
    # Chance is 1/32; measured: untrained 0.22, trained 0.97-1.0 over five training seeds.
    assert trained >= 0.8, f"trained top-1 retrieval {trained:.2f}"
    assert trained >= untrained + 0.4, f"training did not help: {untrained:.2f} → {trained:.2f}"


def test_checkpoint_records_the_sorted_training_patients_and_old_checkpoints_load_as_unknown(tmp_path) -> None:
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=8, batch_size=3)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET)
    assert module.training_patients is None
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, data)
    expected = sorted(set(data.train_patients))
    assert module.training_patients == expected and not set(expected) & set(data.val_patients)
    path = tmp_path / "embedder.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["memwatch"]["training_patients"] == expected

    assert SimCLRModule.from_checkpoint(path, "embedder_ckpt").training_patients == expected
    del checkpoint["memwatch"]["training_patients"]  # as written before the record
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert SimCLRModule.from_checkpoint(tmp_path / "old.ckpt", "embedder_ckpt").training_patients is None


def test_fit_without_a_memwatch_datamodule_records_no_training_patients(tmp_path) -> None:
    images = torch.rand(6, 1, 16, 16)
    loader = torch.utils.data.DataLoader([{"image": image, "id": f"x{k}"} for k, image in enumerate(images)], batch_size=3)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "embedder.ckpt")
    assert module.training_patients is None
    assert torch.load(tmp_path / "embedder.ckpt", weights_only=True)["memwatch"]["training_patients"] is None


def test_resumed_fit_records_the_patients_of_both_runs(tmp_path) -> None:
    L.seed_everything(0)
    first = PhantomDataModule(spatial_size=(16, 16), n_patients=8, batch_size=3)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(SimCLRModule(spatial_dims=2, **TINY_RESNET), first)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    second = PhantomDataModule(spatial_size=(16, 16), n_patients=8, batch_size=3, split_seed=1)
    assert set(second.train_patients) != set(first.train_patients)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, second, ckpt_path=tmp_path / "first.ckpt")
    assert module.training_patients == sorted(set(first.train_patients) | set(second.train_patients))


def test_projection_head_trains_the_loss_while_embed_returns_the_representation(tmp_path) -> None:
    L.seed_everything(0)
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=8, batch_size=4)
    module = SimCLRModule(spatial_dims=2, **TINY_RESNET, projection_dim=8, brightness_shift=0.1)
    images = torch.rand(3, 1, 16, 16)
    assert module.projection(module.embed(images)).shape == (3, 8)
    head_before = [p.detach().clone() for p in module.projection.parameters()]
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, data)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, module.projection.parameters(), strict=True))
    embeddings = module.embed(images)
    assert embeddings.shape == (3, TINY_RESNET["embedding_dim"])
    torch.testing.assert_close(embeddings, module.eval().encoder(images))
    trainer.save_checkpoint(tmp_path / "embedder.ckpt")
    reloaded = SimCLRModule.from_checkpoint(tmp_path / "embedder.ckpt", "embedder_ckpt")
    assert torch.equal(reloaded.embed(images), embeddings)


def test_brightness_shift_offsets_each_variation_by_at_most_the_shift() -> None:
    images = torch.full((16, 1, 8, 8), 0.5)
    plain = SimCLRModule(spatial_dims=2, **TINY_RESNET).positive_views(images, seed=3)
    shifted = SimCLRModule(spatial_dims=2, **TINY_RESNET, brightness_shift=0.2).positive_views(images, seed=3)
    offsets = (shifted - plain).flatten(1)
    assert (offsets.max(dim=1).values - offsets.min(dim=1).values).abs().max() < 1e-5  # one offset per image
    assert offsets.abs().max() <= 0.2 + 1e-6 and offsets[:, 0].std() > 0.05


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_invariant_embeds_every_mirror_image_like_its_source_and_other_images_apart(spatial_dims: int) -> None:
    arguments = TINY_RESNET if spatial_dims == 2 else {**TINY_RESNET, "spatial_dims": 3}
    images = torch.rand((2, 1) + (16,) * spatial_dims)
    invariant = SimCLRModule(**arguments, flip_invariant=True)
    plain = SimCLRModule(**arguments)
    plain.load_state_dict(invariant.state_dict())
    reference = invariant.embed(images)
    for axes in ([-1], [-2], list(range(-spatial_dims, 0))):
        torch.testing.assert_close(invariant.embed(images.flip(axes)), reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.embed(images.flip(axes)), plain.embed(images), atol=1e-3)
    assert not torch.allclose(invariant.embed(torch.rand_like(images)), reference, atol=1e-3)


def test_standardize_input_ignores_brightness_and_linear_contrast_only_when_asked() -> None:
    images = torch.rand(2, 1, 16, 16) * 0.5
    standardized = SimCLRModule(**TINY_RESNET, standardize_input=True)
    plain = SimCLRModule(**TINY_RESNET)
    plain.load_state_dict(standardized.state_dict())
    changed = images * 1.4 + 0.2
    torch.testing.assert_close(standardized.embed(changed), standardized.embed(images), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain.embed(changed), plain.embed(images), atol=1e-3)
    assert torch.isfinite(standardized.embed(torch.full((1, 1, 16, 16), 0.3))).all()


def test_flip_invariant_and_standardized_embedder_trains_and_round_trips(tmp_path) -> None:
    data = PhantomDataModule(spatial_size=(16, 16), n_patients=8, batch_size=4)
    module = SimCLRModule(**TINY_RESNET, flip_invariant=True, standardize_input=True)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    trainer.save_checkpoint(tmp_path / "embedder.ckpt")
    reloaded = SimCLRModule.from_checkpoint(tmp_path / "embedder.ckpt", "embedder_ckpt")
    images = torch.rand(3, 1, 16, 16)
    assert reloaded.hparams.flip_invariant and reloaded.hparams.standardize_input
    assert torch.equal(reloaded.embed(images), module.embed(images))
