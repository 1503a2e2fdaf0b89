"""One contract over every model of the registry (timm's ``tests/test_models.py`` runs one over all).

For each :data:`vbatch.models.REGISTRY` entry: its package has the files ``models/README.md`` names;
``load`` takes its options as explicit keywords; a random model directory with the package's ``TINY``
configuration (matting: its small ONNX demo graph) loads through ``load_model(name, dir, "cpu")``
without importing ``modeldir``; a batch of odd-sized images (rvos: a short clip and a query) gives
outputs of the shapes and dtypes the entry's ``output`` kind promises; and a tampered checkpoint — a
missing key, an extra key, a wrong shape — fails with a :class:`CheckpointError` naming that key.

Matting's ``model.onnx`` is a graph, not a state dict: what its strict loading can check is tested
instead — a missing ``model.onnx``, a corrupt one, and a graph whose interface is not the matting
graph's (an extra output, a float output) each fail with a ``ModelDirError`` (a ``CheckpointError``)
naming the file or the offending input/output names.

A new model passes this file before anything else: add its entry to ``SPECS``.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from vbatch.models import REGISTRY, CheckpointError, Predictor, load_model, load_transforms
from vbatch.models.base import Transforms
from vbatch.models.checkpoint import read_state_dict

#: every package has these modules (models/README.md)
ROLES = ("config", "model", "convert", "transforms", "predictor", "modeldir")
#: odd sizes, one pixel included: resizing, padding and cropping have to cope with all of them
SIZES = [(37, 53), (64, 31), (1, 1)]


@dataclass(frozen=True)
class Spec:
    """How the contract drives one model: the writer's extra arguments and whether it has a state dict."""

    writer_kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: bool = True
    precision: bool = True


SPECS: dict[str, Spec] = {
    # SENet's TINY at 64², the smallest input its stride-32 backbone takes
    "salient": Spec({"norm_size": (64, 64)}),
    "shop-seg": Spec(),
    "reid": Spec(),
    # an ONNX graph run by ONNX Runtime: no state dict, no autocast (its dtypes are the graph's)
    "matting": Spec(state_dict=False, precision=False),
    "rvos": Spec(),
}


def _package(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name].module)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _write(name: str, path: Path) -> Path:
    modeldir = importlib.import_module(f"{REGISTRY[name].module}.modeldir")
    spec = SPECS[name]
    if spec.state_dict:
        config = importlib.import_module(f"{REGISTRY[name].module}.config")
        return modeldir.write_random_model_dir(path, config.TINY, seed=0, **spec.writer_kwargs)
    return modeldir.write_random_model_dir(path, **spec.writer_kwargs)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    return {name: _write(name, root / name) for name in sorted(REGISTRY)}


def test_every_registered_model_has_a_spec() -> None:
    assert set(SPECS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_package_layout(name: str) -> None:
    """The same file for the same role; ``load`` options are explicit keywords, no ``**options``."""
    pkg = _package(name)
    folder = Path(pkg.__file__).parent
    for role in ROLES:
        assert (folder / f"{role}.py").is_file(), f"{name}: no {role}.py"
    config = importlib.import_module(f"{pkg.__name__}.config")
    assert config.MODELSCOPE_ID == REGISTRY[name].modelscope_id
    assert isinstance(config.WEIGHTS_FILE, str)
    if SPECS[name].state_dict:  # an architecture to configure: the released preset and its twin
        assert type(config.TINY) is type(config.FULL) and config.TINY != config.FULL
    for fn in (pkg.load, pkg.load_transforms):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "model_dir"
        assert not any(p.kind is p.VAR_KEYWORD or p.kind is p.VAR_POSITIONAL for p in params)
        rest = params[2:] if fn is pkg.load else params[1:]
        assert all(p.kind is p.KEYWORD_ONLY for p in rest), (name, fn.__name__, rest)
    assert list(inspect.signature(pkg.load).parameters)[1] == "device"


def test_loading_never_imports_the_writers(model_dirs: dict[str, Path]) -> None:
    """``load`` (and importing a package) never imports ``modeldir`` (nor, for matting, ``onnx``)."""
    code = "\n".join(
        [
            "import sys",
            "from vbatch.models import REGISTRY, load_model",
            *(f"load_model({n!r}, {str(d)!r}, device='cpu')" for n, d in model_dirs.items()),
            "bad = [m for m in sys.modules if m.endswith('.modeldir') or m.split('.')[0] == 'onnx']",
            "assert not bad, bad",
        ]
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_random_model_dir_loads_and_runs(name: str, model_dirs: dict[str, Path]) -> None:
    predictor = load_model(name, model_dirs[name], device="cpu")
    assert isinstance(predictor, Predictor) and predictor.name == name
    assert predictor.device == torch.device("cpu")
    assert len(predictor.model_version) == 12 and int(predictor.model_version, 16) >= 0
    assert isinstance(load_transforms(name, model_dirs[name]), Transforms)
    if SPECS[name].state_dict:  # the directory says which architecture it holds
        config = importlib.import_module(f"{REGISTRY[name].module}.config")
        assert config.read_config(model_dirs[name]) == config.TINY
    images = _images()
    kind = REGISTRY[name].output
    if kind == "video-masks":
        clip = np.stack([images[0], images[0][::-1]])  # (T=2, 37, 53, 3)
        masks = predictor.predict_video(clip, ["a person on the left"])  # type: ignore[attr-defined]
        assert masks.shape == (1, *clip.shape[:3]) and masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 255}
        return
    outputs = predictor.predict(images)
    assert len(outputs) == len(images)
    for out, image in zip(outputs, images, strict=True):
        h, w = image.shape[:2]
        if kind == "mask":
            assert out.shape == (h, w) and out.dtype == np.uint8
        elif kind == "rgba":
            assert out.shape == (h, w, 4) and out.dtype == np.uint8
        elif kind == "embedding":
            config = importlib.import_module(f"{REGISTRY[name].module}.config")
            assert out.shape == (config.TINY.embed_dim,) and out.dtype == np.float32
            assert np.isfinite(out).all()
        else:
            raise AssertionError(f"no contract for output kind {kind!r}")
    assert predictor.predict([]) == []


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_option_is_a_type_error_naming_it(name: str, model_dirs: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        load_model(name, model_dirs[name], device="cpu", no_such_option=1)


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if SPECS[n].precision])
def test_precision_is_checked_against_the_device(name: str, model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load_model(name, model_dirs[name], device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_model(name, model_dirs[name], device="cpu", precision="int8")


def _probe_key(sd: dict[str, torch.Tensor], used: set[str]) -> str:
    """A weight matrix from the middle of the checkpoint, one the network uses (not a training-only
    key that the converter drops by name)."""
    keys = sorted(k for k in used if sd[k].ndim >= 2 and sd[k].is_floating_point())
    return keys[len(keys) // 2]


def _converted_names(name: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Checkpoint key → the name the package's converter gives it, recorded during a good load.

    The strict loader reports keys as the network names them; a converter that renames a key passes
    its tensor through unchanged, so the two are matched by identity.
    """
    from vbatch.models import checkpoint

    seen: dict[str, dict[str, torch.Tensor]] = {}
    read, check = checkpoint.read_state_dict, checkpoint.check_state_dict

    def recording_read(path: str | Path) -> dict[str, torch.Tensor]:
        seen["source"] = read(path)
        return seen["source"]

    def recording_check(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
        seen["converted"] = dict(sd)
        check(module, sd, source)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "read_state_dict", recording_read)
        m.setattr(checkpoint, "check_state_dict", recording_check)
        load_model(name, model_dir, device="cpu")
    ours = {id(v): k for k, v in seen["converted"].items()}
    return {k: ours[id(v)] for k, v in seen["source"].items() if id(v) in ours}


TAMPERINGS: dict[str, Callable[[dict[str, torch.Tensor], str], str]] = {}


def _tampering(fn: Callable[[dict[str, torch.Tensor], str], str]) -> Callable:
    TAMPERINGS[fn.__name__] = fn
    return fn


@_tampering
def missing(sd: dict[str, torch.Tensor], key: str) -> str:
    del sd[key]
    return key


@_tampering
def extra(sd: dict[str, torch.Tensor], key: str) -> str:
    # a sibling of a real key, so that prefix-renaming converters rename it too
    sd[key + "_extra"] = sd[key].clone()
    return key + "_extra"


@_tampering
def wrong_shape(sd: dict[str, torch.Tensor], key: str) -> str:
    v = sd[key]
    sd[key] = torch.zeros((v.shape[0] + 1, *v.shape[1:]), dtype=v.dtype)
    return key


@pytest.mark.parametrize("tamper", sorted(TAMPERINGS))
@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if SPECS[n].state_dict])
def test_tampered_checkpoint_fails_naming_the_key(
    name: str,
    tamper: str,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = model_dirs[name]
    weights = importlib.import_module(f"{REGISTRY[name].module}.config").WEIGHTS_FILE
    bad = tmp_path / name
    bad.mkdir()
    for item in src.iterdir():  # everything but the checkpoint is shared
        if item.name != weights:
            (bad / item.name).symlink_to(item)
    sd = read_state_dict(src / weights)
    converted = _converted_names(name, src, monkeypatch)
    probe = _probe_key(sd, set(converted))
    renamed = converted[probe]
    key = TAMPERINGS[tamper](sd, probe)
    torch.save(sd, bad / weights)
    with pytest.raises(CheckpointError) as info:
        load_model(name, bad, device="cpu")
    message = str(info.value)
    # named as in the checkpoint (a converter's own check) or as the network names it (the loader's)
    ours = renamed + key[len(probe) :]
    assert key in message or ours in message, (key, ours, message)


# ---------------------------------------------------------------- matting: what an ONNX graph allows


def _matting_graph(outputs: list[tuple[str, int]]) -> bytes:
    """A graph with matting's input and the given (name, ONNX element type) outputs, all Identity-like."""
    from onnx import TensorProto, helper

    nodes, infos = [], []
    for out_name, elem in outputs:
        nodes.append(helper.make_node("Cast", ["input_image"], [out_name], to=elem))
        infos.append(helper.make_tensor_value_info(out_name, elem, ["height", "width", 3]))
    graph = helper.make_graph(
        nodes,
        "tampered",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["height", "width", 3])],
        infos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_matting_strict_loading(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from onnx import TensorProto

    from vbatch.models.matting.config import WEIGHTS_FILE

    src = model_dirs["matting"]
    # missing model.onnx
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model("matting", empty, device="cpu")
    # corrupt model.onnx
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / WEIGHTS_FILE).write_bytes((src / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot load .*model\.onnx"):
        load_model("matting", corrupt, device="cpu")
    # an extra output: the message names every input and output
    two = tmp_path / "two_outputs"
    two.mkdir()
    (two / WEIGHTS_FILE).write_bytes(
        _matting_graph([("output_png", TensorProto.UINT8), ("alpha_extra", TensorProto.UINT8)])
    )
    with pytest.raises(CheckpointError, match="alpha_extra"):
        load_model("matting", two, device="cpu")
    # the right names but a float output: not an RGBA image
    wrong = tmp_path / "float_output"
    wrong.mkdir()
    (wrong / WEIGHTS_FILE).write_bytes(_matting_graph([("output_png", TensorProto.FLOAT)]))
    with pytest.raises(CheckpointError, match=r"uint8 RGBA output, found tensor\(float\)"):
        load_model("matting", wrong, device="cpu")
