"""Configuration of the salient-detection models: architecture presets and model-directory config.

Two kinds of configuration are kept apart (timm's ``PretrainedCfg`` vs. its model args):

* architecture — :class:`SENetConfig` / :class:`U2NetConfig`, frozen dataclasses with the real preset
  (what ModelScope's checkpoint was trained with) and a ``TINY`` preset of the same code for fast tests;
* provenance and preprocessing — :class:`SalientWeights`, read from a ModelScope model directory:
  which network (``config.py`` present → SENet, absent → U2NET, as ModelScope decides) and the
  normalisation mean/std and input size.

ModelScope *executes* ``config.py``; we never do: it is parsed with :mod:`ast` and only literal
assignments are accepted (:func:`parse_config_py`).
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vbatch.models.base import config_from_json
from vbatch.models.entry import ModelEntry

logger = logging.getLogger(__name__)

MODELSCOPE_ID = "damo/cv_res2net_salient-detection"
WEIGHTS_FILE = "pytorch_model.pt"
CONFIG_FILE = "config.py"
#: vbatch's side file for non-released architectures (TINY presets); ModelScope's directory has none
ARCH_FILE = "vbatch_salient.json"

# ModelScope's defaults (salient_model.py), used for U2NET, whose model directory has no config.py.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = (320, 320)

Variant = Literal["senet", "u2net"]


class SalientConfigError(ValueError):
    """A salient model directory's ``config.py`` cannot be read as data or has a wrong value."""


@dataclass(frozen=True)
class SENetConfig:
    """SENet: Res2Net-v1b-50 (26w×4s) backbone + edge/area-guided decoder.

    Only the backbone depth is configurable; the decoder's widths are fixed by the checkpoint.
    """

    #: Bottle2neck blocks per stage (Res2Net-50: 3, 4, 6, 3)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    #: Res2Net ``baseWidth`` (26w) and ``scale`` (4s)
    base_width: int = 26
    scale: int = 4
    #: width of the deep (3×3 conv ×3) stem
    stem_width: int = 32


@dataclass(frozen=True)
class U2NetConfig:
    """U²-Net (full, 44M parameters) with ``in_chans`` inputs and ``out_chans`` maps."""

    in_chans: int = 3
    out_chans: int = 1
    #: every internal width is divided by this (1 = the real network; the TINY preset uses 8)
    width_div: int = 1


SENET = SENetConfig()
SENET_TINY = SENetConfig(layers=(1, 1, 1, 1))
U2NET = U2NetConfig()
U2NET_TINY = U2NetConfig(width_div=8)
#: the names every vbatch model package has: the released architecture and its test-size twin
FULL, TINY = SENET, SENET_TINY


@dataclass(frozen=True)
class SalientWeights:
    """What a model directory says: which network, and how its inputs are normalised."""

    variant: Variant
    norm_mean: tuple[float, float, float] = DEFAULT_MEAN
    norm_std: tuple[float, float, float] = DEFAULT_STD
    #: (height, width) of the network input: torchvision's ``Resize(norm_size)`` takes (h, w)
    norm_size: tuple[int, int] = DEFAULT_SIZE


def _literal_assignments(path: Path, text: str) -> dict[str, Any]:
    """Top-level ``name = <literal>`` statements of a Python file, evaluated as data only."""
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise SalientConfigError(
            f"{path}: not valid Python syntax (line {e.lineno}): {e.msg}"
        ) from e
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring or a bare literal: harmless
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            names = [t.id for t in node.targets]  # type: ignore[attr-defined]
            value_node = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            names = [node.target.id]
            value_node = node.value
        else:
            # imports, calls, function definitions, ...: ModelScope would run them, we refuse
            raise SalientConfigError(
                f"{path}, line {node.lineno}: only `name = <literal>` assignments are accepted "
                f"(the file is read as data, never executed); found `{ast.unparse(node)[:80]}`"
            )
        try:
            value = ast.literal_eval(value_node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise SalientConfigError(
                f"{path}, line {node.lineno}: `{', '.join(names)}` is not a literal value "
                f"(the file is read as data, never executed): `{ast.unparse(value_node)[:80]}`"
            ) from e
        for name in names:
            values[name] = value
    return values


def _triple(path: Path, name: str, value: Any) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise SalientConfigError(
            f"{path}: `{name}` must be a list/tuple of 3 numbers, got {value!r}"
        )
    return (float(value[0]), float(value[1]), float(value[2]))


def _size(path: Path, value: Any) -> tuple[int, int]:
    # torchvision's Resize would read a single int as "shorter side", giving images of varying
    # shapes that cannot be batched; the published model uses (h, w), so only that is accepted.
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise SalientConfigError(
            f"{path}: `norm_size` must be a list/tuple of 2 positive ints (height, width), got {value!r}"
        )
    return (value[0], value[1])


def parse_config_py(path: Path) -> SalientWeights:
    """Read a SENet model directory's ``config.py`` as data.

    Args:
        path: the ``config.py`` file (ModelScope executes it; we only parse literal assignments).

    Returns:
        ``SalientWeights(variant="senet", ...)`` with its ``norm_mean``, ``norm_std``, ``norm_size``.

    Raises:
        SalientConfigError: unparsable file, a non-literal statement, a missing or mis-formed value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SalientConfigError(f"{path}: cannot read: {e}") from e
    values = _literal_assignments(path, text)
    missing = [k for k in ("norm_mean", "norm_std", "norm_size") if k not in values]
    if missing:
        raise SalientConfigError(f"{path}: missing {', '.join(missing)}")
    std = _triple(path, "norm_std", values["norm_std"])
    if any(s <= 0 for s in std):
        raise SalientConfigError(f"{path}: `norm_std` must be positive, got {values['norm_std']!r}")
    return SalientWeights(
        variant="senet",
        norm_mean=_triple(path, "norm_mean", values["norm_mean"]),
        norm_std=std,
        norm_size=_size(path, values["norm_size"]),
    )


def read_model_dir(model_dir: Path) -> SalientWeights:
    """What a ModelScope salient model directory holds: ``config.py`` present → SENet, else U2NET."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SalientConfigError(f"model directory not found: {model_dir}")
    config_path = model_dir / CONFIG_FILE
    if config_path.exists():
        weights = parse_config_py(config_path)
    else:
        weights = SalientWeights(variant="u2net")
    logger.debug("salient model dir %s: %s", model_dir, weights)
    return weights


def read_config(model_dir: Path) -> SENetConfig | U2NetConfig:
    """The architecture of a model directory: the real preset unless vbatch's side file says otherwise.

    Args:
        model_dir: the model directory (its variant as :func:`read_model_dir` decides it).

    Returns:
        :data:`SENET` or :data:`U2NET`, or the configuration in ``vbatch_salient.json``.
    """
    variant = read_model_dir(model_dir).variant
    side = Path(model_dir) / ARCH_FILE
    cls: type[SENetConfig] | type[U2NetConfig] = SENetConfig if variant == "senet" else U2NetConfig
    if not side.is_file():
        return cls()
    try:
        text = side.read_text(encoding="utf-8")
        if cls is SENetConfig:
            return config_from_json(SENetConfig, text, str(side))
        return config_from_json(U2NetConfig, text, str(side))
    except (OSError, ValueError, TypeError) as e:
        raise SalientConfigError(f"{side}: {e}") from e


#: what the pipeline needs to know about this model (vbatch.models.registry collects it)
ENTRY = ModelEntry(
    name="salient",
    module="vbatch.models.salient",
    output="mask",
    modelscope_id=MODELSCOPE_ID,
    summary="salient-object detection (Res2Net/SENet with edge guidance, or U2NET)",
    required_files=(WEIGHTS_FILE,),
    checkpoint=WEIGHTS_FILE,
    options=("precision",),
    # CPU: small batches keep the pipeline flowing; the forward cost per image hardly changes.
    # GPU: SENet at 320² holds ~0.3 GB of fp32 activations per image: 32 fit a 16 GB GPU with
    # room to spare
    batch_cpu=8,
    batch_gpu=32,
    actor_memory_gb=2.0,
    metric_kind="saliency",
    visual="heatmap",
)
