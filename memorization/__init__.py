"""The science, free of Lightning: copy detection between training, validation and synthetic embeddings."""

from memorization.detect import CopyReport, detect_copies

__all__ = ["CopyReport", "detect_copies"]
