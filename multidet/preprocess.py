"""Step 2: RGB image -> letterboxed tensor at an architecture's input size (512 for D0, 640 for D1, ...),
exactly as effdet's own eval pipeline does it.

effdet evaluates with ``transforms_coco_eval`` (ResizePad: resize so the image fits the input keeping
its aspect ratio, paste at the top-left corner on a mean-coloured canvas) and then normalises on the
device in its PrefetchLoader: ``x.float().sub_(mean * 255).div_(std * 255)``. We call the same
transform with the same resolved input config, and normalise the same way on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from effdet import get_efficientdet_config
from effdet.data import resolve_input_config
from effdet.data.transforms import transforms_coco_eval
from PIL import Image

from .decode import decode_image


@dataclass(frozen=True)
class Letterbox:
    """Where an original image sits in the network input."""

    width: int  # original image size, pixels
    height: int
    scale: float  # original pixels per network pixel (effdet's ``img_scale``)

    @property
    def content_size(self) -> tuple[float, float]:
        """(w, h) of the image area inside the network input, in network pixels."""
        return self.width / self.scale, self.height / self.scale


@dataclass
class Batch:
    """A normalised batch and where each image sits in it: what every optimization's ``detect`` takes."""

    tensor: torch.Tensor  # [B, 3, H, W] float32, normalised, on the device
    img_scale: torch.Tensor  # [B] original pixels per network pixel (effdet's img_info)
    img_size: torch.Tensor  # [B, 2] original (width, height)
    letterboxes: list[Letterbox]

    def __len__(self) -> int:
        return len(self.letterboxes)

    def head(self, n: int) -> Batch:
        """The first ``n`` images."""
        return Batch(self.tensor[:n], self.img_scale[:n], self.img_size[:n], self.letterboxes[:n])


class Preprocessor:
    """effdet's eval letterbox + normalisation for one architecture (or an effdet config)."""

    def __init__(self, architecture):
        config = get_efficientdet_config(architecture) if isinstance(architecture, str) else architecture
        cfg = resolve_input_config({}, config)
        self.input_size: tuple[int, int] = tuple(cfg["input_size"][-2:])
        # architectures with the same key share one letterbox per image (Detector)
        self.key = (self.input_size, cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["fill_color"])
        self._transform = transforms_coco_eval(
            self.input_size,
            interpolation=cfg["interpolation"],
            use_prefetcher=True,
            fill_color=cfg["fill_color"],
            mean=cfg["mean"],
            std=cfg["std"],
        )
        self._mean = torch.tensor([x * 255 for x in cfg["mean"]]).view(1, 3, 1, 1)
        self._std = torch.tensor([x * 255 for x in cfg["std"]]).view(1, 3, 1, 1)

    def letterbox(self, img: Image.Image) -> tuple[np.ndarray, Letterbox]:
        """Resize + pad one image; returns a CHW uint8 array and its Letterbox."""
        width, height = img.size
        fitted, factor = _fit_short_side(img, self.input_size)
        arr, anno = self._transform(fitted, {})
        return arr, Letterbox(width=width, height=height, scale=float(anno["img_scale"]) * factor)

    def collate(self, letterboxed: Sequence[tuple[np.ndarray, Letterbox]], device: torch.device | str) -> Batch:
        """Stack letterboxed uint8 images, normalise them on ``device`` (fp32, NCHW), with their img_info."""
        arrays = [arr for arr, _ in letterboxed]
        letterboxes = [lb for _, lb in letterboxed]
        x = torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True)
        x = x.float().sub_(self._mean.to(device)).div_(self._std.to(device))
        scale = torch.tensor([lb.scale for lb in letterboxes], dtype=torch.float32, device=device)
        size = torch.tensor([[lb.width, lb.height] for lb in letterboxes], dtype=torch.float32, device=device)
        return Batch(x, scale, size, letterboxes)

    def prepare(self, images: Sequence[Image.Image], device: torch.device | str) -> Batch:
        """Decoded images -> one Batch (letterbox each, then collate)."""
        return self.collate([self.letterbox(img) for img in images], device)

    def prepare_bytes(
        self, bodies: Sequence[bytes], device: torch.device | str, max_image_pixels: int = 10**8
    ) -> Batch:
        """Encoded images (trusted: files, check sets) -> one Batch. Requests go through Detector.predict,
        which handles each image's errors on its own."""
        return self.prepare([decode_image(b, max_image_pixels) for b in bodies], device)


def _fit_short_side(img: Image.Image, input_size: tuple[int, int]) -> tuple[Image.Image, float]:
    """effdet's ResizePad truncates the scaled short side to int(): at extreme aspect ratios (e.g.
    10000x1) that is 0 pixels and its resize fails. Such an image is resized here first, to the size the
    letterbox gives it with its short side kept at >= 1 pixel, and effdet's transform letterboxes that;
    returns the image and the factor (original pixels per pixel of it) that multiplies effdet's img_scale.
    Resizing before padding keeps the work bounded by the output (padding the short side at full
    resolution would allocate W^2/512 pixels: 5.9 GB for a legal 1,000,000 x 1 PNG). Every other image
    is effdet's, untouched (factor 1)."""
    width, height = img.size
    scale = min(input_size[0] / height, input_size[1] / width)
    if int(width * scale) >= 1 and int(height * scale) >= 1:
        return img, 1.0
    size = (max(1, min(input_size[1], round(width * scale))), max(1, min(input_size[0], round(height * scale))))
    factor = max(width / size[0], height / size[1])  # the long side's ratio: it sets the scale
    return img.resize(size, Image.BILINEAR, reducing_gap=3.0), factor
