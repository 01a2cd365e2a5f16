"""The science, free of Lightning, shared by the callback and the audit.

The reference set and detection (`reference`), the streams of a check (`pipeline`, `stream`,
`distributed`), copy detection and rules (`detect`), intervals and chance level (`stats`, `chance`),
the numbers and the history (`summary`, `history`), quality metrics (`quality`), reports and the
release (`report`, `html_report`, `release`), and the generator and embedder protocols (`embedders`).
"""

from memwatch.memorization.detect import CopyReport, detect_copies
from memwatch.memorization.quality import frechet_distance, ms_ssim_diversity

__all__ = ["CopyReport", "detect_copies", "frechet_distance", "ms_ssim_diversity"]
