"""Sharding and gathering a check's work: exact cover, no split pairs, uneven gathers, and failing together (2 gloo ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from memwatch.memorization.distributed import block_shard, gather_rows, shard
from tests.helpers import ROOT

SIZES = [(n, world_size) for n in range(0, 26) for world_size in range(1, 7)]


def test_shards_cover_every_index_once_in_rank_order_and_balanced():
    for n, world_size in SIZES:
        shares = [shard(n, rank, world_size) for rank in range(world_size)]
        assert [i for share in shares for i in share] == list(range(n)), (n, world_size)
        lengths = [len(share) for share in shares]
        assert max(lengths) - min(lengths) <= 1, (n, world_size, lengths)


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5])
def test_block_shares_are_whole_aligned_blocks_and_never_split_a_pair(block_size):
    unit = block_size if block_size % 2 == 0 else 2 * block_size  # odd blocks go two at a time
    for n, world_size in SIZES:
        shares = [block_shard(n, block_size, rank, world_size) for rank in range(world_size)]
        assert [i for share in shares for i in share] == list(range(n)), (n, world_size)
        for share in shares:
            if len(share):
                assert share.start % unit == 0, (n, world_size, share)  # aligned, so even: (2k, 2k + 1) never split
                assert share.stop == n or share.stop % unit == 0, (n, world_size, share)  # whole blocks
        units = [-(-len(share) // unit) for share in shares]
        assert max(units) - min(units) <= 1, (n, world_size, units)


def test_one_process_gathers_its_own_rows():
    import torch

    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(rows) is rows


WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {root!r})
    from memwatch.errors import InputError, SharedFailure
    from memwatch.memorization.distributed import fail_together, gather_rows, shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {{}}
    # Uneven pieces, one of them empty, as a sharded set of 3 on 2 ranks or a rank without copies.
    for name, n in (("three", 3), ("one", 1), ("seven", 7)):
        mine = shard(n, rank, 2)
        local = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)[mine.start : mine.stop]
        out[name] = gather_rows(local).tolist()
    started = time.perf_counter()
    try:
        with fail_together(torch.device("cpu"), "writing the report"):
            if rank == 1:
                raise InputError("output_dir=/x is not writable: choose another folder")
        out["failure"] = None
    except SharedFailure as failure:
        out["failure"] = ["shared", str(failure), failure.kind]
    except InputError as failure:
        out["failure"] = ["own", str(failure)]
    out["seconds"] = time.perf_counter() - started
    with fail_together(torch.device("cpu"), "nothing"):
        pass  # the ranks still agree after a failure was shared
    with open(f"rank{{rank}}.json", "w") as handle:
        json.dump(out, handle)
    dist.destroy_process_group()
    """
)


def test_two_ranks_gather_uneven_rows_and_fail_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        assert outputs[rank]["three"] == [[0, 1], [2, 3], [4, 5]]
        assert outputs[rank]["one"] == [[0, 1]]
        assert outputs[rank]["seven"] == [[2 * i, 2 * i + 1] for i in range(7)]
        assert outputs[rank]["seconds"] < 30
    assert outputs[1]["failure"] == ["own", "output_dir=/x is not writable: choose another folder"]
    assert outputs[0]["failure"] == [
        "shared", "rank 1 failed while writing the report: output_dir=/x is not writable: choose another folder", "input",
    ]  # fmt: skip
