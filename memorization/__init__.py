"""The science, free of Lightning, shared by the callback and the audit.

The reference set and detection (`reference`), the streams of a check (`pipeline`, `stream`,
`distributed`), copy detection and rules (`detect`), intervals and chance level (`stats`, `chance`),
the numbers and the history (`summary`, `history`), quality metrics (`quality`), reports and the
release (`report`, `html_report`, `release`), the generator and embedder protocols (`embedders`), and the
paper's variation of an image (`variation`: the self-check's positives, the embedder's positive pairs).
"""

from memwatch.memorization.detect import CopyReport, detect_copies
from memwatch.memorization.quality import frechet_distance, ms_ssim_diversity

__all__ = ["CopyReport", "detect_copies", "frechet_distance", "ms_ssim_diversity"]
