"""``--decode gpu``: JPEGs decoded and resized in the model actor, on its GPU (nvJPEG).

The CPU stage reads only the JPEG's header (size, orientation, pixel cap: :func:`probe_jpeg`) and
ships the file itself as the row's network input, a 1-D uint8 array. The model actor decodes its
batch with ``torchvision.io.decode_jpeg`` on its device (one batched call on a GPU), resizes each
image to the network's size there, and hands the model's usual preprocessed input to ``forward``.
The CPU then only fetches, writes and encodes masks: the decode and the resize, most of the CPU
cost per image (docs/BENCHMARKS.md), move to the GPU.

On an actor without a GPU the same code runs on the actor's CPU: torchvision's libjpeg-turbo decode
gives Pillow's pixels exactly, and torch's antialiased uint8 resize is within 1 grey level of
Pillow's (measured, docs/BENCHMARKS.md). That fallback is correct, and its resize is cheaper than
Pillow's, but the decode is only moved from the CPU stage into the actor, not saved.

Whatever the device decoder refuses (a truncated or corrupt body behind a valid header, a JPEG
flavour nvJPEG lacks) is decoded again, alone, by Pillow on the CPU as exact mode does; what Pillow
refuses too becomes that row's error, with exact mode's message.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from vbatch.models.base import Transforms
from vbatch.operators.decode import DecodeError, open_image
from vbatch.operators.images import network_size

logger = logging.getLogger(__name__)


def is_encoded(array: np.ndarray) -> bool:
    """Is this network input a JPEG file still to decode (``--decode gpu``) rather than pixels?"""
    return array.ndim == 1 and array.dtype == np.uint8


class DeviceDecoder:
    """Encoded JPEGs → the model's preprocessed inputs, decoded and resized on ``device``."""

    def __init__(self, transforms: Transforms, device: torch.device) -> None:
        self.transforms = transforms
        self.device = device
        if device.type != "cuda":
            logger.warning(
                "--decode gpu: this model actor has no GPU (%s); JPEGs are decoded on its CPU",
                device,
            )

    def __call__(self, files: list[np.ndarray]) -> list[np.ndarray | str]:
        """One preprocessed network input per file, or the error message of a file that does not
        decode."""
        tensors = [torch.from_numpy(np.require(f, requirements=["C", "W"])) for f in files]
        images: list[torch.Tensor | None]
        try:
            images = list(self._decode(tensors))
        except Exception as e:  # one bad file fails the batched call: decode them one by one
            logger.info("batched JPEG decode failed (%s); decoding one by one", _first_line(e))
            images = [self._decode_one(t) for t in tensors]
        out: list[np.ndarray | str] = []
        for f, image in zip(files, images, strict=True):
            try:
                if image is None:  # the device decoder refused it: Pillow, as exact mode decodes
                    pixels = open_image(f.tobytes(), max_pixels=np.iinfo(np.int64).max).array()
                    image = torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)
                out.append(self.transforms.preprocess(self._resize(image)))
            except DecodeError as e:
                out.append(str(e))
            except MemoryError:
                raise
            # as in the CPU stage: the model refusing an image is a row error
            except Exception as e:
                logger.exception("preprocess failed")
                out.append(f"preprocess failed: {type(e).__name__}: {e}")
        return out

    def _decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            # nvJPEG writes on a stream of its own into memory allocated on ours, without waiting
            # for our queued kernels (pytorch/vision#9606): start with nothing queued
            torch.cuda.synchronize(self.device)
        with warnings.catch_warnings():
            # torchvision 0.29 points to TorchCodec for image decoding; its decode_jpeg still works
            warnings.simplefilter("ignore", DeprecationWarning)
            # (orientation applied here, not by torchvision: on CUDA it ignores apply_exif_orientation)
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        pairs = zip(decoded, tensors, strict=True)
        return [orient(image, exif_orientation(t.numpy())) for image, t in pairs]

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode([tensor])[0]
        except Exception:
            return None

    def _resize(self, image: torch.Tensor) -> np.ndarray:
        """(3, H, W) uint8 on the device → (h, w, 3) uint8 on the host at the network's size.

        Antialiased bilinear, as Pillow's resize: on the CPU torch's uint8 kernel (within 1 grey
        level of Pillow); on a GPU in float, rounded.
        """
        size = network_size(self.transforms, (int(image.shape[1]), int(image.shape[2])))
        if size is not None and tuple(size) != tuple(image.shape[1:]):
            x = image[None]
            if x.device.type != "cpu":
                x = x.float()
            x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True)
            image = x.round_().clamp_(0, 255).to(torch.uint8)[0] if x.is_floating_point() else x[0]
        return image.permute(1, 2, 0).contiguous().cpu().numpy()


def exif_orientation(jpeg: np.ndarray | bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, read from its header; 1 when absent."""
    try:
        data = jpeg.tobytes() if isinstance(jpeg, np.ndarray) else jpeg
        with Image.open(io.BytesIO(data)) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored → as shown, for EXIF ``orientation`` (what Pillow's ``exif_transpose``
    does), on whatever device the image is."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:  # 90° clockwise
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # 90° counter-clockwise
        return image.transpose(-2, -1).flip(-2)
    return image


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
