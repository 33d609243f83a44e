"""Channel names -> intensity normalisation schemes: a torch- and numpy-free leaf.

The dataset check (is every channel name known?), the plans (which scheme names are valid), the
planner (which scheme a channel gets) and the preprocessor (:mod:`autoseg.preprocessing.normalization`,
the implementations) all ask this table, so it sits below all of them.
"""

from __future__ import annotations

import difflib
import re

from autoseg.errors import UnknownNameError

#: Scheme names that may be written in plans.yaml. ``linear`` (``(x - mean) / std`` with the plan's
#: numbers, no clipping) is the planners' choice for restoration, where the normalisation must be
#: inverted exactly; no channel name selects it.
SCHEMES: tuple[str, ...] = ("ct", "zscore", "none", "rescale_0_1", "rgb_0_1", "linear")

# Channel names (case-insensitive) that select a scheme. A channel may also be named after a
# scheme directly ("zscore", "noNorm", ... as nnU-Net allows).
_CHANNEL_TO_SCHEME: dict[str, str] = {
    **{
        name: "ct"
        for name in (
            "ct", "cta", "cbct", "ct_normalization", "ctnormalization",
            # Usual CT abbreviations (non-contrast, contrast-enhanced, low-dose, high-resolution,
            # multi-detector): otherwise near misses of "cbct", refused with a did-you-mean that names
            # cone-beam CT. Three-letter ones (pCT, sCT) are left out: every name on this list is also
            # a spelling whose near misses are refused, and "PT" (PET) or "PC" (phase-contrast MRI)
            # would be near misses of them.
            "ncct", "cect", "ldct", "hrct", "mdct",
        )
    },
    **{
        name: "zscore"
        for name in (
            "zscore", "z-score", "zscorenormalization",
            # MRI and its usual sequence names (BraTS, MSD, clinical series descriptions).
            "mri", "mr", "t1", "t1w", "t1c", "t1ce", "t1gd", "t1-gd", "t1_gd", "t1+c", "t1post", "t1-post",
            "t1contrast", "mprage", "t2", "t2w", "t2*", "t2star", "t2_star", "t2-star", "flair", "t2flair",
            "t2-flair", "t2_flair", "ir", "stir", "tirm", "pd", "pdw", "pd-fs", "dwi", "adc", "hbv", "b0", "b1000",
            "fa", "md", "swi", "qsm", "gre", "dixon", "ssfp", "fiesta", "space", "tof", "mra", "dce", "dsc",
            "perfusion", "asl", "bold", "cine", "lge", "native", "nonnative",
            # Other modalities whose intensities have no fixed scale.
            "pet", "suv", "spect", "us", "ultrasound", "xr", "x-ray", "xray", "dx", "cr", "mg", "mammography",
            "em", "microscopy", "fluorescence", "histology", "oct", "fundus", "endoscopy", "r", "g", "b", "red",
            "green", "blue", "gray", "grey", "greyscale", "grayscale", "intensity", "image",
        )
    },
    **{name: "none" for name in ("none", "nonorm", "no_norm", "no-norm", "raw")},
    **{name: "rescale_0_1" for name in ("rescale_0_1", "rescale_to_0_1", "rescaleto01")},
    **{name: "rgb_0_1" for name in ("rgb_0_1", "rgb_to_0_1", "rgbto01")},
}
#: How the schemes themselves are spelled. A name close to one of these (``zscor``, ``noNrm``,
#: ``CTT``) is a typo and refused with a did-you-mean; a name that merely resembles a modality alias
#: (``IR`` and the RGB channel ``r``) is not.
_SCHEME_SPELLINGS: tuple[str, ...] = tuple(
    name for name, scheme in _CHANNEL_TO_SCHEME.items() if scheme != "zscore" or "score" in name
)
#: Unknown names get this scheme, with a note in the check and the plan (nnU-Net's fallback).
FALLBACK_SCHEME = "zscore"


def _key(channel_name: str) -> str:
    return channel_name.strip().lower()


def is_known_channel(channel_name: str) -> bool:
    """True when the name is a modality, sequence or scheme name autoseg knows."""
    return _key(channel_name) in _CHANNEL_TO_SCHEME


def scheme_for_channel(channel_name: str) -> str:
    """The normalisation scheme for a channel name from dataset.json.

    Known names select their scheme. An unknown name gets :data:`FALLBACK_SCHEME` (z-score, as
    in nnU-Net) — callers say so (:func:`is_known_channel`) — unless it looks like a misspelt
    scheme or a CT channel, which would be normalised wrongly in silence.

    Raises:
        UnknownNameError: a near miss of a scheme's spelling (``zscor``, ``CTT``), or a name with
            ``CT`` as a word in it (``Ct-scan``: CT needs the CT scheme, not z-score).
    """
    key = _key(channel_name)
    if key in _CHANNEL_TO_SCHEME:
        return _CHANNEL_TO_SCHEME[key]
    words = [w for w in re.split(r"[^a-z0-9*+]+", key) if w]
    close = difflib.get_close_matches(key, _SCHEME_SPELLINGS, n=1, cutoff=0.75)
    if "ct" in words or close:
        raise UnknownNameError("channel name", channel_name, ["CT"] if "ct" in words else close)
    return FALLBACK_SCHEME


def known_channel_names() -> list[str]:
    """All channel names that select a scheme (lower case)."""
    return sorted(_CHANNEL_TO_SCHEME)
