#!/usr/bin/env python
"""Draw the service's detections on an image: boxes and labels, one colour per model (by its place in
the set), as a PNG.

    python scripts/annotate.py docs/example.jpg --out docs/example_detections.png [--model-set my.yaml]

Runs the same data path as the server (multidet.pipeline.Detector) on a model set (default: models.yaml).
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

from multidet.config import Settings
from multidet.pipeline import Detector, RequestOptions

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
    # draw the lowest scores first so the strongest labels end on top
    for d in sorted(response["detections"], key=lambda d: d["score"]):
        colour = colours[d["model"]]
        x1, y1, x2, y2 = d["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{d['label']} {d['score']:.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (ty2 - ty1) - 2 if y1 - (ty2 - ty1) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (tx2 - tx1) + 4, ty + (ty2 - ty1) + 2], fill=(0, 0, 0))
        draw.text((x1 + 2, ty), text, fill=colour, font=font)
    legend = "  ".join(f"{m['name']}: {m['count']}" for m in response["models"])
    draw.rectangle([0, img.height - font.size - 6, img.width, img.height], fill=(0, 0, 0))
    draw.text(
        (4, img.height - font.size - 4),
        f"threshold {response.get('threshold', '')} {legend}".strip(),
        fill=(255, 255, 255),
        font=font,
    )
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--model-set", type=Path, default=MODEL_SET, help="models file (default: models.yaml)")
    p.add_argument("--threshold", type=float, default=Settings.threshold)
    p.add_argument("--json", type=Path, help="also write the response JSON here")
    args = p.parse_args(argv)
    body = args.image.read_bytes()
    detector = Detector.from_model_set(args.model_set, Settings(), torch.device("cpu"))
    response = detector.predict_one(body, RequestOptions(threshold=args.threshold))
    annotate(body, {**response, "threshold": args.threshold}).save(args.out)
    if args.json:
        args.json.write_text(json.dumps(response, indent=2) + "\n")
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{d['label']} ({d['model']}) {d['score']:.2f}" for d in response["detections"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
