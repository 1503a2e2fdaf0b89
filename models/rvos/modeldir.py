"""Random-weight MTTR model directories in ModelScope's layout (tests, ``vbatch demo``, benchmarks).

Written with vbatch's code only (the layout is described in :mod:`vbatch.models.rvos.config`);
:func:`vbatch.models.rvos.load` never imports this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vbatch.models.rvos.config import (
    CONFIG_FILE,
    FULL,
    TEXT_DIR,
    WEIGHTS_FILE,
    RVOSConfig,
    SwinConfig,
)

logger = logging.getLogger(__name__)


def configuration(cfg: RVOSConfig) -> dict[str, Any]:
    """``configuration.json`` for ``cfg``, with the keys ModelScope's model and pipeline read."""
    model: dict[str, Any] = {
        "type": "swinT-referring-video-object-segmentation",
        "num_queries": cfg.num_queries,
        "mask_kernels_dim": cfg.mask_kernels_dim,
        "aux_loss": True,
        "backbone_name": "swin-t",
        "backbone_pretrained": False,
        "backbone_pretrained_path": "",
        "train_backbone": True,
        "running_mode": "test",
        "num_encoder_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "text_encoder_type": "roberta-base",
        "freeze_text_encoder": True,
        "d_model": cfg.d_model,
        "nheads": cfg.nheads,
        "dim_feedforward": cfg.dim_feedforward,
        "dropout": 0.1,
        "activation": cfg.activation,
    }
    if cfg.swin != SwinConfig():
        model["backbone_config"] = asdict(cfg.swin)
    return {
        "framework": "pytorch",
        "task": "referring-video-object-segmentation",
        "model": model,
        "pipeline": {
            "type": "referring-video-object-segmentation",
            "dataset_name": "ref_youtube_vos",
            "save_masked_video": False,
            "output_font": "",
            "output_font_size": 20,
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


# a few phrases in the style of Ref-YouTube-VOS expressions, to train a toy byte-level BPE on
_CORPUS = (
    "a person riding a bike on the road",
    "the dog on the left running across the grass",
    "a red car driving down the street",
    "the man in a white shirt holding a skateboard",
    "a small brown cat sitting next to the window",
    "the second horse from the right jumping",
    "a woman with long hair dancing on a stage",
    "the black bird flying over the water",
    "a giraffe eating leaves from a tall tree",
    "the boy wearing a blue cap is throwing a ball",
)


def write_tokenizer(text_dir: Path, vocab_size: int = 600) -> None:
    """Train a small byte-level BPE and save it in RoBERTa's tokenizer layout.

    roberta-base's vocabulary cannot be downloaded here; this toy one has RoBERTa's special tokens
    at RoBERTa's ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4) and its
    post-processing (``<s> ... </s>``), so the ids it yields fit a 50265-row embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    text_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(text_dir / "tokenizer.json"))
    tok.model.save(str(text_dir))  # vocab.json + merges.txt, the slow tokenizer's files
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }
    (text_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    tok_cfg = {
        "tokenizer_class": "RobertaTokenizer",
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        "model_max_length": 512,
        **special_map,
    }
    (text_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def write_text_config(text_dir: Path, cfg: RVOSConfig) -> None:
    """RoBERTa's ``config.json`` (roberta-base's fields, sizes from ``cfg.text``)."""
    text_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "architectures": ["RobertaForMaskedLM"],
        "model_type": "roberta",
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        **asdict(cfg.text),
    }
    (text_dir / "config.json").write_text(json.dumps(raw, indent=2))


def write_random_model_dir(path: str | Path, config: RVOSConfig = FULL, seed: int = 0) -> Path:
    """A model directory in ModelScope's layout with random weights and a toy tokenizer.

    For tests and demos of the pipeline; built with vbatch's own code only. The checkpoint is
    wrapped in ``model_state_dict`` and carries ``position_ids`` like the shipped one. Unlike the
    shipped directory, ``transformer_cfg_dir`` holds no RoBERTa weights (vbatch takes them from the
    checkpoint, as the reference ends up doing).

    Args:
        path: the directory to create (parents too); existing files are overwritten.
        config: the architecture, e.g. ``FULL`` or ``TINY``.
        seed: seeds the random weights.

    Returns: ``path`` as a :class:`Path`.
    """
    from vbatch.models.rvos.convert import modelscope_state_dict
    from vbatch.models.rvos.model import MTTR

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(configuration(config), indent=2))
    write_text_config(out / TEXT_DIR, config)
    write_tokenizer(out / TEXT_DIR)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MTTR(config)
        # default inits leave the biases of most layers at 0 and the "is referred" head near 50/50;
        # small random biases everywhere give masks and scores that depend on every weight
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    torch.save({"model_state_dict": modelscope_state_dict(model)}, out / WEIGHTS_FILE)
    logger.info("wrote a random MTTR model directory at %s", out)
    return out
