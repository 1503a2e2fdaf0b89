"""Reference outputs of ModelScope's salient detection (SENet and U2NET) with random weights.

Run by ``tests/models/test_salient_parity.py`` with the oracle interpreter (ModelScope 1.40.2):

    python tests/oracle/salient_ref.py OUT_DIR

For each variant it builds ModelScope's network, gives EVERY parameter and buffer random values
(BatchNorm running statistics set from one batch of images and perturbed, so that eval-mode
activations and sigmoids stay unsaturated), saves it in ModelScope's model-directory layout
(``OUT_DIR/<variant>/pytorch_model.pt`` + ``config.py`` for SENet + ``configuration.json``), loads it
back through ModelScope's own ``SalientDetection`` and writes ``OUT_DIR/salient_ref.npz``:

* ``<v>_pre_uint8`` (N, h, w, 3): the test images resized by torchvision's ``Resize(norm_size)``;
* ``<v>_pre_float`` (N, 3, h, w): ``SalientDetection.transform_input`` of those;
* ``<v>_net`` (N, h, w): the network's first output on them (one batched forward);
* ``image<i>`` (H, W, 3) uint8 RGB and ``<v>_mask<i>`` (H, W) uint8: the pipeline end to end
  (``ImageSalientDetectionPipeline`` preprocess → forward → postprocess, PIL RGB input).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch  # before anything that could load TensorFlow (ORACLE.md)
from modelscope.models.cv.salient_detection.models import U2NET, SENet
from modelscope.models.cv.salient_detection.salient_model import SalientDetection
from modelscope.pipelines.cv.image_salient_detection_pipeline import ImageSalientDetectionPipeline
from PIL import Image
from torch import nn
from torchvision import transforms

SIZES = [(480, 640), (333, 500), (1024, 300), (256, 256)]
# a non-square size (multiples of 32) and non-default statistics, so that a port which swaps
# height/width or ignores config.py cannot pass
SENET_CONFIG = {
    "norm_mean": [0.5, 0.45, 0.4],
    "norm_std": [0.25, 0.22, 0.2],
    "norm_size": [288, 352],
}


def test_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A real-looking RGB image: smooth two-colour gradient, a few filled shapes, blur, mild noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (yy / h * rng.uniform(0.3, 1) + xx / w * rng.uniform(0.3, 1)) / 2
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    img = (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)
    for _ in range(4):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cy, cx = int(rng.uniform(0.2, 0.8) * h), int(rng.uniform(0.2, 0.8) * w)
        ay, ax = int(rng.uniform(0.05, 0.3) * h), int(rng.uniform(0.05, 0.3) * w)
        if rng.random() < 0.5:
            cv2.ellipse(img, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            cv2.rectangle(img, (cx - ax, cy - ay), (cx + ax, cy + ay), color, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@torch.no_grad()
def randomize(model: nn.Module, calib: torch.Tensor, seed: int) -> None:
    """Random values for every parameter and buffer; BN statistics measured on ``calib`` and perturbed."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight.copy_(
                torch.randn(mod.weight.shape, generator=g) / mod.weight[0].numel() ** 0.5
            )
            if mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        elif isinstance(mod, nn.BatchNorm2d):
            mod.weight.copy_(0.8 + 0.4 * torch.rand(mod.weight.shape, generator=g))
            mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        elif isinstance(mod, nn.Linear):  # none in these networks; kept so that nothing is missed
            mod.weight.copy_(
                torch.randn(mod.weight.shape, generator=g) / mod.weight.shape[1] ** 0.5
            )
            mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(calib)
    model.eval()
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
        std = m.running_var.clamp(min=1e-4).sqrt()
        m.running_mean.add_(0.05 * std * torch.randn(std.shape, generator=g))
        # 1.3-1.5x the measured std: a slight contraction at every BN keeps activations of images
        # unlike the calibration batch from growing layer after layer (and sigmoids from saturating)
        m.running_var.copy_((std * (1.3 + 0.2 * torch.rand(std.shape, generator=g))) ** 2)
        m.num_batches_tracked.fill_(int(torch.randint(1, 100000, (), generator=g)))
    # centre the output logits and give them std 1.5: sigmoids well inside (0, 1)
    head = model.out_conv_4 if isinstance(model, SENet) else model.outconv
    seen = []
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(calib)
    handle.remove()
    mean, std = seen[0].mean(), seen[0].std()
    head.weight.mul_(1.5 / std)
    head.bias.sub_(mean).mul_(1.5 / std)
    # the networks' ABlock branches never run: the calibration pass left their BN statistics at
    # the reset values (0 / 1), so draw those too
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and (".alayer." in name or ".arlayer." in name):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def main(out_dir: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(1234)
    images = [test_image(rng, h, w) for h, w in SIZES]
    result: dict[str, np.ndarray] = {f"image{i}": im for i, im in enumerate(images)}

    for variant, seed in (("senet", 1), ("u2net", 2)):
        t0 = time.time()
        model_dir = out_dir / variant
        model_dir.mkdir(parents=True, exist_ok=True)
        if variant == "senet":
            net: nn.Module = SENet(backbone_path=None, pretrained=False)
            cfg = SENET_CONFIG
            (model_dir / "config.py").write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
        else:
            net = U2NET(3, 1)
            cfg = {
                "norm_mean": [0.485, 0.456, 0.406],
                "norm_std": [0.229, 0.224, 0.225],
                "norm_size": [320, 320],
            }
        h, w = cfg["norm_size"]
        resize = transforms.Resize((h, w))
        tensor = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(cfg["norm_mean"], cfg["norm_std"])]
        )
        calib_imgs = [
            test_image(rng, int(rng.integers(200, 700)), int(rng.integers(200, 700)))
            for _ in range(6)
        ]
        calib = torch.stack([tensor(resize(Image.fromarray(im))) for im in calib_imgs])
        randomize(net, calib, seed)
        torch.save(net.state_dict(), model_dir / "pytorch_model.pt")
        (model_dir / "configuration.json").write_text(
            json.dumps(
                {
                    "framework": "pytorch",
                    "task": "semantic-segmentation",
                    "model": {"type": "detection"},
                    "pipeline": {
                        "type": f"{'res2net' if variant == 'senet' else 'u2net'}-salient-detection"
                    },
                }
            )
        )

        # ModelScope's own loader (strict load_state_dict); config.py is executed there, hence the opt-in
        model = SalientDetection(str(model_dir), trust_remote_code=True)
        assert (model.norm_size == cfg["norm_size"]) or tuple(model.norm_size) == tuple(
            cfg["norm_size"]
        )

        # (a) the network on the same preprocessed input
        pre = np.stack([np.asarray(resize(Image.fromarray(im))) for im in images])
        x = torch.stack([model.transform_input(Image.fromarray(p)) for p in pre])
        with torch.no_grad():
            outs = model.model(x)
        result[f"{variant}_pre_uint8"] = pre
        result[f"{variant}_pre_float"] = x.numpy()
        result[f"{variant}_net"] = outs[0][:, 0].numpy()
        logits = torch.logit(outs[0].clamp(1e-7, 1 - 1e-7))
        print(
            f"{variant}: first-map logits mean {logits.mean():.2f} std {logits.std():.2f}, "
            f"probabilities in [{outs[0].min():.4f}, {outs[0].max():.4f}]"
        )

        # (b) end to end through the pipeline's code path, PIL RGB input (numpy would be read as BGR)
        pipe = ImageSalientDetectionPipeline(model=model)
        for i, im in enumerate(images):
            out = pipe(Image.fromarray(im))
            result[f"{variant}_mask{i}"] = np.asarray(out["masks"])
        print(f"{variant}: done in {time.time() - t0:.1f} s")

    np.savez(out_dir / "salient_ref.npz", **result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
