"""Plain `nn.Module`s that MONAI lacks: the embedder encoders."""

from memwatch.networks.conv_encoder import ConvEmbeddingEncoder

__all__ = ["ConvEmbeddingEncoder"]
