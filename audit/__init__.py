"""`python cli.py audit`: check a synthetic dataset for copies of training patients before it is shared.

    python cli.py audit --embedder EMB.ckpt --train DIR --val DIR --synthetic DIR --out OUT
    python cli.py audit --embedder EMB.ckpt --data configs/mrnet_ldm.yaml --data-arg root=/data/MRNet-v1.0 \\
        --generator LDM.ckpt --n-samples 904 --seed 0 --out OUT --release-dir SHAREABLE
    python cli.py audit --config audit.yaml             (the same options as YAML keys: n_samples, data_arg, ...)
    python cli.py audit --verify-release SHAREABLE      (is the released folder still what was audited?)

The training and validation images come from two folders (read as `FolderDataModule`
reads them, or as `DicomDataModule` when they hold DICOM) or from a config's DataModule;
the synthetic images from a folder or from a generator's checkpoint (the LDM, the pixel DDPM or a
user's; sampled into `OUT/samples/`, sample `i` seeded by `(seed, i)`). Every image is embedded once
by every `--embedder` (a SimCLR checkpoint, `pixel`, or a class_path mapping; the first sets the
headline), and the callback's pipeline counts the copies (`memorization.reference`: τ = the
`--percentile` of training → held-out similarities; `--rule distinct` also asks a copy to be clearly
nearer to one training patient than to any other, by `--margin`), and `OUT` receives `report.html` (the verdict and evidence on one page),
`summary.json`, `pairs.csv`, `train_nn.csv`, `histogram.png` and `copies.png`. A `--generator` is also
scored on the training and held-out images (its `membership_scores`; `memorization.membership`): its
membership signal is in `summary.json` and `report.html`, or why it was skipped.
`--release-dir` receives only the synthetic files that are not copies, and `manifest.json`
(`memorization.release`), which `--verify-release` checks later.

`OUT` (and the release folder) appear only complete: everything is written under a
temporary name and moved into place at the end.

Parts: `options.py` (the parser and its checks), `inputs.py` (embedders, generator, real and synthetic
images), `checkpoint.py` (which generator checkpoint is audited), `command.py` (`run_audit`), `printing.py`
(the verdict on the terminal).
"""

from memwatch.audit.command import run_audit
from memwatch.audit.options import audit_parser
from memwatch.audit.printing import print_audit, print_verification

__all__ = ["audit_parser", "print_audit", "print_verification", "run_audit"]
