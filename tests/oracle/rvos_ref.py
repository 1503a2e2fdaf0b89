"""Oracle for rvos: ModelScope 1.40.2's MTTR with random weights, run on a synthetic video.

Run with the oracle's Python (see runner.py)::

    rvos_ref.py OUT_DIR full       # FULL architecture, one 24-frame window at 360x640: network outputs
    rvos_ref.py OUT_DIR pipeline   # real Swin-T, small transformer/RoBERTa: the whole pipeline, 2 queries

Writes ``OUT_DIR/model`` (ModelScope's layout: configuration.json, pytorch_model.pt wrapped in
``model_state_dict`` with ``position_ids``, transformer_cfg_dir/ with RoBERTa's config, a toy
byte-level BPE tokenizer and RoBERTa weights the checkpoint overrides) and ``OUT_DIR/ref.npz``.

Deviations from running the pipeline on a file, per ORACLE.md: ``moviepy`` is not installed and
torchvision 0.29 has no ``read_video``, so ``moviepy.editor`` is a stub whose clip writing does
nothing and ``torchvision.io.read_video`` returns the synthetic frames; the rest of the pipeline
runs unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

# the pipeline module imports moviepy.editor at import time; only its (unused) rendering needs it
_stub = types.ModuleType("moviepy.editor")


class _Clip:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def subclip(self, *args, **kwargs):
        return self

    def write_videofile(self, *args, **kwargs):
        pass


_stub.VideoFileClip = _stub.AudioFileClip = _stub.ImageSequenceClip = _Clip
sys.modules.setdefault("moviepy", types.ModuleType("moviepy"))
sys.modules["moviepy.editor"] = _stub

import torchvision  # noqa: E402

ROBERTA_BASE = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
SMALL_ROBERTA = {
    **ROBERTA_BASE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
FULL_MODEL = dict(
    d_model=256,
    nheads=8,
    dim_feedforward=2048,
    num_encoder_layers=3,
    num_decoder_layers=3,
    num_queries=50,
)
SMALL_MODEL = dict(
    d_model=64,
    nheads=4,
    dim_feedforward=128,
    num_encoder_layers=1,
    num_decoder_layers=2,
    num_queries=5,
)

CORPUS = [
    "a person riding a bike on the road",
    "the dog on the left running across the grass",
    "a red car driving down the street",
    "the man in a white shirt holding a skateboard",
    "a small brown cat sitting next to the window",
    "a woman with long hair dancing on a stage",
]


def write_configuration(model_dir: Path, sizes: dict) -> None:
    model = {
        "type": "swinT-referring-video-object-segmentation",
        "mask_kernels_dim": 8,
        "aux_loss": True,
        "backbone_name": "swin-t",
        "backbone_pretrained": False,
        "backbone_pretrained_path": "",
        "train_backbone": True,
        "running_mode": "test",
        "text_encoder_type": "roberta-base",
        "freeze_text_encoder": True,
        "dropout": 0.1,
        **sizes,
    }
    cfg = {
        "framework": "pytorch",
        "task": "referring-video-object-segmentation",
        "model": model,
        "pipeline": {
            "type": "referring-video-object-segmentation",
            "dataset_name": "ref_youtube_vos",
            "save_masked_video": False,
        },
        "matcher": {"set_cost_is_referred": 2, "set_cost_dice": 5},
        "loss": {
            "aux_loss": True,
            "is_referred_loss_coef": 2,
            "dice_loss_coef": 5,
            "sigmoid_focal_loss_coef": 2,
            "eos_coef": 0.1,
        },
    }
    (model_dir / "configuration.json").write_text(json.dumps(cfg, indent=2))


def write_text_dir(text_dir: Path, roberta: dict) -> None:
    """RoBERTa config.json, a toy byte-level BPE in RoBERTa's layout, and random RoBERTa weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel

    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "config.json").write_text(
        json.dumps(
            {"model_type": "roberta", "architectures": ["RobertaForMaskedLM"], **roberta}, indent=2
        )
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    tok.save(str(text_dir / "tokenizer.json"))
    tok.model.save(str(text_dir))
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }
    (text_dir / "special_tokens_map.json").write_text(json.dumps(specials))
    (text_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "RobertaTokenizer",
                "add_prefix_space": False,
                "trim_offsets": True,
                "model_max_length": 512,
                **specials,
            }
        )
    )
    # RobertaModel.from_pretrained(transformer_cfg_dir) needs weights there; the checkpoint overrides them
    RobertaModel(
        RobertaConfig.from_pretrained(str(text_dir)), add_pooling_layer=False
    ).save_pretrained(str(text_dir))


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random, with magnitudes that keep activations O(1) and softmax/sigmoid off 0/1.

    The only buffers are index tables (relative_position_index, position_ids, token_type_ids): kept.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm / GroupNorm scales
                p.copy_(1 + 0.1 * r)
            elif p.dim() == 1:  # biases
                p.copy_(0.05 * r)
            elif "relative_position_bias_table" in name:
                p.copy_(0.2 * r)
            elif "embeddings" in name or "obj_queries" in name:
                p.copy_(0.5 * r)
            else:  # linear / conv weights: unit gain on fan-in
                p.copy_(r / p[0].numel() ** 0.5)


def build(model_dir: Path, sizes: dict, roberta: dict, seed: int):
    from modelscope.models.cv.referring_video_object_segmentation.model import (
        ReferringVideoObjectSegmentation,
    )
    from modelscope.models.cv.referring_video_object_segmentation.utils import MTTR

    model_dir.mkdir(parents=True, exist_ok=True)
    write_configuration(model_dir, sizes)
    torch.manual_seed(seed)
    write_text_dir(model_dir / "transformer_cfg_dir", roberta)
    cfg = json.loads((model_dir / "configuration.json").read_text())["model"]
    net = MTTR(transformer_cfg_dir=str(model_dir / "transformer_cfg_dir"), **cfg)
    randomise(net, torch.Generator().manual_seed(seed))
    sd = net.state_dict()
    # as in checkpoints saved by transformers < 4.31; the reference's loader deletes it unconditionally
    sd["transformer.text_encoder.embeddings.position_ids"] = torch.arange(
        roberta["max_position_embeddings"]
    )[None]
    torch.save({"model_state_dict": sd}, model_dir / "pytorch_model.pt")
    del net, sd
    return ReferringVideoObjectSegmentation(
        str(model_dir), device="cpu"
    )  # loads the checkpoint strictly


def make_pipeline(model, frames: np.ndarray):
    from modelscope.pipelines.cv.referring_video_object_segmentation_pipeline import (
        ReferringVideoObjectSegmentationPipeline,
    )

    video = torch.from_numpy(frames)  # (T, H, W, 3) uint8, what read_video returns
    torchvision.io.read_video = lambda filename, **kw: (
        video.clone(),
        torch.zeros(1, 0),
        {"video_fps": 25.0},
    )
    return ReferringVideoObjectSegmentationPipeline(model=model, device="cpu")


def synthetic_video(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    """Smooth random colour fields with a moving bright square, plus noise (uint8 RGB)."""
    base = rng.random((t, max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32)
    frames = torch.nn.functional.interpolate(
        torch.from_numpy(base).permute(0, 3, 1, 2), size=(h, w), mode="bilinear"
    )
    frames = frames.permute(0, 2, 3, 1).numpy() * 200
    for i in range(t):
        y, x = (i * 3) % max(h - h // 3, 1), (i * 7) % max(w - w // 3, 1)
        frames[i, y : y + h // 3, x : x + w // 3] = 240
    frames += rng.normal(0, 8, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def run_full(out: Path) -> None:
    from modelscope.models.cv.referring_video_object_segmentation.utils import (
        nested_tensor_from_videos_list,
    )

    rng = np.random.default_rng(0)
    frames = synthetic_video(rng, 24, 270, 480)  # resized by the pipeline to 360x640
    model = build(out / "model", FULL_MODEL, ROBERTA_BASE, seed=0)
    pipe = make_pipeline(model, frames)
    model.eval()  # what the pipeline's first call does (the model is in train mode until then)
    query = "  A Person   riding a BIKE "
    # what Pipeline._process_single does between preprocess and forward (sizes become tensors)
    pre = pipe._collate_fn(pipe.preprocess(("video.mp4", [query])))
    clip = pre["windows"][0]
    q = pre["text_queries"][0]
    with torch.no_grad():
        window = nested_tensor_from_videos_list([clip])
        outputs = model.model(window, torch.arange(len(window.tensors)), [q])
        masks = model.postprocessor(outputs, [pre["video_metadata"]], window.tensors.shape[-2:])[0][
            "pred_masks"
        ]
    ids = model.model.transformer.tokenizer.batch_encode_plus(
        [q], padding="longest", return_tensors="pt"
    )["input_ids"]
    np.savez(
        out / "ref.npz",
        frames=frames,
        query=np.array(query),
        normalized_query=np.array(q),
        input_ids=ids.numpy(),
        clip=clip.numpy(),
        pred_masks=outputs["pred_masks"].numpy(),
        pred_is_referred=outputs["pred_is_referred"].numpy(),
        window_masks=masks[:, 0].numpy().astype(np.uint8),
    )


def run_pipeline(out: Path) -> None:
    from modelscope.outputs import OutputKeys

    rng = np.random.default_rng(1)
    # 20 frames -> windows [0, 20) and [18, 20) (a 2-frame window: Swin's window shrinks in time);
    # a 1:13 frame -> 48x640 network input (cheap; Swin's window shrinks in height at stride 16)
    frames = synthetic_video(rng, 20, 26, 338)
    model = build(out / "model", SMALL_MODEL, SMALL_ROBERTA, seed=1)
    pipe = make_pipeline(model, frames)
    queries = ["The Bright  SQUARE", "a dog\trunning on the left"]
    result = pipe(("video.mp4", queries))
    masks = np.stack([m.astype(np.float32) for m in result[OutputKeys.MASKS]])  # (Q, T, H, W) 0/1
    np.savez(out / "ref.npz", frames=frames, queries=np.array(queries), masks=masks)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("VBATCH_ORACLE_THREADS", "2")))
    # MODE[,MODE…]: several cases in one process, each under OUT_DIR/<mode>/ (modelscope's import
    # costs the tests seconds per process)
    out_dir, modes = Path(sys.argv[1]), sys.argv[2].split(",")
    for mode in modes:
        case = out_dir / mode if len(modes) > 1 else out_dir
        case.mkdir(parents=True, exist_ok=True)
        {"full": run_full, "pipeline": run_pipeline}[mode](case)
