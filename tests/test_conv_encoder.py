"""`ConvEmbeddingEncoder`: output shapes in 2D and 3D, and bad arguments refused at construction."""

from __future__ import annotations

import pytest
import torch

from memwatch.errors import InputError
from memwatch.networks import ConvEmbeddingEncoder

SHAPE_CASES = [
    # (arguments, input shape, output shape)
    ({"spatial_dims": 3, "channels": (8, 16, 32), "embedding_dim": 32, "hidden_dim": 16}, (2, 1, 32, 32, 16), (2, 32)),
    ({"spatial_dims": 3, "channels": (8,), "embedding_dim": 5, "hidden_dim": 16}, (1, 1, 12, 10, 6), (1, 5)),
    ({"spatial_dims": 2, "in_channels": 3, "channels": (8, 16), "embedding_dim": 128}, (3, 3, 32, 32), (3, 128)),
    ({"spatial_dims": 2, "channels": (8, 16), "pooled_size": 2, "code_channels": 4}, (2, 1, 20, 28), (2, 32)),
]


@pytest.mark.parametrize(("arguments", "input_shape", "output_shape"), SHAPE_CASES)
def test_output_shape(arguments: dict, input_shape: tuple, output_shape: tuple) -> None:
    encoder = ConvEmbeddingEncoder(**arguments)
    assert encoder(torch.rand(input_shape)).shape == output_shape


def test_code_is_pooled_size_per_axis_times_code_channels() -> None:
    encoder = ConvEmbeddingEncoder(spatial_dims=3, channels=(8, 16))
    assert encoder.head[1].in_features == 4 * 4 * 4 * 8
    assert encoder.to_code(encoder.pool(encoder.features(torch.rand(1, 1, 16, 16, 16)))).shape == (1, 8, 4, 4, 4)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"spatial_dims": 1}, "spatial_dims=1"),
        ({"channels": ()}, "channels="),
        ({"channels": (8, 12)}, "channels="),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"pooled_size": 0}, "pooled_size=0"),
    ],
)
def test_bad_arguments_raise_input_error(arguments: dict, named: str) -> None:
    with pytest.raises(InputError, match=named):
        ConvEmbeddingEncoder(**arguments)
