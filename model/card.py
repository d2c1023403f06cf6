"""Model cards: the JSON that describes everything a server needs to run a bundle's weights (architecture,
classes and colors, input policy, precision, provenance, metrics), validated field by field.

Plain Python, importable without torch: the service's HTTP front ends read cards, the engine process loads
the weights (``model.bundle``). Reading fails with ``BundleError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.config import UNetConfig

FORMAT = "unetseg.bundle/1"
CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

Sizing = Literal["resize", "tile"]
InstanceMethod = Literal["watershed", "components"]
DType = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and the field."""

    def __init__(self, path: Path | str, field_name: str | None, message: str) -> None:
        where = f"{path}: {field_name}: " if field_name else f"{path}: "
        super().__init__(where + message)
        self.path = str(path)
        self.field = field_name


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class InputPolicy:
    """How an image becomes the model's input.

    ``sizing="resize"``: the whole image is resized to ``size`` x ``size``; the logits are resized back.
    ``sizing="tile"``: the image is segmented at native scale in ``size`` x ``size`` tiles that overlap by
    the fraction ``overlap``, their logits blended with a Gaussian window.
    Pixels are scaled to [0, 1], then normalised per channel: ``(x - mean) / std``.
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sizing: Sizing
    size: int
    overlap: float = 0.25


@dataclass(frozen=True)
class InstanceSpec:
    """How a model's class map becomes instances (one id per object); see ``model.instances``.

    ``method="watershed"``: the connected components of class ``interior`` are the markers of a watershed
    that floods the foreground (``interior`` and ``boundary``), so touching objects separated by a band of
    class ``boundary`` come out as separate instances. ``method="components"``: every connected component of
    class ``interior`` is an instance (``boundary`` is None). Instances smaller than ``min_area`` pixels are
    dropped (their pixels become background).
    """

    method: InstanceMethod
    interior: int
    boundary: int | None = None
    min_area: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SlideSpec:
    """At which level of a whole-slide image (a pyramidal TIFF) the model segments: the level nearest
    ``mpp`` microns per pixel when the slide records its resolution, else ``level`` (0: full resolution).
    A card without ``slide`` is segmented at full resolution."""

    mpp: float | None = None
    level: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str = ""
    license: str = ""
    citation: str = ""


@dataclass(frozen=True)
class Card:
    name: str
    version: str
    architecture: UNetConfig
    classes: tuple[ClassInfo, ...]
    input: InputPolicy
    dataset: Dataset
    description: str = ""
    # Inference dtypes whose masks were checked against float32; the first one the device supports is used.
    precisions: tuple[DType, ...] = ("float32",)
    metrics: Mapping[str, float] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    instances: InstanceSpec | None = None  # None: a semantic model (class map only)
    slide: SlideSpec | None = None  # None: whole slides at full resolution

    def to_dict(self) -> dict[str, Any]:
        extra = {"instances": self.instances.to_dict()} if self.instances is not None else {}
        if self.slide is not None:
            extra["slide"] = self.slide.to_dict()
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "architecture": self.architecture.to_dict(),
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "input": {**asdict(self.input), "mean": list(self.input.mean), "std": list(self.input.std)},
            "precisions": list(self.precisions),
            "dataset": asdict(self.dataset),
            "metrics": dict(self.metrics),
            "training": dict(self.training),
            **extra,
        }


# --- validation helpers: each raises BundleError naming the field -------------------------------------


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, name: str, message: str) -> BundleError:
        return BundleError(self.path, name, message)

    def get(self, obj: Mapping[str, Any], key: str, prefix: str, default: Any = ...) -> Any:
        name = f"{prefix}{key}"
        if key not in obj:
            if default is ...:
                raise self.fail(name, "missing")
            return default
        return obj[key]

    def string(self, obj: Mapping[str, Any], key: str, prefix: str = "", default: Any = ...) -> str:
        value = self.get(obj, key, prefix, default)
        if not isinstance(value, str):
            raise self.fail(prefix + key, f"must be a string, got {type(value).__name__}")
        return value

    def integer(self, obj: Mapping[str, Any], key: str, prefix: str = "", minimum: int = 0) -> int:
        value = self.get(obj, key, prefix)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(prefix + key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, value: Any, name: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(name, f"must be a finite number, got {value!r}")
        return float(value)

    def mapping(self, obj: Mapping[str, Any], key: str, prefix: str = "", default: Any = ...) -> Mapping[str, Any]:
        value = self.get(obj, key, prefix, default)
        if not isinstance(value, Mapping):
            raise self.fail(prefix + key, f"must be an object, got {type(value).__name__}")
        return value


def _parse_card(data: Any, path: Path) -> Card:
    r = _Reader(path)
    if not isinstance(data, Mapping):
        raise BundleError(path, None, "the card must be a JSON object")
    fmt = r.string(data, "format")
    if fmt != FORMAT:
        raise r.fail("format", f"expected {FORMAT!r}, got {fmt!r}")
    name = r.string(data, "name")
    if not NAME_RE.match(name):
        raise r.fail("name", f"must match {NAME_RE.pattern}, got {name!r}")
    version = r.string(data, "version")
    if not version:
        raise r.fail("version", "must not be empty")

    arch_data = r.mapping(data, "architecture")
    try:
        arch = UNetConfig.from_dict(dict(arch_data))
    except (TypeError, ValueError) as exc:
        raise r.fail("architecture", str(exc)) from None

    raw_classes = r.get(data, "classes", "")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise r.fail("classes", "must be a non-empty list")
    classes: list[ClassInfo] = []
    for i, item in enumerate(raw_classes):
        prefix = f"classes[{i}]."
        if not isinstance(item, Mapping):
            raise r.fail(f"classes[{i}]", "must be an object")
        cid = r.integer(item, "id", prefix)
        if cid != i:
            raise r.fail(prefix + "id", f"classes must be listed in id order 0..n-1; expected {i}, got {cid}")
        cname = r.string(item, "name", prefix)
        if not cname:
            raise r.fail(prefix + "name", "must not be empty")
        color = r.get(item, "color", prefix)
        if (
            not isinstance(color, list)
            or len(color) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)
        ):
            raise r.fail(prefix + "color", f"must be [r, g, b] with integers 0..255, got {color!r}")
        classes.append(ClassInfo(cid, cname, (color[0], color[1], color[2])))
    if len(classes) != arch.num_classes:
        raise r.fail("classes", f"lists {len(classes)} classes but architecture.num_classes is {arch.num_classes}")

    inp = r.mapping(data, "input")
    channels = r.integer(inp, "channels", "input.", minimum=1)
    if channels not in (1, 3):
        raise r.fail("input.channels", f"must be 1 (grayscale) or 3 (RGB), got {channels}")
    if channels != arch.in_channels:
        raise r.fail("input.channels", f"is {channels} but architecture.in_channels is {arch.in_channels}")
    stats: dict[str, tuple[float, ...]] = {}
    for key in ("mean", "std"):
        values = r.get(inp, key, "input.")
        if not isinstance(values, list) or len(values) != channels:
            raise r.fail(f"input.{key}", f"must be a list of {channels} numbers")
        stats[key] = tuple(r.number(v, f"input.{key}[{j}]") for j, v in enumerate(values))
    if any(s <= 0 for s in stats["std"]):
        raise r.fail("input.std", "must be positive")
    sizing = r.string(inp, "sizing", "input.")
    if sizing not in ("resize", "tile"):
        raise r.fail("input.sizing", f"must be 'resize' or 'tile', got {sizing!r}")
    size = r.integer(inp, "size", "input.", minimum=arch.multiple)
    overlap = r.number(r.get(inp, "overlap", "input.", 0.25), "input.overlap")
    if not 0 <= overlap < 0.9:
        raise r.fail("input.overlap", f"must be in [0, 0.9), got {overlap}")
    policy = InputPolicy(channels, stats["mean"], stats["std"], sizing, size, overlap)  # type: ignore[arg-type]

    raw_prec = r.get(data, "precisions", "", ["float32"])
    if not isinstance(raw_prec, list) or not raw_prec or not all(p in PRECISIONS for p in raw_prec):
        raise r.fail("precisions", f"must be a non-empty list drawn from {sorted(PRECISIONS)}, got {raw_prec!r}")

    ds = r.mapping(data, "dataset")
    dataset = Dataset(
        name=r.string(ds, "name", "dataset."),
        url=r.string(ds, "url", "dataset.", ""),
        license=r.string(ds, "license", "dataset.", ""),
        citation=r.string(ds, "citation", "dataset.", ""),
    )
    metrics_raw = r.mapping(data, "metrics", "", {})
    metrics = {str(k): r.number(v, f"metrics.{k}") for k, v in metrics_raw.items()}
    training = dict(r.mapping(data, "training", "", {}))
    instances = _parse_instances(r, data, len(classes)) if "instances" in data else None
    slide = _parse_slide(r, data) if "slide" in data else None
    return Card(
        name=name,
        version=version,
        architecture=arch,
        classes=tuple(classes),
        input=policy,
        dataset=dataset,
        description=r.string(data, "description", "", ""),
        precisions=tuple(raw_prec),
        metrics=metrics,
        training=training,
        instances=instances,
        slide=slide,
    )


def _parse_instances(r: _Reader, data: Mapping[str, Any], num_classes: int) -> InstanceSpec:
    inst = r.mapping(data, "instances")
    method = r.string(inst, "method", "instances.")
    if method not in ("watershed", "components"):
        raise r.fail("instances.method", f"must be 'watershed' or 'components', got {method!r}")
    interior = r.integer(inst, "interior", "instances.", minimum=1)
    if interior >= num_classes:
        raise r.fail("instances.interior", f"must be a foreground class id below {num_classes}, got {interior}")
    boundary: int | None = None
    if method == "watershed":
        boundary = r.integer(inst, "boundary", "instances.", minimum=1)
        if boundary >= num_classes or boundary == interior:
            raise r.fail(
                "instances.boundary",
                f"must be a foreground class id below {num_classes} other than interior, got {boundary}",
            )
    elif "boundary" in inst:
        raise r.fail("instances.boundary", "only the watershed method has a boundary class")
    min_area = r.integer(inst, "min_area", "instances.") if "min_area" in inst else 0
    return InstanceSpec(method, interior, boundary, min_area)  # type: ignore[arg-type]


def _parse_slide(r: _Reader, data: Mapping[str, Any]) -> SlideSpec:
    spec = r.mapping(data, "slide")
    unknown = set(spec) - {"mpp", "level"}
    if unknown:
        raise r.fail("slide", f"unknown fields {sorted(unknown)} (it takes mpp and level)")
    mpp = r.number(spec["mpp"], "slide.mpp") if "mpp" in spec else None
    if mpp is not None and mpp <= 0:
        raise r.fail("slide.mpp", f"must be > 0, got {mpp}")
    level = r.integer(spec, "level", "slide.") if "level" in spec else None
    return SlideSpec(mpp, level)


def card_from_dict(data: Any, source: str = "card") -> Card:
    """A card from its JSON object (as ``Card.to_dict`` writes it), validated; ``source`` names it in errors."""
    return _parse_card(data, Path(source))


def read_card(folder: Path) -> Card:
    path = folder / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(path, None, "missing: every bundle folder needs a card.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(path, None, f"cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(path, None, f"is not valid JSON: {exc}") from None
    return _parse_card(data, path)


def discover(weights_dir: Path | str) -> Iterator[Path]:
    """Bundle folders under ``weights_dir``: every sub-folder holding a card.json, in name order."""
    root = Path(weights_dir)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / CARD_FILE).exists():
            yield child
