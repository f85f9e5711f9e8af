#!/usr/bin/env python
"""The training recipe (training.yaml) for a model set (models.yaml): data, training, evaluation.

    python scripts/recipe.py dataset        # every model's train/val splits (make dataset)
    python scripts/recipe.py train          # train in the recipe's order, copy into weights/ (make train)
    python scripts/recipe.py train --only NAME[,NAME]   # some of them (make train ONLY=NAME)
    python scripts/recipe.py eval [--optimization NAME]   # mAP of each model on its val split (make eval)
    python scripts/recipe.py eval --seed 1  # ... on a val split drawn with another seed (DATA/seed-1/NAME/val)
    python scripts/recipe.py ablate --ablation FILE.yaml  # short runs of one model, one change each

Training resumes where it stopped: run the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from paths import MODEL_SET, PHOTOS, RECIPE, ROOT
from tqdm import tqdm

from detlab import build
from detlab.bench import environment
from detlab.evaluation import evaluate
from detlab.recipe import MIXED, ablate, datasets, mixed_view, read_recipe, train_all, train_config
from multidet.config import ConfigError, Settings
from multidet.modelset import read_model_set
from multidet.optimizations import SERVABLE, build_optimization
from multidet.pipeline import Detector


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("dataset", "train", "eval", "ablate"))
    p.add_argument("--ablation", type=Path, help="ablate: model, steps, base and variants (YAML)")
    p.add_argument("--model-set", type=Path, default=MODEL_SET)
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--splits", default="train,val", help="dataset: which splits (e.g. val)")
    p.add_argument("--only", help="train: these models of the recipe (comma-separated; the others keep their weights)")
    p.add_argument("--val-count", type=int, help="dataset: val images per model (default: the recipe's)")
    p.add_argument("--optimization", default="baseline", choices=SERVABLE, help="eval: the path to score")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "eval", help="eval: where the JSON goes")
    p.add_argument(
        "--seed",
        type=int,
        help="dataset/eval: val splits drawn with this seed instead of the recipe's, in DATA/seed-N/ "
        "(made first where missing): are the val figures an artefact of one draw?",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model_set = read_model_set(args.model_set)
        recipe = read_recipe(args.recipe, model_set, root=ROOT)
        if args.val_count:
            recipe = dataclasses.replace(recipe, val_count=args.val_count)
        tag = ""  # eval's JSON names: NAME.OPT.json, NAME.OPT.seed-N.json for another draw
        if args.seed is not None and args.seed != recipe.seed:
            tag = f".seed-{args.seed}"
            if args.step not in ("dataset", "eval"):
                raise ValueError("--seed is for dataset and eval (the recipe's seed makes the training data)")
            recipe = dataclasses.replace(recipe, seed=args.seed, data=recipe.data / f"seed-{args.seed}")
            if args.step == "eval":
                datasets(recipe, model_set, PHOTOS, say=lambda line: print(line, flush=True), splits=("val",))
        if args.step == "dataset":
            splits = tuple(s.strip() for s in args.splits.split(","))
            datasets(recipe, model_set, PHOTOS, say=lambda line: print(line, flush=True), splits=splits)
        elif args.step == "train":
            datasets(recipe, model_set, PHOTOS, say=lambda line: print(line, flush=True))
            only = tuple(n.strip() for n in args.only.split(",")) if args.only else None
            train_all(recipe, model_set, progress=Progress(), say=lambda line: tqdm.write(line), only=only)
            print(f"trained checkpoints beside {model_set.source}'s weights (commit them to ship them)")
        elif args.step == "ablate":
            if args.ablation is None:
                raise ValueError("ablate needs --ablation FILE.yaml")
            run_ablation(recipe, model_set, args.ablation)
        else:
            evaluate_all(recipe, model_set, args.optimization, args.out, tag)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def evaluate_all(recipe, model_set, optimization: str, out: Path, tag: str = "") -> None:
    for r in recipe.models:
        settings = Settings(optimization=optimization, models=(r.name,))
        artifacts = out / "artifacts" / r.name
        if optimization != "baseline":  # its build step, as `make mar` runs it
            base = Detector.from_model_set(model_set, Settings(models=(r.name,)), "cpu")
            build_optimization(optimization, base.models, artifacts, build.context(photos=PHOTOS))
        detector = Detector.from_model_set(model_set, settings, "cpu", artifacts)
        with tqdm(desc=f"eval {r.name} {optimization}", unit="img") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = evaluate(detector, recipe.dataset(r.name, "val"), r.name, progress=progress)
        summary = {**result.summary(), "data": str(recipe.dataset(r.name, "val")), "seed": recipe.seed}
        if (recipe.dataset(MIXED, "val") / "annotations.json").exists():
            # among the other models' kinds too: what it finds of its own, and what else it names
            mixed = evaluate(detector, mixed_view(recipe, model_set, r.name), r.name).summary()
            summary["mixed"] = {k: v for k, v in mixed.items() if k not in ("model", "optimization")}
        print(json.dumps(summary), flush=True)
        weakest = sorted(result.per_class.items(), key=lambda kv: kv[1][0])[:5]
        print("  weakest classes (AP@0.5): " + ", ".join(f"{k} {v[0]:.3f}" for k, v in weakest), flush=True)
        summary["classes"] = {k: [round(v[0], 4), round(v[1], 4)] for k, v in result.per_class.items()}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{r.name}.{optimization}{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_ablation(recipe, model_set, path: Path) -> None:
    """Short runs of one model from the same start, one change each; JSON + a markdown table."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    overrides = dict(spec.get("base") or {})
    if overrides.get("init"):  # a models file, relative to the checkout
        overrides["init"] = ROOT / overrides["init"]
    base = train_config(recipe, model_set, spec["model"], recipe_fields=False, **overrides)
    out = ROOT / "outputs" / "train_ablation" / path.stem
    rows = ablate(
        base, spec["variants"], out, progress=Progress(), say=lambda line: tqdm.write(line), wall_s=spec.get("wall_s")
    )
    record = {
        "ablation": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "model": spec["model"],
        "base": spec.get("base") or {},
        "wall_s": spec.get("wall_s"),
        "environment": environment(),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{spec['model']}, {rows[0].steps if rows else 0} steps, mAP on {base.final_images or 'all'} val images:")
    print("| variant | change | mAP@0.5 | mAP@[.5:.95] | loss (last 20) | wall |\n|---|---|---|---|---|---|")
    for r in rows:
        change = ", ".join(f"{k}={v}" for k, v in r.changes.items()) or "-"
        loss = "-" if r.loss_last is None else f"{r.loss_last:.3f}"
        if r.before_bn_recalibration:
            change += f" (before: mAP@0.5 {r.before_bn_recalibration['map50']:.3f})"
        print(f"| {r.variant} | {change} | {r.map50:.3f} | {r.map:.3f} | {loss} | {r.wall_s:.0f} s |")
    print(f"written {out / 'results.json'}")


class Progress:
    """A tqdm bar per model's run (made at its first step, so a resumed run's ETA counts from there)."""

    def __init__(self):
        self.bar = None
        self.model = None

    def __call__(self, row: dict) -> None:
        if "final" in row:
            f = row["final"]
            tqdm.write(f"final val ({f['images']} images): mAP@0.5 {f['map50']:.3f}  mAP@[.5:.95] {f['map']:.3f}")
            if self.bar:
                self.bar.close()
                self.bar = None
            return
        if self.bar is None:
            self.bar = tqdm(total=row["of"], initial=row["step"] - 1, unit="step", dynamic_ncols=True, desc="train")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}")
        if row.get("val"):
            v = row["val"]
            tqdm.write(f"step {row['step']}: val mAP@0.5 {v['map50']:.3f}  mAP@[.5:.95] {v['map']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
