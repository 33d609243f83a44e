"""Model files, the format: a trained model as one zip to hand on, checked member by member before use.

``autoseg export WORK -o hippo.autoseg.zip`` writes one (:mod:`autoseg.inference.model_export`);
``autoseg predict --model``, ``autoseg import`` and :class:`autoseg.Segmenter` read it through
:func:`read_model`. The members form a closed list::

    manifest.json                       format, schema_version, autoseg_version, task,
                                        configurations -> folds + checkpoint kind,
                                        members -> sha256 + size of every other member
    MODEL.md                            what it segments, training data, CV metrics, licence
                                        (:mod:`autoseg.inference.model_card`)
    plans.yaml                          the experiment's plans
    dataset.json                        labels, channels, task, number of training cases
    best.yaml                           the configurations and folds predicted with by default,
                                        with find-best's postprocessing when it chose them
    weights/<configuration>/fold_<k>.npz   the fold's state dict: one .npy per tensor, no pickle
    weights/<configuration>/fold_<k>.json  the checkpoint's other entries (configuration, epoch, ...)
    onnx/<configuration>/fold_<k>.fp32.onnx  with ``export --format onnx``: the fold's network as an
    onnx/<configuration>/fold_<k>.int8.onnx  ONNX graph (and its int8 quantisation with ``--int8``)
                                        for the OpenVINO and ONNX Runtime engines
                                        (:mod:`autoseg.inference.engines`); schema 2

A file without ONNX graphs is written as schema 1, so autoseg versions before the graphs read it.

Nothing in a model file is a pickle: weights are ``.npy`` arrays read with
``allow_pickle=False``, metadata is JSON and YAML (``yaml.safe_load``). The bytes are reproducible:
sorted members, fixed timestamps and permissions, so exporting the same model twice gives the
same file (and the same sha256).

Reading (:func:`read_model`) checks, in this order, and stops at the first problem with one line
naming the file and what to do: the file is a complete zip; every entry's *name* (before any data
is read): no absolute path, no ``..`` (zip-slip), no backslash, no symbolic link, no duplicate,
no encryption, only stored or deflated data, only the names above, and sizes within
:data:`MAX_TEXT_BYTES` per text member, :data:`MAX_WEIGHTS_BYTES` per weights member and
:data:`MAX_TOTAL_BYTES` in all (so a zip bomb is refused from its directory, and reading never
inflates more than the declared size); then the manifest and its ``schema_version`` (a newer one:
upgrade autoseg); then each member's size and sha256 against the manifest before it is parsed;
then the content: no pickled data (plain pickles, PyTorch's zip pickles, numpy object arrays),
valid JSON/YAML, state dicts that fit their configuration's network. The manifest's hashes
detect damage and edits made without rewriting the manifest; they are not a signature — compare
the whole file's sha256 (printed by ``autoseg export``) with the one its author publishes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import stat
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg import plans as plans_io
from autoseg._version import __version__
from autoseg.checkpoint import CHECKPOINT_FORMAT
from autoseg.errors import ConfigError, PlanError
from autoseg.tasks import DEFAULT_TASK

#: Written as ``format`` in every manifest.
MODEL_FORMAT = "autoseg-model"
#: The manifest schema this autoseg writes and the newest it reads.
MODEL_SCHEMA_VERSION = 2
#: The schema of files without ONNX graphs (readable by every autoseg that reads model files).
BASE_SCHEMA_VERSION = 1
#: ONNX graph kinds a configuration may carry (``fp32`` always, with ``int8`` optionally).
ONNX_KINDS = ("fp32", "int8")
#: The usual ending of a model file (not enforced).
MODEL_ENDING = ".autoseg.zip"
MANIFEST = "manifest.json"
MODEL_CARD = "MODEL.md"
#: Members other than weights; all but best.yaml are required.
TEXT_MEMBERS = (MODEL_CARD, "best.yaml", "dataset.json", MANIFEST, "plans.yaml")
#: Checkpoint kinds a model file may hold (``latest`` carries optimizer state: not a model to hand on).
EXPORT_CHECKPOINTS = ("final", "best")
#: Size limits (uncompressed), checked from the zip's directory before anything is inflated, so a
#: zip bomb is refused unread. Generous for real models: a fold's float32 weights are 4 bytes a
#: parameter (the cpu preset's Hippocampus 3d_fullres: 1.3 M parameters, 5 MB).
MAX_TEXT_BYTES = 16 * 2**20
MAX_WEIGHTS_BYTES = 4 * 2**30
MAX_TOTAL_BYTES = 32 * 2**30
MAX_MEMBERS = 1000

_CONFIG = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}"
_WEIGHTS_NAME = re.compile(rf"^weights/({_CONFIG})/fold_(0|[1-9][0-9]{{0,3}})\.(npz|json)$")
TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.]{1,200}$")
_ONNX_NAME = re.compile(rf"^onnx/({_CONFIG})/fold_(0|[1-9][0-9]{{0,3}})\.(fp32|int8)\.onnx$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_MANIFEST_KEYS = ("format", "schema_version", "autoseg_version", "task", "configurations", "members")
#: Checkpoint entries kept in ``fold_<k>.json`` (what the trainer's weights-only payload holds).
META_KEYS = ("format", "epoch", "ema_fg_dice", "configuration_name", "configuration", "plans", "train_config", "fold")
META_REQUIRED = ("format", "configuration_name", "configuration", "plans", "fold")


class ModelFileError(ConfigError):
    """A model file is unreadable, damaged, unsafe or of a newer schema."""


@dataclass(frozen=True)
class FoldWeights:
    """One fold of a model file.

    Attributes:
        configuration: the configuration's name.
        fold: the fold index.
        meta: the checkpoint's entries other than the weights (``fold_<k>.json``).
        state: the state dict as numpy arrays, in the network's order.
    """

    configuration: str
    fold: int
    meta: dict[str, Any]
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelFile:
    """A model file, verified and parsed (:func:`read_model`).

    Attributes:
        path: the file.
        manifest: ``manifest.json``.
        members: every member's bytes except the weights (text members).
        weights: the folds, sorted by configuration and fold.
        graphs: the ONNX graphs, ``{(configuration, fold, kind): bytes}`` (``kind`` in :data:`ONNX_KINDS`).
    """

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]
    weights: tuple[FoldWeights, ...]
    graphs: dict[tuple[str, int, str], bytes] = field(default_factory=dict)

    @property
    def checkpoint(self) -> str:
        """The checkpoint kind the folds hold (``final`` or ``best``)."""
        kinds = {c["checkpoint"] for c in self.manifest["configurations"].values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def configurations(self) -> dict[str, list[int]]:
        """``{configuration: folds}``."""
        return {name: list(c["folds"]) for name, c in self.manifest["configurations"].items()}


# ----------------------------------------------------------------------------------------------
# Writing


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    """An entry with fixed time, owner and permissions (reproducible bytes)."""
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = compress_type
    info.create_system = 3  # Unix, so that external_attr holds the mode below on every platform
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def npz_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    """A state dict as ``.npz`` bytes (one ``<name>.npy`` per tensor, in order), reproducibly.

    ``np.savez`` stamps the current time into its zip entries; this writes the same format with
    fixed ones, and never pickles (``allow_pickle=False``).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in state.items():
            with archive.open(_zip_info(f"{name}.npy", zipfile.ZIP_STORED), "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(data: Any) -> bytes:
    """JSON in the data's own key order: label order is meaningful (class and region order)."""
    return (json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def plain_json(value: Any, where: str) -> Any:
    """Checkpoint metadata as JSON data: tuples -> lists, numpy and torch scalars -> numbers, NaN -> None."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v, where) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ConfigError(f"{where}: a {type(value).__name__} in the checkpoint's metadata cannot be written as JSON; "
                      "re-train with this autoseg")


def write_model_zip(path: Path, members: Mapping[str, bytes], manifest: Mapping[str, Any]) -> None:
    """Write ``members`` and a manifest with their hashes to ``path`` (not atomic: the caller's temporary)."""
    manifest = dict(manifest)
    manifest["members"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                           for name, data in sorted(members.items())}
    everything = {**members, MANIFEST: json_bytes(manifest)}
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for name in sorted(everything):
            archive.writestr(_zip_info(name, zipfile.ZIP_DEFLATED), everything[name], compresslevel=6)


# ----------------------------------------------------------------------------------------------
# Reading


def read_model(path: Path, *, shown_as: Path | None = None, check_networks: bool = True) -> ModelFile:
    """Open, check and parse a model file (the checks and their order: the module docstring).

    Args:
        path: the model file.
        shown_as: the name used in messages (the final name while an export checks its temporary).
        check_networks: also check that each fold's weights fit its configuration's network
            (builds the networks: imports torch).

    Returns:
        The parsed content; nothing is written.

    Raises:
        ModelFileError: one line naming the file, the problem and what to do.
    """
    path = Path(path)
    where = Path(shown_as) if shown_as is not None else path
    if path.is_dir():
        raise ModelFileError(f"{where}: a folder, not a model file; pass an experiment folder as WORK (without "
                             "--model), or make a model file with 'autoseg export'")
    if not path.is_file():
        raise ModelFileError(f"{where}: model file not found")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head == b"PK\x03\x04":
            raise ModelFileError(f"{where}: truncated or damaged zip (its directory at the end is missing or broken); "
                                 "copy the model file again") from None
        raise ModelFileError(f"{where}: not a zip file, so not an autoseg model file (made by 'autoseg export')"
                             + ("; it looks like a pickle, which autoseg never loads" if _looks_pickled(head) else "")
                             ) from None
    with archive:
        infos = _check_entries(where, archive.infolist())
        manifest = _read_manifest(where, archive, infos)
        reader = _MemberReader(where, archive, infos, manifest["members"])
        members = {name: reader.read(name) for name in sorted(infos)
                   if not name.startswith(("weights/", "onnx/")) and name != MANIFEST}
        _check_text_members(where, manifest, members)
        weights = []
        graphs: dict[tuple[str, int, str], bytes] = {}
        for configuration, entry in sorted(manifest["configurations"].items()):
            for fold in entry["folds"]:
                prefix = f"weights/{configuration}/fold_{fold}"
                meta = _fold_meta(where, f"{prefix}.json", reader.read(f"{prefix}.json"), configuration, fold,
                                  manifest["task"])
                state = _read_npz(where, f"{prefix}.npz", reader.read(f"{prefix}.npz"))
                weights.append(FoldWeights(configuration, fold, meta, state))
                for kind in entry.get("onnx", []):
                    member = onnx_member(configuration, fold, kind)
                    graph = reader.read(member)
                    if _looks_pickled(graph):
                        raise _fail(where, member, "holds pickled data, which autoseg never loads", _NOT_OURS)
                    graphs[(configuration, fold, kind)] = graph
    model = ModelFile(where, manifest, members, tuple(weights), graphs)
    if check_networks:
        _check_networks(model)
    return model


def onnx_member(configuration: str, fold: int, kind: str) -> str:
    """The member name of a fold's ONNX graph."""
    return f"onnx/{configuration}/fold_{fold}.{kind}.onnx"


def _fail(where: Path, member: str, problem: str, fix: str) -> ModelFileError:
    return ModelFileError(f"{where}: {member}: {problem}; {fix}")


_NOT_OURS = "not a model file written by 'autoseg export' (or altered after it) — get the original from its author"


def _check_entries(where: Path, infos: Sequence[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Every entry's name, kind and size, from the zip's directory alone (no data read)."""
    if len(infos) > MAX_MEMBERS:
        raise ModelFileError(f"{where}: {len(infos)} entries (at most {MAX_MEMBERS}); {_NOT_OURS}")
    seen: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        shown = repr(name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise _fail(where, shown, "an absolute path, which could write outside the target folder", _NOT_OURS)
        if "\\" in name:
            raise _fail(where, shown, "a name with a backslash", _NOT_OURS)
        if ".." in name.split("/"):
            raise _fail(where, shown, "a name with '..' (zip-slip: it could write outside the target folder)", _NOT_OURS)
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            raise _fail(where, shown, "a symbolic link", _NOT_OURS)
        if name in seen:
            raise _fail(where, shown, "appears twice", _NOT_OURS)
        if any(ord(c) < 32 for c in name) or not (name in TEXT_MEMBERS or _WEIGHTS_NAME.match(name)
                                                   or _ONNX_NAME.match(name)):
            pickled = name.endswith((".pkl", ".pickle", ".pt", ".pth")) or name.endswith("/data.pkl")
            raise _fail(where, shown, "holds pickled data, which autoseg never loads" if pickled else
                        "not a member of an autoseg model file (allowed: " + ", ".join(TEXT_MEMBERS) +
                        ", weights/<configuration>/fold_<k>.npz and .json, "
                        "onnx/<configuration>/fold_<k>.fp32.onnx and .int8.onnx)", _NOT_OURS)
        if info.flag_bits & 0x1:
            raise _fail(where, shown, "encrypted", _NOT_OURS)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(where, shown, f"compression method {info.compress_type} (autoseg writes deflate)", _NOT_OURS)
        limit = MAX_WEIGHTS_BYTES if name.endswith((".npz", ".onnx")) else MAX_TEXT_BYTES
        if info.file_size > limit:
            raise _fail(where, shown, f"{info.file_size} bytes uncompressed (at most {limit})", _NOT_OURS)
        total += info.file_size
        seen[name] = info
    if total > MAX_TOTAL_BYTES:
        raise ModelFileError(f"{where}: {total} bytes uncompressed in all (at most {MAX_TOTAL_BYTES}); {_NOT_OURS}")
    return seen


class _MemberReader:
    """Reads a member whole (its size was capped from the directory) and checks its size and sha256."""

    def __init__(self, where: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
                 expected: dict[str, dict[str, Any]]) -> None:
        self.where, self.archive, self.infos, self.expected = where, archive, infos, expected

    def read(self, name: str) -> bytes:
        data = _inflate(self.where, self.archive, self.infos[name])
        record = self.expected[name]
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise _fail(self.where, name, "does not match the sha256 in manifest.json (the file was damaged or "
                        "altered after export)", "get a fresh copy from its author")
        return data


def _inflate(where: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    import zlib

    chunks: list[bytes] = []
    try:
        with archive.open(info) as handle:
            # In 1 MiB steps: zipfile then inflates at most that much per call, stops at the
            # declared (capped) size and checks the CRC at the end.
            while chunk := handle.read(2**20):
                chunks.append(chunk)
        return b"".join(chunks)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _fail(where, info.filename, f"damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                    "copy the model file again") from None


def _looks_pickled(data: bytes) -> bool:
    """A pickle of protocol 2 or later (what pickle and torch.save write) starts with PROTO."""
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _read_manifest(where: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    if MANIFEST not in infos:
        raise ModelFileError(f"{where}: no {MANIFEST}; {_NOT_OURS}")
    raw = _inflate(where, archive, infos[MANIFEST])
    data = _parse_json(where, MANIFEST, raw)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise _fail(where, MANIFEST, f"not an autoseg model manifest (no format: {MODEL_FORMAT})", _NOT_OURS)
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(where, MANIFEST, f"invalid schema_version {version!r}", _NOT_OURS)
    if version > MODEL_SCHEMA_VERSION:
        raise ModelFileError(f"{where}: written by autoseg {data.get('autoseg_version', '?')} with model schema "
                             f"{version}; this autoseg ({__version__}) reads up to schema {MODEL_SCHEMA_VERSION}: "
                             "upgrade autoseg (pip install -U autoseg)")
    unknown = sorted(set(data) - set(_MANIFEST_KEYS))
    missing = [k for k in _MANIFEST_KEYS if k not in data]
    if unknown or missing:
        raise _fail(where, MANIFEST, f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}", _NOT_OURS)
    members = data["members"]
    if not isinstance(members, dict) or not all(
            isinstance(r, dict) and set(r) == {"sha256", "size"} and isinstance(r["sha256"], str)
            and _SHA256.match(r["sha256"]) and isinstance(r["size"], int) for r in members.values()):
        raise _fail(where, MANIFEST, "'members' must map each member to its sha256 and size", _NOT_OURS)
    present = set(infos) - {MANIFEST}
    if set(members) != present:
        extra, absent = sorted(present - set(members)), sorted(set(members) - present)
        problem = (f"{extra[0]!r} is in the zip but not in the manifest" if extra
                   else f"{absent[0]!r} is in the manifest but not in the zip")
        raise _fail(where, MANIFEST, problem, _NOT_OURS)
    configurations = data["configurations"]
    if not isinstance(configurations, dict) or not configurations:
        raise _fail(where, MANIFEST, "'configurations' must name at least one configuration", _NOT_OURS)
    weights, graphs = set(), set()
    for name, entry in configurations.items():
        kinds = entry.get("onnx", ["fp32"]) if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and set(entry) - {"onnx"} == {"folds", "checkpoint"}
                and isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)
                and "fp32" in kinds and set(kinds) <= set(ONNX_KINDS)
                and len(set(kinds)) == len(kinds) and ("onnx" not in entry or version >= 2)
                and isinstance(entry["folds"], list)
                and entry["folds"] and all(isinstance(f, int) and not isinstance(f, bool) and f >= 0
                                           for f in entry["folds"])
                and entry["checkpoint"] in EXPORT_CHECKPOINTS and re.fullmatch(_CONFIG, name)):
            raise _fail(where, MANIFEST, f"configuration {name!r}: expected folds (a list of fold numbers), "
                        f"checkpoint ({' or '.join(EXPORT_CHECKPOINTS)}) and optionally onnx (fp32, or fp32 and "
                        "int8; schema 2)", _NOT_OURS)
        weights |= {f"weights/{name}/fold_{f}.{ending}" for f in entry["folds"] for ending in ("npz", "json")}
        graphs |= {onnx_member(name, f, kind) for f in entry["folds"] for kind in entry.get("onnx", [])}
    for expected, prefix, what in ((weights, "weights/", "weights"), (graphs, "onnx/", "ONNX graphs")):
        listed = {n for n in present if n.startswith(prefix)}
        if expected != listed:
            odd = sorted(expected ^ listed)[0]
            raise _fail(where, MANIFEST, f"its configurations and folds do not match the {what} in the zip ({odd!r})",
                        _NOT_OURS)
    for name in ("plans.yaml", "dataset.json", MODEL_CARD):
        if name not in present:
            raise ModelFileError(f"{where}: no {name}; {_NOT_OURS}")
    if not isinstance(data["task"], str) or not isinstance(data["autoseg_version"], str):
        raise _fail(where, MANIFEST, "'task' and 'autoseg_version' must be names", _NOT_OURS)
    return data


def _parse_json(where: Path, member: str, raw: bytes) -> Any:
    if _looks_pickled(raw):
        raise _fail(where, member, "holds pickled data, which autoseg never loads", _NOT_OURS)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(where, member, f"not valid JSON ({str(exc).splitlines()[0]})", _NOT_OURS) from None


def _parse_yaml(where: Path, member: str, raw: bytes) -> Any:
    import yaml

    if _looks_pickled(raw):
        raise _fail(where, member, "holds pickled data, which autoseg never loads", _NOT_OURS)
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _fail(where, member, f"not valid YAML ({str(exc).splitlines()[0]})", _NOT_OURS) from None


def _check_text_members(where: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> None:
    try:
        plans = plans_io.from_dict(_parse_yaml(where, "plans.yaml", members["plans.yaml"]))
    except PlanError as exc:
        raise _fail(where, "plans.yaml", f"invalid ({exc})", _NOT_OURS) from None
    if plans.task != manifest["task"]:
        raise _fail(where, "plans.yaml", f"task {plans.task!r}, the manifest says {manifest['task']!r}", _NOT_OURS)
    dataset = _parse_json(where, "dataset.json", members["dataset.json"])
    if not isinstance(dataset, dict) or not isinstance(dataset.get("labels"), dict) \
            or not isinstance(dataset.get("channel_names"), dict):
        raise _fail(where, "dataset.json", "expected labels and channel_names", _NOT_OURS)
    if "best.yaml" in members:
        best = _parse_yaml(where, "best.yaml", members["best.yaml"])
        names = best.get("configurations") if isinstance(best, dict) else None
        if not isinstance(names, list) or not names or not set(names) <= set(manifest["configurations"]):
            raise _fail(where, "best.yaml", "its configurations must be among the model's", _NOT_OURS)
        folds = best.get("folds")
        if folds is not None and not (isinstance(folds, list) and all(
                f in c["folds"] for f in folds for n, c in manifest["configurations"].items() if n in names)):
            raise _fail(where, "best.yaml", "its folds must be among the model's", _NOT_OURS)
    try:
        members[MODEL_CARD].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(where, MODEL_CARD, "not UTF-8 text", _NOT_OURS) from None
    if _looks_pickled(members[MODEL_CARD]):
        raise _fail(where, MODEL_CARD, "holds pickled data, which autoseg never loads", _NOT_OURS)


def _fold_meta(where: Path, member: str, raw: bytes, configuration: str, fold: int, task: str) -> dict[str, Any]:
    meta = _parse_json(where, member, raw)
    if not isinstance(meta, dict) or any(k not in meta for k in META_REQUIRED):
        raise _fail(where, member, f"expected the keys {', '.join(META_REQUIRED)}", _NOT_OURS)
    if meta["format"] != CHECKPOINT_FORMAT or meta["configuration_name"] != configuration or meta["fold"] != fold:
        raise _fail(where, member, f"metadata of another checkpoint ({meta['configuration_name']!r} fold "
                    f"{meta['fold']!r}, format {meta['format']!r})", _NOT_OURS)
    info = meta["plans"]
    if not (isinstance(meta["configuration"], dict) and isinstance(info, dict)
            and all(k in info for k in ("labels", "channel_names", "transpose", "num_classes"))):
        raise _fail(where, member, "expected a configuration and the plans' labels, channels, transpose and "
                    "number of classes", _NOT_OURS)
    if info.get("task", DEFAULT_TASK) != task:
        raise _fail(where, member, f"task {info.get('task')!r}, the manifest says {task!r}", _NOT_OURS)
    return meta


def _read_npz(where: Path, member: str, raw: bytes) -> dict[str, np.ndarray]:
    """A state dict from ``.npz`` bytes: only ``.npy`` entries, no pickles, no object arrays."""
    pickled = _fail(where, member, "holds pickled data, which autoseg never loads", _NOT_OURS)
    if _looks_pickled(raw):
        raise pickled
    if not raw.startswith(b"PK\x03\x04"):
        raise _fail(where, member, "not a .npz archive of arrays", _NOT_OURS)
    state: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as inner:
            for info in inner.infolist():
                name = info.filename
                if name.endswith((".pkl", ".pickle")) or "/" in name:
                    raise pickled  # PyTorch's zip format keeps its pickle as <archive>/data.pkl
                if not name.endswith(".npy") or not TENSOR_NAME.match(name[:-4]) or name[:-4] in state:
                    raise _fail(where, member, f"entry {name!r} is not a tensor (.npy)", _NOT_OURS)
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(raw):
                    raise _fail(where, member, f"entry {name!r} is compressed (autoseg stores arrays)", _NOT_OURS)
                data = inner.read(info)
                if not data.startswith(b"\x93NUMPY"):
                    raise pickled if _looks_pickled(data) else _fail(where, member, f"entry {name!r} is not a "
                                                                     ".npy array", _NOT_OURS)
                array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
                if array.dtype.kind not in "fiub" or array.dtype.fields is not None:
                    raise _fail(where, member, f"entry {name!r} holds {array.dtype} values, not numbers", _NOT_OURS)
                state[name[:-4]] = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
    except ModelFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise pickled from None
        raise _fail(where, member, f"damaged array ({str(exc).splitlines()[0]})", _NOT_OURS) from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _fail(where, member, f"damaged archive ({exc})", _NOT_OURS) from None
    if not state:
        raise _fail(where, member, "holds no weights", _NOT_OURS)
    return state


def _check_networks(model: ModelFile) -> None:
    """Each fold's state dict loads into its configuration's network (names and shapes)."""
    import torch

    from autoseg.inference.models import build_inference_network

    for weights in model.weights:
        member = f"weights/{weights.configuration}/fold_{weights.fold}.npz"
        try:
            config = plans_io.from_dict(_plans_dict(model, weights))
        except PlanError as exc:
            raise _fail(model.path, member.replace(".npz", ".json"), f"invalid configuration ({exc})",
                        _NOT_OURS) from None
        state = {k: torch.from_numpy(v) for k, v in weights.state.items()}
        configuration = config.configurations[weights.configuration]
        num_classes = int(weights.meta["plans"]["num_classes"])
        try:
            build_inference_network(configuration, num_classes, state, Path(f"{model.path}: {member}"))
            _check_graphs(model, weights, configuration.input_channels, num_classes, configuration.dims)
        except ConfigError as exc:
            raise ModelFileError(str(exc)) from None


def _check_graphs(model: ModelFile, weights: FoldWeights, channels: int, num_classes: int, dims: int) -> None:
    """A fold's ONNX graphs pass :func:`autoseg.inference.engines.check_onnx_graph` (where the onnx
    package is installed; without it no engine can read them, and they stay unused)."""
    from autoseg.inference.engines import check_onnx_graph, installed

    if not installed("onnx"):
        return
    for (configuration, fold, kind), graph in model.graphs.items():
        if (configuration, fold) == (weights.configuration, weights.fold):
            where = f"{model.path}: {onnx_member(configuration, fold, kind)}"
            check_onnx_graph(graph, where, input_channels=channels, num_classes=num_classes, dims=dims)


def _plans_dict(model: ModelFile, weights: FoldWeights) -> dict[str, Any]:
    import yaml

    from autoseg.plans import with_configuration

    data = yaml.safe_load(model.members["plans.yaml"].decode("utf-8"))
    return with_configuration(data, weights.configuration, weights.meta["configuration"])


__all__ = [
    "BASE_SCHEMA_VERSION",
    "EXPORT_CHECKPOINTS",
    "MANIFEST",
    "MODEL_CARD",
    "MODEL_ENDING",
    "MODEL_FORMAT",
    "MODEL_SCHEMA_VERSION",
    "ONNX_KINDS",
    "FoldWeights",
    "ModelFile",
    "ModelFileError",
    "json_bytes",
    "npz_bytes",
    "onnx_member",
    "plain_json",
    "read_model",
    "write_model_zip",
]
