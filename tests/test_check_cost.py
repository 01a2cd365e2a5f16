"""What a check costs and how it samples: fixed blocks, no read-back per step, decode batches, CUDA-graph option,
`memorization/check_seconds` and `memorization/overhead` with their warning."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memwatch.callbacks import MemorizationCallback
from memwatch.callbacks.preflight import check_sampler_options
from memwatch.errors import InputError
from memwatch.lightning_modules import LatentDiffusionModule, PixelDiffusionModule
from memwatch.memorization.check import CheckOptions
from memwatch.memorization.distributed import block_shard
from memwatch.memorization.stream import blocks
from tests.doubles import ScriptedGenerator
from tests.helpers import MEMORIZATION_SIZE, memorization_history, memorization_phantoms, quiet_trainer

TINY_UNET = dict(channels=(16, 32), norm_num_groups=8, num_head_channels=8, num_train_timesteps=100)


def tiny_pixel_ddpm(size=(16, 16)) -> PixelDiffusionModule:
    torch.manual_seed(0)
    model = PixelDiffusionModule(**TINY_UNET)
    model.image_spatial_size = size
    return model


@pytest.mark.parametrize("block_size", [2, 3])
def test_every_rank_s_blocks_give_the_images_of_each_block_sampled_alone(block_size):
    model, n = tiny_pixel_ddpm(), 7

    def draw(block: range) -> torch.Tensor:
        assert len(block) == block_size and block.start % block_size == 0  # whole, aligned blocks only
        return model.sample(
            len(block),
            seed=(0, 2),
            num_inference_steps=2,
            sample_batch_size=block_size,
            start_index=block.start,
        )

    alone = torch.cat([draw(range(k, k + block_size)) for k in range(0, n, block_size)])[:n]
    for world_size in (1, 2, 3):
        shares = [block_shard(n, block_size, rank, world_size) for rank in range(world_size)]
        images = torch.cat([image for share in shares for image in blocks(draw, share, block_size)])
        assert torch.equal(images, alone), world_size


class ReadBackCounter:
    """Counts reads of a tensor's value into Python (`item`, `int`, `float`, `bool`, `tolist`): each one waits for a GPU."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in ("item", "__int__", "__float__", "__bool__", "tolist", "__index__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            return original(tensor, *args, **kwargs)

        return counted


def test_the_sampling_loop_reads_nothing_back_per_step(monkeypatch):
    model = tiny_pixel_ddpm()
    model.sample(2, num_inference_steps=1)  # anything done once (lazy initialisation) is done
    counter = ReadBackCounter(monkeypatch)
    reads = []
    for steps in (2, 8):
        counter.calls = 0
        model.sample(2, num_inference_steps=steps, sample_batch_size=2)
        reads.append(counter.calls)
    assert reads[0] == reads[1], reads  # the same reads for 2 and 8 steps: none inside the loop


def test_the_decoder_runs_at_its_own_batch_size(autoencoder_ckpt):
    torch.manual_seed(0)
    model = LatentDiffusionModule(autoencoder_ckpt=str(autoencoder_ckpt), **TINY_UNET)
    model.image_spatial_size = (16, 16)
    model.scale_factor.fill_(1.0)
    sizes: list[int] = []
    hook = model.autoencoder.decoder.register_forward_hook(
        lambda module, inputs, output: sizes.append(len(inputs[0]))
    )
    together = model.sample(5, num_inference_steps=2, sample_batch_size=5)
    in_twos = model.sample(5, num_inference_steps=2, sample_batch_size=5, decode_batch_size=2)
    hook.remove()
    assert sizes == [5, 2, 2, 1]
    torch.testing.assert_close(in_twos, together, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="decode_batch_size=0 must be at least 1"):
        model.sample(2, num_inference_steps=1, decode_batch_size=0)


def test_sampler_graphs_on_a_cpu_change_nothing_and_say_so_once(embedder_ckpt, caplog):
    model = tiny_pixel_ddpm(MEMORIZATION_SIZE)
    with model.sampler_graphs():
        graphed = model.sample(3, num_inference_steps=2)
    assert torch.equal(graphed, model.sample(3, num_inference_steps=2))
    callback = MemorizationCallback(str(embedder_ckpt), sampler_graphs=True)
    with caplog.at_level(logging.INFO):
        check_sampler_options(model, torch.device("cpu"), callback.options)
    notices = [r.getMessage() for r in caplog.records if "sampler_graphs" in r.getMessage()]
    assert notices == [
        "memorization.sampler_graphs: CUDA graphs need a GPU; on this CPU sampling runs as without"
    ]


def test_sampler_options_a_generator_cannot_take_are_refused_naming_the_option(embedder_ckpt):
    generator = ScriptedGenerator(spatial_size=MEMORIZATION_SIZE)  # sample() takes no decode_batch_size
    with pytest.raises(
        InputError, match=r"^--memorization\.decode_batch_size: ScriptedGenerator\.sample takes no"
    ):
        check_sampler_options(generator, torch.device("cpu"), CheckOptions(decode_batch_size=2))
    with pytest.raises(
        InputError, match=r"^--memorization\.sampler_graphs: ScriptedGenerator has no sampler_graphs"
    ):
        check_sampler_options(generator, torch.device("cpu"), CheckOptions(sampler_graphs=True))
    for bad in (
        {"sample_batch_size": 0},
        {"decode_batch_size": 0},
        {"max_overhead": 0.0},
        {"max_overhead": 10.5},
    ):
        (option,) = bad
        with pytest.raises(InputError, match=rf"^--memorization\.{option}="):
            MemorizationCallback(str(embedder_ckpt), **bad)


class TimedGenerator(ScriptedGenerator):
    """The scripted generator with a set time per training step and per sampled block."""

    def __init__(self, step_seconds: float = 0.0, block_seconds: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_seconds, self.block_seconds = step_seconds, block_seconds

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_seconds)
        return super().training_step(batch, batch_idx)

    def sample(self, n: int, *args, **kwargs) -> torch.Tensor:
        time.sleep(self.block_seconds)
        return super().sample(n, *args, **kwargs)


def fit_timed(
    tmp_path: Path, embedder_ckpt: Path, max_overhead: float, **timing
) -> tuple[list[dict], list[str], Path]:
    generator = TimedGenerator(spatial_size=MEMORIZATION_SIZE, copied_ids=("phantom-0000",), **timing)
    callback = MemorizationCallback(
        str(embedder_ckpt), n_samples=8, sample_batch_size=4, detector_positives=0, max_overhead=max_overhead,
        progress_seconds=None,
    )  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="timed")
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[callback], logger=logger, limit_train_batches=2
    )
    with pytest.warns() as caught:
        trainer.fit(generator, memorization_phantoms())
    warned = [str(w.message) for w in caught if "max_overhead" in str(w.message)]
    return memorization_history(Path(trainer.log_dir)), warned, Path(trainer.log_dir)


def test_a_slow_check_is_logged_and_warned_about(embedder_ckpt, tmp_path):
    # Two blocks of 0.6 s per check against two training steps of ~nothing: far over max_overhead.
    rows, warned, log_dir = fit_timed(tmp_path, embedder_ckpt, max_overhead=0.25, block_seconds=0.6)
    assert len(rows) == 2 and all(float(row["check_seconds"]) >= 1.2 for row in rows), rows
    assert all(float(row["overhead"]) > 0.25 for row in rows), rows
    assert len(warned) == 2 and warned[0].startswith("memorization check 0 took "), warned
    for option in ("every_n_epochs", "n_samples", "sample_batch_size", "decode_batch_size", "sampler_graphs"):
        assert f"--memorization.{option}" in warned[0], option
    events = EventAccumulator(str(log_dir)).Reload()
    for key in ("memorization/check_seconds", "memorization/overhead"):
        assert [round(e.value, 3) for e in events.Scalars(key)] == [
            pytest.approx(float(row[key.split("/")[1]]), abs=1e-3) for row in rows
        ], key


def test_a_check_cheap_beside_its_training_is_not_warned_about(embedder_ckpt, tmp_path):
    # Two training steps of 1.5 s per epoch: the overhead is the check's seconds over at least 3 s.
    rows, warned, _ = fit_timed(tmp_path, embedder_ckpt, max_overhead=5.0, step_seconds=1.5)
    assert not warned
    for row in rows:
        assert float(row["overhead"]) <= float(row["check_seconds"]) / 3.0 + 1e-3, row
