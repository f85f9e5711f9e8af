"""The training recipe as data (``training.yaml`` beside the model set): per model, its synthetic data
(counts, class ids), where it starts (scratch or another model's run) and how long it trains.

``read_recipe`` checks the file against the model set (every recipe model is in the set; ``init``
names an earlier model); ``datasets``, ``train_all`` and ``evaluate_all`` are what ``make dataset``,
``make train`` and ``make eval`` run (``scripts/recipe.py``). Nothing here knows a model's name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .config import ConfigError
from .modelset import ModelSet

STEP_KEYS = ("steps", "batch_size", "lr", "weight_decay", "image_size", "eval_every", "eval_images", "ema_decay")


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    train_count: int
    class_ids: tuple[int, ...] | None = None  # the ids its data draws (None: every named class)
    init: str | None = None  # a model trained before it in the recipe (None: from scratch)
    train: dict = field(default_factory=dict)  # TrainConfig fields: steps, image_size, lr, ...


@dataclass(frozen=True)
class Recipe:
    models: tuple[ModelRecipe, ...]
    data: Path
    runs: Path
    seed: int = 0
    val_count: int = 200
    source: Path | None = None

    def dataset(self, name: str, split: str) -> Path:
        return self.data / name / split

    def run(self, name: str) -> Path:
        return self.runs / name


def read_recipe(path: Path, model_set: ModelSet, root: Path | None = None) -> Recipe:
    """Read ``path``; relative folders are relative to ``root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise ConfigError(f"{path}: expected data, runs, seed, val_count and a list of models")
    from .training import TrainConfig

    train_keys = {f.name for f in fields(TrainConfig)} & set(STEP_KEYS)
    models, seen = [], []
    for i, m in enumerate(raw["models"]):
        where = f"{path}: models[{i}]"
        if not isinstance(m, dict) or m.get("name") not in model_set.names:
            raise ConfigError(f"{where}: name must be a model of {model_set.source} {list(model_set.names)}")
        unknown = set(m) - {"name", "train_count", "class_ids", "init"} - train_keys
        if unknown:
            raise ConfigError(f"{where} ({m['name']}): unknown key(s) {sorted(unknown)}")
        if m.get("init") is not None and m["init"] not in seen:
            raise ConfigError(f"{where} ({m['name']}): init {m['init']!r} must be a model trained before it")
        if not isinstance(m.get("train_count"), int) or m["train_count"] < 1:
            raise ConfigError(f"{where} ({m['name']}): train_count must be a positive integer")
        models.append(
            ModelRecipe(
                name=m["name"],
                train_count=m["train_count"],
                class_ids=tuple(m["class_ids"]) if m.get("class_ids") else None,
                init=m.get("init"),
                train={k: m[k] for k in train_keys if k in m},
            )
        )
        seen.append(m["name"])
    return Recipe(
        tuple(models),
        data=root / raw.get("data", "data"),
        runs=root / raw.get("runs", "outputs/train"),
        seed=int(raw.get("seed", 0)),
        val_count=int(raw.get("val_count", 200)),
        source=path,
    )


def data_spec(recipe: Recipe, model_set: ModelSet, name: str):
    from .synthetic import DataSpec

    r = next(m for m in recipe.models if m.name == name)
    return DataSpec(name, model_set[name].class_names, r.class_ids)


def datasets(
    recipe: Recipe,
    model_set: ModelSet,
    photos: Path,
    say: Callable[[str], None] = print,
    splits: tuple[str, ...] = ("train", "val"),
) -> list[Path]:
    """Every model's train and val split (skipped when already written with the same arguments)."""
    from .synthetic import make_dataset

    written = []
    for r in recipe.models:
        for split, count in (("train", r.train_count), ("val", recipe.val_count)):
            if split not in splits:
                continue
            out = recipe.dataset(r.name, split)
            ann = out / "annotations.json"
            info = json.loads(ann.read_text()).get("info", {}) if ann.exists() else {}
            if (info.get("count"), info.get("seed"), info.get("model")) == (count, recipe.seed, r.name):
                say(f"{out}: up to date")
                continue
            say(f"{out}: making {count} images...")
            make_dataset(data_spec(recipe, model_set, r.name), split, count, recipe.seed, out, photos)
            written.append(out)
    return written


def train_all(recipe: Recipe, model_set: ModelSet, progress=None, say: Callable[[str], None] = print) -> list:
    """Train every model in the recipe's order (each resumable), then copy each result beside the set's
    weights (``<weights stem>.safetensors`` + ``.json``). Returns the TrainResults."""
    from .training import TrainConfig, train

    results = []
    for r in recipe.models:
        entry = model_set[r.name]
        cfg = TrainConfig(
            model=r.name,
            class_names=model_set[r.name].class_names,
            architecture=entry.architecture,
            train_dir=recipe.dataset(r.name, "train"),
            val_dir=recipe.dataset(r.name, "val"),
            out_dir=recipe.run(r.name),
            init=recipe.run(r.init) if r.init else None,
            init_model=r.init,
            seed=recipe.seed,
            **r.train,
        )
        say(f"training {r.name} ({entry.architecture}, {len(cfg.class_names)} classes, {cfg.steps} steps)")
        result = train(cfg, progress)
        target = Path(entry.weights).with_suffix(".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(result.checkpoint_dir / result.meta.weights_file, target)
        shutil.copy2(result.checkpoint_dir / f"{r.name}.json", target.with_suffix(".json"))
        say(f"{r.name}: copied to {target} (+ .json)")
        results.append(result)
    return results
