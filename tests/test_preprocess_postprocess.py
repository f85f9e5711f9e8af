"""Letterbox geometry, label mapping and the merged response, checked with real pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from helpers import NAMES, SHIPPED
from multidet.modelset import read_model_set
from multidet.postprocess import detections_for, merge, to_original
from multidet.preprocess import Preprocessor

PRE = Preprocessor("efficientdet_d0")
COCO_CLASSES = read_model_set(SHIPPED)[NAMES[0]].class_names  # effdet id k -> name k - 1


def bright_box(arr_chw: np.ndarray) -> list[float]:
    """Bounding box (x1, y1, x2, y2, pixel-edge coordinates) of the white pixels in a letterboxed image."""
    mask = arr_chw.min(axis=0) > 200
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize(
    "size,rect",
    [
        ((1000, 600), (400, 150, 700, 450)),  # landscape, downscaled
        ((300, 800), (50, 500, 250, 700)),  # portrait, downscaled
        ((200, 100), (20, 10, 120, 60)),
    ],
)  # small, upscaled
def test_letterbox_maps_back_to_original_pixels(size, rect):
    img = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(img).rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=(255, 255, 255))
    arr, lb = PRE.letterbox(img)
    assert arr.shape == (3, 512, 512) and (lb.width, lb.height) == size
    assert lb.scale == pytest.approx(max(size) / 512)
    # content at the top-left, the rest is padding in effdet's mean colour
    cw, ch = lb.content_size
    assert cw == pytest.approx(size[0] / lb.scale) and ch == pytest.approx(size[1] / lb.scale)
    pad = arr[:, int(ch) + 1 :, :] if ch < 511 else arr[:, :, int(cw) + 1 :]
    assert np.all(np.abs(pad.reshape(3, -1).mean(1) - np.array([124, 116, 104])) <= 1)
    found = bright_box(arr)
    back = to_original(torch.tensor([found]), lb)[0].tolist()
    # one network pixel of resampling blur at the edges, in original pixels
    assert back == pytest.approx(list(rect), abs=lb.scale * 1.5 + 0.5)


def test_to_original_clips_to_image():
    img = Image.new("RGB", (400, 200))
    _, lb = PRE.letterbox(img)
    out = to_original(torch.tensor([[-10.0, -5.0, 600.0, 300.0]]), lb)[0].tolist()
    assert out == [0.0, 0.0, 400.0, 200.0]


def test_normalisation_matches_effdet_prefetcher():
    img = Image.new("RGB", (64, 64), (124, 116, 104))
    arr, _ = PRE.letterbox(img)
    x = PRE.prepare([img], "cpu").tensor
    # effdet's PrefetchLoader: x.float().sub_(mean * 255).div_(std * 255), ImageNet statistics
    mean = torch.tensor([v * 255 for v in (0.485, 0.456, 0.406)]).view(3, 1, 1)
    std = torch.tensor([v * 255 for v in (0.229, 0.224, 0.225)]).view(3, 1, 1)
    assert torch.equal(x[0], torch.from_numpy(arr).float().sub_(mean).div_(std))
    assert x.abs().max() < 0.01  # mean colour -> ~0


def test_labels_of_the_default_set_come_from_its_metadata():
    """Class names are data (the weights' metadata): the first model is COCO's 90 ids with N/A gaps."""
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[89] == "toothbrush"
    assert COCO_CLASSES[11] == "N/A" and COCO_CLASSES[17] == "dog"
    classes = [read_model_set(SHIPPED)[n].class_names for n in NAMES]
    assert classes[1][0] == "fish" and [len(c) for c in classes] == [90, 7, 20]


def test_detections_threshold_padding_and_labels():
    _, lb = PRE.letterbox(Image.new("RGB", (1024, 512)))  # scale 2
    rows = torch.tensor(
        [
            [10.0, 10.0, 50.0, 40.0, 0.9, 18.0],
            [0.0, 0.0, 20.0, 20.0, 0.2, 1.0],
            [300.0, 300.0, 400.0, 400.0, 0.8, 3.0],  # entirely in the padding: empty after clipping
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )  # effdet's padding row
    dets = detections_for(rows, lb, NAMES[0], COCO_CLASSES, threshold=0.5)
    assert dets == [
        {
            "model": NAMES[0],
            "class_id": 18,
            "label": "dog",
            "score": pytest.approx(0.9),
            "box": [20.0, 20.0, 100.0, 80.0],
        }
    ]
    assert len(detections_for(rows, lb, NAMES[0], COCO_CLASSES, threshold=0.0)) == 2


def test_merge_is_score_descending_with_counts():
    a = [{"model": "a", "score": 0.5}, {"model": "a", "score": 0.1}]
    b = [{"model": "b", "score": 0.7}]
    dets, models = merge({"a": a, "b": b}, {"a": 90, "b": 7})
    assert [d["score"] for d in dets] == [0.7, 0.5, 0.1]
    assert models == [{"name": "a", "num_classes": 90, "count": 2}, {"name": "b", "num_classes": 7, "count": 1}]


@pytest.mark.parametrize("size", [(10000, 1), (1, 10000), (5000, 3), (1, 1)])
def test_extreme_aspect_ratios_letterbox(size):
    """effdet's ResizePad alone fails when the short side scales below one pixel."""
    img = Image.new("RGB", size, (255, 255, 255))
    arr, lb = PRE.letterbox(img)
    assert arr.shape == (3, 512, 512) and (lb.width, lb.height) == size
    assert lb.scale == pytest.approx(max(size) / 512)
    assert arr[:, 0, 0].tolist() != [124, 116, 104]  # the image is there, at the top-left


def test_a_legal_extreme_aspect_image_costs_what_its_output_does():
    """A 1,000,000 x 1 image (1 MP, legal) is resized before it is padded: padding its short side at full
    resolution first would allocate ~5.9 GB. Run alone, so the peak memory is this letterbox's."""
    import subprocess
    import sys

    code = (
        "from PIL import Image; from multidet.preprocess import Preprocessor;"
        "arr, lb = Preprocessor('efficientdet_d0').letterbox(Image.new('RGB', (1_000_000, 1), (255, 255, 255)));"
        "assert arr.shape == (3, 512, 512) and abs(lb.scale - 1_000_000 / 512) < 1e-3, lb;"
        # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec on Linux)
        "print(next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')))"
    )
    peak_kb = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert peak_kb < 2_000_000, f"peak RSS {peak_kb / 1e6:.1f} GB"
