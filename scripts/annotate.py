#!/usr/bin/env python
"""Draw the service's detections on an image: boxes and labels, one colour per model, as a PNG.

    python scripts/annotate.py docs/example.jpg --out docs/example_detections.png

Runs the same data path as the server (multidet.pipeline.Detector) on the trained weights/.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from multidet.config import Settings
from multidet.pipeline import Detector, RequestOptions

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {
    "efficientdet_d0_coco": (255, 255, 255),
    "efficientdet_d0_aquarium": (0, 230, 255),
    "efficientdet_d0_vehicles": (255, 60, 200),
}


def annotate(image_bytes: bytes, response: dict) -> Image.Image:
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(11, img.width // 60))
    # draw the lowest scores first so the strongest labels end on top
    for d in sorted(response["detections"], key=lambda d: d["score"]):
        colour = COLOURS.get(d["model"], (255, 255, 0))
        x1, y1, x2, y2 = d["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{d['label']} {d['score']:.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (ty2 - ty1) - 2 if y1 - (ty2 - ty1) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (tx2 - tx1) + 4, ty + (ty2 - ty1) + 2], fill=(0, 0, 0))
        draw.text((x1 + 2, ty), text, fill=colour, font=font)
    legend = "  ".join(f"{m['name'].removeprefix('efficientdet_d0_')}: {m['count']}" for m in response["models"])
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
    p.add_argument("--checkpoints", type=Path, default=ROOT / "weights")
    p.add_argument("--threshold", type=float, default=Settings.threshold)
    p.add_argument("--json", type=Path, help="also write the response JSON here")
    args = p.parse_args(argv)
    body = args.image.read_bytes()
    detector = Detector.from_checkpoints(args.checkpoints, Settings(), torch.device("cpu"))
    response = detector.predict_one(body, RequestOptions(threshold=args.threshold))
    annotate(body, {**response, "threshold": args.threshold}).save(args.out)
    if args.json:
        args.json.write_text(json.dumps(response, indent=2) + "\n")
    print(
        f"wrote {args.out}: "
        + ", ".join(
            f"{d['label']} ({d['model'].removeprefix('efficientdet_d0_')}) {d['score']:.2f}"
            for d in response["detections"]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
