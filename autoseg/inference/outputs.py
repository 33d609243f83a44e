"""The files a prediction writes: names per case and output format, checked before any work.

Nothing here reads pixels or imports torch: ``autoseg predict`` refuses an output that would
overwrite an input, collide with another case's, or land inside a DICOM input folder before the
first network is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import ConfigError, UnknownNameError
from autoseg.inference.inputs import InputCase, is_dicom_case

#: ``--output-format`` values: ``auto`` (the input's format; NIfTI for a DICOM series), ``nifti``
#: (``.nii.gz``), ``dicom-seg`` (a DICOM SEG ``<case>.dcm`` referencing the input series), ``dicom``
#: (restoration: the restored image as a DICOM series ``<case>/`` beside the input series).
OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg", "dicom")
#: Tasks whose output can be written as a DICOM series: their image keeps the source's slices one
#: to one (a segmentation writes a DICOM SEG instead).
DICOM_SERIES_TASKS = ("denoise",)


def output_paths(case: InputCase, output: Path) -> tuple[Path, Path]:
    """The label map and the probabilities file of a case in ``output``."""
    return Path(output) / f"{case.case_id}{case.ending}", Path(output) / f"{case.case_id}.npz"


@dataclass(frozen=True)
class CaseOutputs:
    """Every file :func:`run` writes for one case.

    Attributes:
        labels: label maps, one per image format asked for (``auto``, ``nifti``); may be empty.
        seg: the DICOM SEG (``--output-format dicom-seg``), or None.
        series: the folder of the restored DICOM series (``--output-format dicom``), or None.
        probabilities: ``<case>.npz`` (``--save-probabilities``), or None.
        uncertainty: the entropy and disagreement maps (``--save-uncertainty``), or None.
    """

    labels: tuple[Path, ...]
    seg: Path | None = None
    probabilities: Path | None = None
    uncertainty: tuple[Path, Path] | None = None
    series: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """All of them (the DICOM series as its folder)."""
        extra = (self.seg, self.series, self.probabilities, *(self.uncertainty or ()))
        return (*self.labels, *(p for p in extra if p is not None))

    @property
    def primary(self) -> Path:
        """The label map reported as written: the first image format's, else the SEG, else the series."""
        if self.labels:
            return self.labels[0]
        primary = self.seg if self.seg is not None else self.series
        assert primary is not None
        return primary


def output_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``--output-format`` values, validated and de-duplicated (repeated or comma-separated).

    Raises:
        UnknownNameError: a value is not one of :data:`OUTPUT_FORMATS`.
    """
    words = [formats] if isinstance(formats, str) else list(formats)
    names = [w.strip().lower() for word in words for w in word.split(",") if w.strip()] or ["auto"]
    for name in names:
        if name not in OUTPUT_FORMATS:
            raise UnknownNameError("output format", name, OUTPUT_FORMATS, "--output-format")
    return tuple(dict.fromkeys(names))


def case_outputs(case: InputCase, output: Path, formats: Sequence[str] = ("auto",), *,
                 save_probabilities: bool = False, save_uncertainty: bool = False) -> CaseOutputs:
    """The files a case's prediction writes into ``output`` (see :class:`CaseOutputs`)."""
    from autoseg.inference.uncertainty import uncertainty_paths

    output = Path(output)
    labels = [output / f"{case.case_id}{case.ending}" if fmt == "auto" else output / f"{case.case_id}.nii.gz"
              for fmt in formats if fmt in ("auto", "nifti")]
    return CaseOutputs(
        tuple(dict.fromkeys(labels)),
        output / f"{case.case_id}.dcm" if "dicom-seg" in formats else None,
        output_paths(case, output)[1] if save_probabilities else None,
        uncertainty_paths(output, case.case_id, case.ending) if save_uncertainty else None,
        output / case.case_id if "dicom" in formats else None,
    )


def check_output_outside_dicom_inputs(inputs: Sequence[Path], cases: Sequence[InputCase], output: Path) -> None:
    """A folder of DICOM series is searched below its top level: outputs written inside it would be
    read as inputs by the next run.

    Raises:
        ConfigError: ``-o`` is an ``-i`` folder holding DICOM series, or lies inside one.
    """
    if not any(is_dicom_case(case) for case in cases):
        return
    resolved = Path(output).resolve()
    for folder in (Path(p) for p in inputs):
        if folder.is_dir() and (resolved == folder.resolve() or folder.resolve() in resolved.parents):
            raise ConfigError(f"-o {output}: inside the input folder {folder}, which holds DICOM series; choose an "
                              "output folder outside it")


def check_outputs(cases: Sequence[InputCase], outputs: dict[str, CaseOutputs], output: Path,
                   formats: Sequence[str]) -> None:
    """Raise before any work when an output would overwrite an input or another output.

    Raises:
        ConfigError: an output is an input file, lies in an input DICOM series folder, two
            outputs share a name, ``dicom-seg`` or ``dicom`` is asked for an input that is no DICOM
            series, pydicom/highdicom is missing, or a DICOM series' folder is taken by anything
            but an earlier autoseg series (a file, a symbolic link, other files).
        DatasetError: a DICOM series' headers do not allow a SEG (blank UIDs, multi-frame) or a
            DICOM series output (multi-frame, colour, no slice position).
    """
    input_files = {p.resolve() for case in cases for p in case.images}
    resolved = output.resolve()
    for case in cases:
        if is_dicom_case(case) and (resolved == case.images[0].resolve()
                                    or case.images[0].resolve() in resolved.parents):
            raise ConfigError(f"-o {output}: inside the input DICOM series folder {case.images[0]}; choose an "
                              "output folder outside it")
    owner: dict[Path, str] = {}
    for case in cases:
        for target in outputs[case.case_id].files:
            if target.resolve() in input_files:
                raise ConfigError(f"-o {output}: would overwrite the input {target}; choose another output folder")
            if target in owner:
                raise ConfigError(f"{target.name}: written for case {owner[target]!r} and for case {case.case_id!r}; "
                                  "rename one of them or predict them separately")
            owner[target] = case.case_id
    if "dicom-seg" in formats:
        from autoseg.inference.dicom import check_seg_source, require_highdicom

        require_highdicom()
        for case in cases:
            if not is_dicom_case(case):
                raise ConfigError(f"--output-format dicom-seg: {case.images[0]} is not a DICOM series (a DICOM SEG "
                                  "references its source series); use --output-format auto or nifti for it")
            check_seg_source(case.images[0])
    if "dicom" in formats:
        from autoseg.inference.dicom_series import check_series_source, check_series_target, require_pydicom

        require_pydicom()
        for case in cases:
            if not is_dicom_case(case):
                raise ConfigError(f"--output-format dicom: {case.images[0]} is not a DICOM series (the output series "
                                  "copies its source's headers); use --output-format auto or nifti for it")
            series = outputs[case.case_id].series
            if series is not None:
                check_series_target(series, case.case_id)
            check_series_source(case.images[0])
