#!/usr/bin/env python
"""Draw the service's detections on an image: boxes and labels, one colour per model (by its place in
the set), as a PNG.

    python scripts/annotate.py docs/example.jpg --out docs/example_detections.png [--model-set my.yaml]

Runs the same data path as the server (multidet.pipeline.Detector) on a model set (default: models.yaml).
Where the image has labels beside it (docs/example.json: its objects' kinds and boxes), it also says
which objects each model found, missed, or saw that are not there (detlab.evaluation.check_image).

The README's example is chosen from labelled splits (`make dataset`: data/mixed/val holds every model's kinds
together) by the same check:

    python scripts/annotate.py --choose data/mixed/val [--export docs/example.jpg]

ranks the images whose answer no score near the threshold decides (the same finds and false detections at
0.45 as at 0.55; --margin): most models answering first, then an object several models found (a kind their
label sets share), fewest false detections, fewest missed, most found; it says how many are answered
completely; --export copies the first and writes its labels.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from paths import MODEL_SET
from PIL import Image, ImageDraw, ImageFont

from detlab.evaluation import check_image, kinds_of, labelled_objects, read_dataset
from multidet.config import Settings
from multidet.pipeline import Detector, RequestOptions

MARGIN = 0.05  # a chosen example's finds score >= threshold + MARGIN, anything else < threshold - MARGIN

# model k of the response's models[] gets colour k (cycled past the end)
PALETTE = [
    (255, 255, 255),
    (0, 230, 255),
    (255, 60, 200),
    (255, 220, 0),
    (90, 255, 90),
    (255, 140, 40),
    (160, 120, 255),
    (255, 90, 90),
]


def annotate(image_bytes: bytes, response: dict) -> Image.Image:
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(11, img.width // 60))
    colours = {m["name"]: PALETTE[k % len(PALETTE)] for k, m in enumerate(response["models"])}
    order = {m["name"]: k for k, m in enumerate(response["models"])}
    # one box per place: the models that found the same box get their labels stacked above it, in set order
    places: dict[tuple, list[dict]] = {}
    for d in response["detections"]:
        places.setdefault(tuple(round(v) for v in d["box"]), []).append(d)
    line = font.size + 4
    for found in sorted(places.values(), key=lambda ds: -max(d["score"] for d in ds)):  # strongest below
        found.sort(key=lambda d: order[d["model"]])
        x1, y1, x2, y2 = found[0]["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colours[found[0]["model"]], width=2)
        top = y1 - line * len(found) if y1 - line * len(found) >= 0 else y1  # above the box, or inside it
        for k, d in enumerate(found):
            text = f"{d['label']} {d['score']:.2f}"
            ty = top + k * line
            width = draw.textlength(text, font=font) + 4
            tx = max(0, min(x1, img.width - width))  # inside the image
            draw.rectangle([tx, ty, tx + width, ty + line], fill=(0, 0, 0))
            draw.text((tx + 2, ty + 1), text, fill=colours[d["model"]], font=font)
    # the legend on a strip below the image (one line, or one per model where that is too wide)
    legend = [f"threshold {response.get('threshold', '')}"] + [f"{m['name']}: {m['count']}" for m in response["models"]]
    rows = ["   ".join(legend)] if draw.textlength("   ".join(legend), font=font) < img.width - 8 else legend
    out = Image.new("RGB", (img.width, img.height + line * len(rows) + 4), (0, 0, 0))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, row in enumerate(rows):
        colour = colours.get(row.split(":")[0], (255, 255, 255))
        draw.text((4, img.height + 2 + k * line), row, fill=colour, font=font)
    return out


def report(check, objects) -> str:
    lines = [f"labels: {check.objects} objects; {'all found, no false positive' if check.complete else 'NOT complete'}"]
    lines += [f"  missed by {model}: {objects[i]['kind']} at {objects[i]['box']}" for model, i in check.missed]
    lines += [f"  false positive: {d['label']} ({d['model']}) {d['score']:.2f} at {d['box']}" for d in check.false]
    return "\n".join(lines)


def choose(
    detector: Detector, splits: list[Path], threshold: float, export: Path | None, margin: float = MARGIN, top: int = 10
) -> int:
    """Rank the labelled images every model answers completely with a margin around ``threshold``."""
    kinds = kinds_of(detector)
    sure, clean = threshold + margin, threshold - margin
    candidates = []
    for split in splits:
        coco = read_dataset(split)
        for img in coco["images"]:
            path = split / "images" / img["file_name"]
            objects = labelled_objects(coco, img["id"])
            dets = detector.predict_one(path.read_bytes(), RequestOptions(threshold=0.0))["detections"]
            found, loose = check_image(dets, objects, kinds, sure), check_image(dets, objects, kinds, clean)
            # no near tie: what is found at threshold + margin is all that is found at threshold - margin, and
            # what else is reported at threshold - margin is reported at threshold + margin too
            if (
                objects
                and found.found
                and len(loose.false) == len(found.false)
                and len(loose.missed) == len(found.missed)
            ):
                distinct = len({o["kind"] for o in objects})
                models = len({model for model, _, _ in found.found})
                finders = [i for _, i, _ in found.found]
                shared = len({i for i in finders if finders.count(i) > 1})  # objects more than one model found
                key = (models, min(shared, 1), -len(found.false), -len(found.missed), len(set(finders)), distinct)
                candidates.append((key, path, objects, img, found))
    # most models answering, an object several of them found, fewest false, fewest missed, most found, most kinds
    candidates.sort(key=lambda c: c[0], reverse=True)
    complete = sum(c[4].complete for c in candidates)
    print(f"{complete} images answered completely (found at {sure:g}, nothing else at {clean:g}); ranked:")
    for (models, shared, false, missed, n, distinct), path, objects, img, _ in candidates[:top]:
        print(
            f"  {path}: {len(objects)} objects ({distinct} kinds), {n} found by {models} models"
            f"{', one by several' if shared else ''}, {-missed} finds missed, {-false} false, "
            f"{img['width']}x{img['height']}"
        )
    if export and candidates:
        _, path, objects, img, _ = candidates[0]
        export.write_bytes(path.read_bytes())
        labels = {"source": str(path), "width": img["width"], "height": img["height"], "objects": objects}
        export.with_suffix(".json").write_text(json.dumps(labels, indent=1) + "\n")
        print(f"wrote {export} and {export.with_suffix('.json')} (from {path})")
    return 0 if candidates else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, nargs="?")
    p.add_argument("--out", type=Path, help="PNG to write")
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="models file (default: models.yaml)")
    p.add_argument("--threshold", type=float, default=Settings.threshold)
    p.add_argument("--json", type=Path, help="also write the response JSON here")
    p.add_argument("--labels", type=Path, help="the image's labels (default: IMAGE.json where it exists)")
    p.add_argument("--choose", type=Path, nargs="+", metavar="SPLIT", help="rank labelled splits' images instead")
    p.add_argument("--export", type=Path, help="with --choose: copy the first image here, its labels beside it")
    p.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        help="with --choose: finds at threshold + margin, nothing else at threshold - margin",
    )
    args = p.parse_args(argv)
    detector = Detector.from_model_set(args.model_set, Settings(), torch.device("cpu"))
    if args.choose:
        return choose(detector, args.choose, args.threshold, args.export, args.margin)
    if not args.image or not args.out:
        p.error("give an image and --out (or --choose SPLIT ...)")
    body = args.image.read_bytes()
    response = detector.predict_one(body, RequestOptions(threshold=args.threshold))
    annotate(body, {**response, "threshold": args.threshold}).save(args.out)
    if args.json:
        args.json.write_text(json.dumps(response, indent=2) + "\n")
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{d['label']} ({d['model']}) {d['score']:.2f}" for d in response["detections"])
    )
    labels = args.labels or args.image.with_suffix(".json")
    if labels.exists():
        objects = json.loads(labels.read_text())["objects"]
        check = check_image(response["detections"], objects, kinds_of(detector), args.threshold)
        print(report(check, objects))  # an answer with misses or false positives is still drawn: exit 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
