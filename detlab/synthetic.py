"""Labelled detection data, made offline and deterministically (no downloads on these machines).

Each class of a model is one visually distinct object kind: a shape (circle, square, triangle,
star, plus, ring, hexagon, crescent) in a colour (red, green, blue, yellow, then cyan, magenta); 8 x 6 = 48
kinds.
Objects vary in size (24 px at the service's 512 px letterbox to most of the image), aspect,
rotation, shading, overlap and count, on varied backgrounds (noise, gradients, stripes, crops of
the public-domain photos in ``load_tests/images``), in images of varied size and aspect ratio (so
the letterbox is exercised).

Data is made for one model's classes (``DataSpec``: its name, class names and the class ids the data
uses; by default every named class, ``N/A`` placeholders left out; a training recipe may name a subset),
and which kind each of those classes is (by default class k, the k-th id its data uses, is kind k; a recipe
gives classes of one name in several models one kind and every other class a kind of its own,
``detlab.recipe``). Class ids are the model's own 1-based ids, so a dataset's ``annotations.json`` (COCO
format, each category's ``supercategory`` naming its kind) can be scored against that model's detections
directly.

Same (model, split, count, seed) -> byte-identical files: every random draw comes from one
``numpy.random.Generator`` seeded from (seed, split, image index), and JPEGs are written with
fixed encoder settings.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "plus", "ring", "hexagon", "crescent")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 70, 225), "yellow": (240, 210, 25)}
# added after the first 32 kinds (which stay as they were: trained weights name them): hues between the first four
MORE_COLOURS = {"cyan": (20, 195, 205), "magenta": (205, 40, 195)}
RGB = {**COLOURS, **MORE_COLOURS}

SPLITS = ("train", "val")
MIN_OBJECT = 24  # px, the smallest object's extent at the service's input size
SERVE_SIZE = 512  # EfficientDet-D0's input size: objects are sized for what it sees
PLACEHOLDER = "N/A"  # a class id a label set leaves unused (COCO's 90 ids name 80 classes)


@dataclass(frozen=True)
class DataSpec:
    """Whose data: a model's name (it seeds the splits), its class names, the 1-based class ids the data
    uses (None: every class not named ``N/A``) and the kind of each of them (names, e.g. ``"cyan star"``,
    parallel to the ids; None: the k-th id is ``KINDS[k]``)."""

    name: str
    class_names: tuple[str, ...]
    class_ids: tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None

    @classmethod
    def of(cls, model) -> DataSpec:
        """The spec of a loaded model (its metadata's recorded training ids and kinds, where there are any)."""
        ids, kinds = getattr(model, "trained_ids", None), getattr(model, "trained_kinds", None)
        return cls(model.name, tuple(model.class_names), ids, kinds)


@dataclass(frozen=True)
class Kind:
    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _kinds() -> tuple[Kind, ...]:
    """48 kinds ordered so that any prefix is as distinct as possible: the first 8 are 8 shapes in
    alternating colours, the next 8 the same shapes in the next colour, and so on; the first 32 in the
    first four colours, the last 16 in the two added ones."""
    out = []
    for colours in (list(COLOURS), list(MORE_COLOURS)):
        for j in range(len(colours)):
            for s, shape in enumerate(SHAPES):
                out.append(Kind(shape, colours[(s + j) % len(colours)]))
    return tuple(out)


KINDS = _kinds()
KIND_BY_NAME = {k.name: k for k in KINDS}


def class_ids(spec: DataSpec, cap: bool = False) -> tuple[int, ...]:
    """The 1-based class ids a model's data uses (``kind_table``: the kind of each). More than the
    generator's kinds is an error, or with ``cap`` the first ones (a check set of a large label set)."""
    n = len(spec.class_names)
    if spec.class_ids is not None:
        ids = tuple(int(c) for c in spec.class_ids)
        bad = [c for c in ids if not 1 <= c <= n]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"{spec.name}: class ids {list(ids)} must be distinct, within 1..{n}")
    else:
        ids = tuple(i for i, name in enumerate(spec.class_names, 1) if name != PLACEHOLDER)
    if len(ids) > len(KINDS):
        if cap:
            return ids[: len(KINDS)]
        raise ValueError(f"{spec.name} has {len(ids)} classes; the generator has {len(KINDS)} object kinds")
    return ids


def kind_table(spec: DataSpec, cap: bool = False) -> dict[int, Kind]:
    """Class id -> the object kind its data draws."""
    ids = class_ids(spec, cap)
    if spec.kinds is None:
        return dict(zip(ids, KINDS))
    unknown = [k for k in spec.kinds if k not in KIND_BY_NAME]
    if len(spec.kinds) != len(ids) or unknown or len(set(spec.kinds)) != len(spec.kinds):
        raise ValueError(
            f"{spec.name}: kinds must name one distinct object kind per class id ({len(ids)}), "
            f"got {list(spec.kinds)}" + (f" (unknown: {unknown})" if unknown else "")
        )
    return {c: KIND_BY_NAME[k] for c, k in zip(ids, spec.kinds)}


# -- drawing ---------------------------------------------------------------------------------------
def _polygon(shape: str, n: int = 48) -> list[np.ndarray]:
    """Outline(s) of a unit shape centred on 0 (radius ~1); later rings are holes."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "circle":
        return [circle]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.85]
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return [np.stack([np.cos(a), np.sin(a)], 1)]
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if shape == "plus":
        w = 0.33
        return [
            np.array(
                [
                    [-w, -1],
                    [w, -1],
                    [w, -w],
                    [1, -w],
                    [1, w],
                    [w, w],
                    [w, 1],
                    [-w, 1],
                    [-w, w],
                    [-1, w],
                    [-1, -w],
                    [-w, -w],
                ],
                float,
            )
        ]
    if shape == "ring":
        return [circle, circle * 0.55]
    if shape == "hexagon":
        a = np.deg2rad(np.arange(6) * 60)
        return [np.stack([np.cos(a), np.sin(a)], 1)]
    if shape == "crescent":
        return [circle, circle * 0.85 + np.array([0.45, -0.1])]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_mask(
    shape: str,
    size: tuple[int, int],
    centre: tuple[float, float],
    radius: tuple[float, float],
    angle: float,
    supersample: int = 2,
) -> np.ndarray:
    """Anti-aliased float mask (0..1) of one object on an image of ``size`` (w, h); drawn only in
    the object's window, zero elsewhere."""
    w, h = size
    mask = np.zeros((h, w), np.float32)
    reach = max(radius) * 1.5 + 2
    x0, y0 = max(int(centre[0] - reach), 0), max(int(centre[1] - reach), 0)
    x1, y1 = min(int(centre[0] + reach) + 1, w), min(int(centre[1] + reach) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return mask
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    img = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    draw = ImageDraw.Draw(img)
    for k, ring in enumerate(_polygon(shape)):
        pts = (ring * np.array(radius)) @ rot.T + np.array(centre) - np.array([x0, y0])
        draw.polygon([tuple(p) for p in (pts * supersample).tolist()], fill=255 if k == 0 else 0)
    if supersample > 1:
        img = img.resize((x1 - x0, y1 - y0), Image.BOX)
    mask[y0:y1, x0:x1] = np.asarray(img, np.float32) / 255.0
    return mask


def _background(rng: np.random.Generator, w: int, h: int, photos: Sequence[np.ndarray]) -> np.ndarray:
    kind = rng.choice(["noise", "gradient", "stripes", "photo"] if photos else ["noise", "gradient", "stripes"])
    if kind == "noise":
        base = rng.uniform(40, 215, 3)
        coarse = rng.normal(0, rng.uniform(10, 45), (max(2, h // 16), max(2, w // 16), 3))
        coarse = (
            np.asarray(
                Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                np.float32,
            )
            - 128
        )
        out = base + coarse + rng.normal(0, rng.uniform(3, 25), (h, w, 3))
    elif kind == "gradient":
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        theta = rng.uniform(0, 2 * np.pi)
        t = x * math.cos(theta) + y * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        out = a + (b - a) * t[..., None] + rng.normal(0, 4, (h, w, 3))
    elif kind == "stripes":
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        a, b = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 60)
        t = 0.5 + 0.5 * np.sin((x * math.cos(theta) + y * math.sin(theta)) * 2 * np.pi / period)
        out = a + (b - a) * t[..., None] + rng.normal(0, 4, (h, w, 3))
    else:
        photo = photos[int(rng.integers(len(photos)))]
        ph, pw = photo.shape[:2]
        cw, ch = int(rng.integers(min(pw, 64), pw + 1)), int(rng.integers(min(ph, 64), ph + 1))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.asarray(crop.resize((w, h), Image.BILINEAR), np.float32)
    return out


def render_image(
    rng: np.random.Generator, kinds: dict[int, Kind], photos: Sequence[np.ndarray] = (), max_objects: int = 8
) -> tuple[Image.Image, list[dict]]:
    """One image and its objects: ``[{"category_id", "bbox": [x, y, w, h]}]`` (COCO, pixels)."""
    area = rng.uniform(256 * 256, 800 * 640)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # w / h
    w = int(np.clip(round(math.sqrt(area * aspect)), 160, 1024))
    h = int(np.clip(round(math.sqrt(area / aspect)), 160, 1024))
    canvas = _background(rng, w, h, photos)
    ids = list(kinds)
    # the smallest object is MIN_OBJECT px in the service's letterbox (its long side is SERVE_SIZE):
    # about the smallest anchor (32 px) can still match it (IoU >= 0.5)
    smallest = max(MIN_OBJECT, MIN_OBJECT * max(w, h) / SERVE_SIZE)
    count = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[np.ndarray, float]] = []  # (mask, full area) of objects drawn so far
    objects = []
    for _ in range(count):
        for _attempt in range(10):
            cid = ids[int(rng.integers(len(ids)))]
            kind = kinds[cid]
            size = math.exp(rng.uniform(math.log(smallest), math.log(0.8 * min(w, h))))  # bbox-ish extent, px
            stretch = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            radius = (size / 2 * math.sqrt(stretch), size / 2 / math.sqrt(stretch))
            centre = (rng.uniform(0, w), rng.uniform(0, h))
            angle = rng.uniform(0, 2 * np.pi)
            mask = _draw_mask(kind.shape, (w, h), centre, radius, angle)
            full = float(mask.sum())
            ys, xs = np.nonzero(mask > 0.5)
            if full < 60 or len(xs) == 0:
                continue  # mostly outside the image
            # every earlier object keeps >= 70 % of its area visible; this one is drawn on top
            if any(float((m * mask).sum()) > 0.3 * a for m, a in placed):
                continue
            break
        else:
            continue
        for k, (m, a) in enumerate(placed):
            placed[k] = (m * (1 - mask), a)
        placed.append((mask, full))
        colour = np.array(RGB[kind.colour], np.float32) + rng.normal(0, 12, 3)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        wy0, wy1 = max(y0 - 1, 0), min(y1 + 1, h)  # the object's window (the mask is 0 outside)
        wx0, wx1 = max(x0 - 1, 0), min(x1 + 1, w)
        y, x = np.mgrid[wy0:wy1, wx0:wx1].astype(np.float32)
        shade_dir = rng.uniform(0, 2 * np.pi)
        shade = 1 + rng.uniform(0, 0.35) * (
            (x - centre[0]) * math.cos(shade_dir) + (y - centre[1]) * math.sin(shade_dir)
        ) / max(size, 1.0)
        fill = colour * np.clip(shade, 0.6, 1.3)[..., None]
        m = mask[wy0:wy1, wx0:wx1, None]
        canvas[wy0:wy1, wx0:wx1] = canvas[wy0:wy1, wx0:wx1] * (1 - m) + fill * m
        objects.append({"category_id": int(cid), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    canvas += rng.normal(0, rng.uniform(0, 6), canvas.shape)  # sensor noise over everything
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB"), objects


def load_photos(folder: Path | None) -> list[np.ndarray]:
    if folder is None or not Path(folder).is_dir():
        return []
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.jpg"))]


def render_split(
    spec: DataSpec, split: str, count: int, seed: int = 0, photos_dir: Path | None = None, cap: bool = False
) -> Iterator[tuple[Image.Image, list[dict]]]:
    """The images of a split, as ``make_dataset`` writes them (image i is the same for the same seed),
    without files: e.g. INT8 calibration on the training split at MAR build time. ``photos_dir``:
    photos whose crops are some of the backgrounds (None: generated backgrounds only)."""
    kinds, photos = kind_table(spec, cap), load_photos(photos_dir)
    split_key = zlib.crc32(f"{spec.name}/{split}".encode())
    for i in range(count):
        yield render_image(np.random.default_rng([seed, split_key, i]), kinds, photos)


def calibration_images(spec: DataSpec, count: int, seed: int, photos_dir: Path | None) -> list[Image.Image]:
    """The first ``count`` training images of ``spec``'s model, JPEG-round-tripped as the files are."""
    import io

    out = []
    for img, _ in render_split(spec, "train", count, seed, photos_dir, cap=True):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90, optimize=False, subsampling=0)
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def make_dataset(
    spec: DataSpec,
    split: str,
    count: int,
    seed: int,
    out: Path,
    photos_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns the annotation dict."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kinds = kind_table(spec)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (img, objects) in enumerate(render_split(spec, split, count, seed, photos_dir)):
        file_name = f"{split}_{i:05d}.jpg"
        img.save(out / "images" / file_name, format="JPEG", quality=90, optimize=False, subsampling=0)
        images.append({"id": i + 1, "file_name": file_name, "width": img.width, "height": img.height})
        for obj in objects:
            x, y, bw, bh = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["category_id"],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        if progress:
            progress(i + 1, count)
    coco = {
        "info": {
            "description": f"multidet synthetic {spec.name} {split}",
            "model": spec.name,
            "split": split,
            "count": count,
            "seed": seed,
            "generator": "detlab.synthetic",
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": spec.class_names[cid - 1], "supercategory": kind.name} for cid, kind in kinds.items()
        ],
    }
    (out / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n")
    return coco


def check_set(count: int = 6, seed: int = 1234, specs: Sequence[DataSpec] = ()) -> tuple[list[bytes], dict[str, dict]]:
    """A small labelled set made in memory (no files, no photos), for checks at load time (``auto``).

    The images hold every kind of every model's label set; each model's ground truth is the objects of
    its own kinds, with its own class ids. Returns the JPEG bytes and, per model, COCO ground truth for
    ``quality.coco_map``."""
    import io

    tables = {spec.name: {k: c for c, k in kind_table(spec, cap=True).items()} for spec in specs}
    drawn = [k for k in KINDS if any(k in t for t in tables.values())] if specs else list(KINDS)
    kinds = dict(zip(range(1, len(drawn) + 1), drawn))  # drawn[i] drawn with category i + 1
    bodies, objects_per_image = [], []
    for i in range(count):
        img, objects = render_image(np.random.default_rng([seed, i]), kinds)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90, subsampling=0)
        bodies.append(buf.getvalue())
        objects_per_image.append((img.width, img.height, objects))
    truth = {}
    for spec in specs:
        own = tables[spec.name]
        images, annotations = [], []
        for i, (w, h, objects) in enumerate(objects_per_image):
            images.append({"id": i + 1, "file_name": f"check_{i}.jpg", "width": w, "height": h})
            for obj in objects:
                kind = kinds[obj["category_id"]]
                if kind in own:
                    x, y, bw, bh = obj["bbox"]
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": i + 1,
                            "category_id": own[kind],
                            "bbox": obj["bbox"],
                            "area": bw * bh,
                            "iscrowd": 0,
                        }
                    )
        truth[spec.name] = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": spec.class_names[c - 1]} for c in sorted(own.values())],
        }
    return bodies, truth
