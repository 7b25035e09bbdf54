"""The speaker encoders `cloak evaluate` scores clones with: GE2E (white-box: DiffVC's own conditioning), WavLM-SV
and ECAPA-TDNN when the model bundle has them, and the shipped black-box verifier; each described (available or why
not, white- or black-box, its threshold)."""

from __future__ import annotations

from typing import Any

from ..bundle import Models
from ..config import ProtectConfig
from ..models.ecapa import ECAPA_THRESHOLD
from ..models.verifier import VerifierLoadError, load_verifier
from . import metrics as M
from .protocol import NOT_CONFIGURED


def build_encoders(models: Models, cfg: ProtectConfig) -> tuple[list[M.SpeakerEncoder], dict[str, Any]]:
    """Speaker encoders for ASV, and a description of each (available or why not)."""
    encoders: list[M.SpeakerEncoder] = [M.GE2EEncoder(models.ge2e, models.device, white_box=True)]
    id_on = "id" in cfg.losses
    info: dict[str, Any] = {
        "ge2e": {"available": True, "white_box": True, "checksum": models.ge2e.checksum,
                 "note": "white-box: DiffVC's own speaker conditioning, which the cloak differentiates through"
                         + (" and the L_ID encoder" if id_on and "ge2e" in cfg.id_encoders else "")},
    }
    if models.wavlm is not None:
        wb = id_on and "wavlm" in cfg.id_encoders
        encoders.append(M.WavLMEncoder(models.wavlm, models.device, white_box=wb))
        info["wavlm"] = {"available": True, "white_box": wb, "checksum": getattr(models.wavlm, "checksum", None),
                         "note": "WavLM-SV (bundle wavlm-sv/)" + (", used by L_ID: white-box" if wb else
                                                                  ", not used by the cloak: black-box")}
    else:
        info["wavlm"] = {"available": False, "reason": "not configured: the model bundle has no wavlm-sv/ directory"}
    ecapa = getattr(models, "ecapa", None)
    if ecapa is not None:
        encoders.append(M.EcapaEncoder(ecapa, models.device, white_box=False))
        info["ecapa"] = {"available": True, "white_box": False, "checksum": getattr(ecapa, "checksum", None),
                         "threshold": ECAPA_THRESHOLD, "fixed_threshold": ECAPA_THRESHOLD,
                         "note": "ECAPA-TDNN speechbrain/spkrec-ecapa-voxceleb (bundle ecapa/, native port), not "
                                 "used by the cloak: black-box; the paper's fixed threshold, cosine >= 0.25 accepts"}
    else:
        info["ecapa"] = {"available": False, "reason": NOT_CONFIGURED["ecapa"], "threshold": ECAPA_THRESHOLD}
    try:
        verifier = load_verifier(device=models.device)
    except (FileNotFoundError, VerifierLoadError) as e:
        info["verifier"] = {"available": False, "reason": f"not available: {e}"}
    else:
        encoders.append(M.VerifierEncoder(verifier, models.device, white_box=False))
        cal = verifier.calibration
        info["verifier"] = {
            "available": True, "white_box": False, "checksum": verifier.checksum,
            "threshold": verifier.threshold, "fixed_threshold": verifier.threshold,
            "threshold_source": f"shipped with the weights: EER threshold ({100 * float(cal['eer']):.1f} % EER) on "
                                f"{cal.get('data', 'held-out corpus-train speakers')}, trial: {cal.get('trial')}",
            "note": f"the shipped speaker verifier (ECAPA-TDNN, {verifier.config.channels} channels, trained on "
                    "corpus-train only, disjoint from the evaluation speakers), not used by the cloak: black-box"}
    return encoders, info
