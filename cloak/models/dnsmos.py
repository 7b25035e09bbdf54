"""DNSMOS: Microsoft's non-intrusive speech-quality predictor (P.835 SIG/BAK/OVRL and P.808 MOS).

The ONNX models shipped inside the `speechmos` wheel, run on onnxruntime exactly as Microsoft's `dnsmos_local.py`
does (speechmos itself is never imported). Used by evaluation (naturalness of clones) and by the engine's
optional early stop (the attacker's clone quality); needs the `eval` extra.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from ..audio import to_rate

DNSMOS_RATE = 16_000
DNSMOS_INPUT_SECONDS = 9.01

# Microsoft DNS-Challenge DNSMOS/dnsmos_local.py: 3rd-order polynomial fits of the P.835 net outputs (non-personalised)
_P835_POLY = {
    "sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
    "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
    "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535]),
}


def dnsmos_model_paths() -> dict[str, Path]:
    """{'p835': .../dnsmos_models/sig_bak_ovr.onnx, 'p808': .../dnsmos_models/model_v8.onnx} inside the installed
    speechmos distribution (found through package metadata; the package is never imported)."""
    try:
        dist = metadata.distribution("speechmos")
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError("DNSMOS needs the ONNX models shipped in the 'speechmos' package: "
                                "pip install 'voicecloak[eval]'") from e
    found: dict[str, Path] = {}
    for f in dist.files or []:
        s = str(f).replace("\\", "/")
        if s.endswith("speechmos/dnsmos_models/sig_bak_ovr.onnx"):
            found["p835"] = Path(str(dist.locate_file(f)))
        elif s.endswith("speechmos/dnsmos_models/model_v8.onnx"):
            found["p808"] = Path(str(dist.locate_file(f)))
    missing = {"p835", "p808"} - set(found)
    if missing:
        raise FileNotFoundError(f"speechmos is installed but its DNSMOS models are missing: {sorted(missing)}")
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DNSMOS:
    """DNSMOS P.835 (SIG/BAK/OVRL) + P.808 MOS on 16 kHz audio, as Microsoft's dnsmos_local.py computes them:
    clips shorter than 9.01 s are tiled up to it, longer ones scored in 9.01 s windows with a 1 s hop, averaged."""

    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        paths = dnsmos_model_paths()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.p835 = ort.InferenceSession(str(paths["p835"]), opts, providers=providers)
        self.p808 = ort.InferenceSession(str(paths["p808"]), opts, providers=providers)
        self.providers = self.p835.get_providers()
        self.info = {k: {"path": str(p), "sha256": _sha256(p)} for k, p in paths.items()}

    @staticmethod
    def _p808_features(seg: np.ndarray) -> np.ndarray:
        import librosa

        mel = librosa.feature.melspectrogram(y=seg, sr=DNSMOS_RATE, n_fft=321, hop_length=160, n_mels=120)
        return ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T.astype(np.float32)

    def __call__(self, audio: np.ndarray, sr: int = DNSMOS_RATE) -> dict[str, float]:
        x = np.clip(np.asarray(to_rate(audio, sr, DNSMOS_RATE), np.float32), -1.0, 1.0)
        if x.size == 0 or not np.isfinite(x).all():
            raise ValueError("DNSMOS needs non-empty finite audio")
        need = int(DNSMOS_INPUT_SECONDS * DNSMOS_RATE)
        while x.size < need:
            x = np.concatenate([x, x])
        hops = int(np.floor(x.size / DNSMOS_RATE) - DNSMOS_INPUT_SECONDS) + 1
        out: dict[str, list[float]] = {"sig": [], "bak": [], "ovrl": [], "p808": []}
        for i in range(hops):
            seg = x[i * DNSMOS_RATE: i * DNSMOS_RATE + need]
            if seg.size < need:
                continue
            raw = self.p835.run(None, {"input_1": seg[None]})[0][0]
            p808 = self.p808.run(None, {"input_1": self._p808_features(seg[:-160])[None]})[0][0][0]
            for k, v in zip(("sig", "bak", "ovrl"), raw, strict=True):
                out[k].append(float(_P835_POLY[k](v)))
            out["p808"].append(float(p808))
        return {k: float(np.mean(v)) for k, v in out.items()}
