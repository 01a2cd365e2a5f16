"""The science, free of Lightning: copy detection between training, validation and synthetic embeddings."""

from memorization.detect import CopyReport, detect_copies
from memorization.quality import frechet_distance, ms_ssim_diversity

__all__ = ["CopyReport", "detect_copies", "frechet_distance", "ms_ssim_diversity"]
