"""Channel names -> intensity normalisation schemes: a torch- and numpy-free leaf.

The dataset check (is every channel name known?), the plans (which scheme names are valid), the
planner (which scheme a channel gets) and the preprocessor (:mod:`autoseg.preprocessing.normalization`,
the implementations) all ask this table, so it sits below all of them.
"""

from __future__ import annotations

from autoseg.errors import UnknownNameError

#: Scheme names that may be written in plans.yaml.
SCHEMES: tuple[str, ...] = ("ct", "zscore", "none", "rescale_0_1", "rgb_0_1")

# Channel names (case-insensitive) that select a scheme. A channel may also be named after a
# scheme directly ("zscore", "noNorm", ... as nnU-Net allows). Anything else is an error: nnU-Net
# silently z-scores unknown names, which hides typos such as "CT " or "Ct-scan".
_CHANNEL_TO_SCHEME: dict[str, str] = {
    **{name: "ct" for name in ("ct", "cta", "cbct", "ct_normalization", "ctnormalization")},
    **{
        name: "zscore"
        for name in (
            "zscore", "z-score", "zscorenormalization", "mri", "mr", "t1", "t1w", "t1c", "t1ce",
            "t1gd", "t1-gd", "t1_gd", "t2", "t2w", "t2*", "flair", "adc", "dwi", "pd", "pdw", "swi",
            "dce", "bold", "cine", "native", "nonnative", "pet", "spect", "us", "ultrasound", "xr",
            "x-ray", "xray", "dx", "cr", "mg", "mammography", "em", "microscopy", "fluorescence",
            "histology", "oct", "fundus", "endoscopy", "r", "g", "b", "red", "green", "blue",
            "gray", "grey", "greyscale", "grayscale", "intensity", "image",
        )
    },
    **{name: "none" for name in ("none", "nonorm", "no_norm", "no-norm", "raw")},
    **{name: "rescale_0_1" for name in ("rescale_0_1", "rescale_to_0_1", "rescaleto01")},
    **{name: "rgb_0_1" for name in ("rgb_0_1", "rgb_to_0_1", "rgbto01")},
}


def scheme_for_channel(channel_name: str) -> str:
    """The normalisation scheme for a channel name from dataset.json.

    Raises:
        UnknownNameError: the name selects no scheme (the message suggests the closest name).
    """
    key = channel_name.strip().lower()
    if key in _CHANNEL_TO_SCHEME:
        return _CHANNEL_TO_SCHEME[key]
    raise UnknownNameError("channel name", channel_name, _CHANNEL_TO_SCHEME)


def known_channel_names() -> list[str]:
    """All channel names that select a scheme (lower case)."""
    return sorted(_CHANNEL_TO_SCHEME)
