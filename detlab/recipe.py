"""The training recipe as data (``training.yaml`` beside the model set): per model, its synthetic data
(counts, class ids), where it starts (scratch, another model's run, or its own current weights) and
how long it trains.

``read_recipe`` checks the file against the model set (every recipe model is in the set; ``init``
names an earlier model, or the model itself); ``datasets``, ``train_all`` and ``evaluate_all`` are
what ``make dataset``, ``make train`` and ``make eval`` run (``scripts/recipe.py``). Nothing here
knows a model's name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from multidet.config import ConfigError
from multidet.modelset import ModelSet

STEP_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "decay_norm_and_bias",
    "warmup_pct",
    "final_lr_ratio",
    "image_size",
    "scale",
    "drop_path",
    "backbone_init",
    "bn_recalibrate",
    "eval_every",
    "eval_images",
    "final_images",
    "ema_decay",
    "freeze",
)


OTHERS_FRACTION = "others_fraction"  # a model's or a phase's recipe key beside TrainConfig's: 0..1 (default 1)


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    train_count: int
    class_ids: tuple[int, ...] | None = None  # the ids its data draws (None: every named class)
    # a model trained before it in the recipe (its class layer sliced by kind), or its own name: continue
    # from its current weights in the model set (None: from scratch)
    init: str | None = None
    train: dict = field(default_factory=dict)  # TrainConfig fields: steps, image_size, lr, ...
    # runs one after another, each from the last one's weights (TrainConfig fields over ``train``);
    # empty: one run of ``train``
    phases: tuple[dict, ...] = ()
    # other models whose train splits it trains on too, their class ids mapped to its own by object kind
    also_train_on: tuple[str, ...] = ()

    # per run: the share of each ``also_train_on`` split's images it trains on beside its own (0 without them)
    others_fractions: tuple[float, ...] = ()

    def runs(self) -> tuple[dict, ...]:
        return tuple({**self.train, **p} for p in self.phases) or (dict(self.train),)

    def others_fraction(self, k: int) -> float:
        return self.others_fractions[k] if self.others_fractions else 0.0


@dataclass(frozen=True)
class Recipe:
    models: tuple[ModelRecipe, ...]
    data: Path
    runs: Path
    seed: int = 0
    val_count: int = 200
    source: Path | None = None

    def model(self, name: str) -> ModelRecipe:
        return next(m for m in self.models if m.name == name)

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
        unknown = (
            set(m)
            - {"name", "train_count", "class_ids", "init", "phases", "also_train_on", OTHERS_FRACTION}
            - train_keys
        )
        if unknown:
            raise ConfigError(f"{where} ({m['name']}): unknown key(s) {sorted(unknown)}")
        if m.get("init") is not None and m["init"] not in seen + [m["name"]]:
            raise ConfigError(
                f"{where} ({m['name']}): init {m['init']!r} must be a model trained before it, or its own name "
                "(continue from its weights in the model set)"
            )
        phases = m.get("phases") or []
        if not isinstance(phases, list) or any(
            not isinstance(p, dict) or set(p) - train_keys - {OTHERS_FRACTION} for p in phases
        ):
            raise ConfigError(f"{where} ({m['name']}): phases must be a list of {{{', '.join(sorted(train_keys))}}}")
        others = m.get("also_train_on") or []
        if not isinstance(others, list) or any(o not in model_set.names or o == m["name"] for o in others):
            raise ConfigError(f"{where} ({m['name']}): also_train_on must list other models of the set")
        given = [p[OTHERS_FRACTION] for p in [m, *phases] if OTHERS_FRACTION in p]
        if any(not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in given) or (given and not others):
            raise ConfigError(f"{where} ({m['name']}): {OTHERS_FRACTION} is a number in 0..1, with also_train_on")
        fraction = float(m.get(OTHERS_FRACTION, 1.0)) if others else 0.0
        fractions = tuple(float(p.get(OTHERS_FRACTION, fraction)) if others else 0.0 for p in phases) or (fraction,)
        if not isinstance(m.get("train_count"), int) or m["train_count"] < 1:
            raise ConfigError(f"{where} ({m['name']}): train_count must be a positive integer")
        models.append(
            ModelRecipe(
                name=m["name"],
                train_count=m["train_count"],
                class_ids=tuple(m["class_ids"]) if m.get("class_ids") else None,
                init=m.get("init"),
                train={k: m[k] for k in train_keys if k in m},
                phases=tuple({k: v for k, v in p.items() if k != OTHERS_FRACTION} for p in phases),
                also_train_on=tuple(others),
                others_fractions=fractions,
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

    r = recipe.model(name)
    return DataSpec(
        name, model_set[name].class_names, class_ids_of(model_set, r), object_kinds(recipe, model_set)[name]
    )


def class_ids_of(model_set: ModelSet, r: ModelRecipe) -> tuple[int, ...]:
    from .synthetic import DataSpec, class_ids

    return class_ids(DataSpec(r.name, model_set[r.name].class_names, r.class_ids))


def object_kinds(recipe: Recipe, model_set: ModelSet) -> dict[str, tuple[str, ...]]:
    """Each recipe model's object kinds (names, parallel to the class ids its data draws): a class whose name an
    earlier class had (this model's or a model before it in the recipe; case aside) is that class's kind, so label
    sets overlap where their names do (a "car" of two models is one kind); any other class is the next kind not
    yet given (``synthetic.KINDS``' order)."""
    from .synthetic import KINDS

    given: dict[str, str] = {}
    free = iter(KINDS)
    out = {}
    for r in recipe.models:
        names = model_set[r.name].class_names
        own = []
        for c in class_ids_of(model_set, r):
            key = names[c - 1].strip().lower()
            if key not in given:
                kind = next(free, None)
                if kind is None:
                    raise ConfigError(
                        f"{recipe.source}: the recipe's models name more distinct classes than the generator's "
                        f"{len(KINDS)} object kinds (at {r.name}: {names[c - 1]!r})"
                    )
                given[key] = kind.name
            own.append(given[key])
        out[r.name] = tuple(own)
    return out


MIXED = "mixed"  # <data>/mixed/val: images holding every model's kinds, labelled by kind (the README's example)


def mixed_spec(recipe: Recipe, model_set: ModelSet):
    """The data of the set as a whole: every kind of every recipe model, each a class named by its kind (the
    labels of ``annotate.py --choose``, which finds each model's own among them)."""
    from .synthetic import KINDS, DataSpec

    given = {k for kinds in object_kinds(recipe, model_set).values() for k in kinds}
    names = tuple(k.name for k in KINDS if k.name in given)
    return DataSpec(MIXED, names, tuple(range(1, len(names) + 1)), names)


def mixed_view(recipe: Recipe, model_set: ModelSet, name: str) -> Path:
    """The set's mixed val split as ``name`` sees it: its own kinds labelled with its class ids, every other
    model's unlabelled (a detection of one is a false positive): ``<data>/mixed/val_<name>`` (images linked)."""
    from .synthetic import kind_table

    mixed = recipe.dataset(MIXED, "val")
    coco = json.loads((mixed / "annotations.json").read_text())
    own = {k.name: c for c, k in kind_table(data_spec(recipe, model_set, name)).items()}
    by_kind = {c["id"]: c["supercategory"] for c in coco["categories"]}
    out = recipe.dataset(MIXED, f"val_{name}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        (out / "images").symlink_to((mixed / "images").resolve())
    annotations = [
        {**a, "category_id": own[by_kind[a["category_id"]]]}
        for a in coco["annotations"]
        if by_kind[a["category_id"]] in own
    ]
    names = model_set[name].class_names
    categories = [{"id": c, "name": names[c - 1], "supercategory": k} for k, c in own.items()]
    view = {**coco, "annotations": annotations, "categories": categories}
    (out / "annotations.json").write_text(json.dumps(view))
    return out


def datasets(
    recipe: Recipe,
    model_set: ModelSet,
    photos: Path,
    say: Callable[[str], None] = print,
    splits: tuple[str, ...] = ("train", "val"),
) -> list[Path]:
    """Every model's train and val split, and a val split of the set's kinds together (``MIXED``); each skipped
    when already written with the same arguments."""
    from .synthetic import make_dataset

    if MIXED in model_set.names:
        raise ConfigError(f"{model_set.source}: a model named {MIXED!r} would share its data folder with the set's")
    written = []
    wanted = [
        (data_spec(recipe, model_set, r.name), split, count)
        for r in recipe.models
        for split, count in (("train", r.train_count), ("val", recipe.val_count))
    ]
    wanted.append((mixed_spec(recipe, model_set), "val", recipe.val_count))
    for spec, split, count in wanted:
        if split not in splits:
            continue
        out = recipe.dataset(spec.name, split)
        ann = out / "annotations.json"
        coco = json.loads(ann.read_text()) if ann.exists() else {}
        info, kinds = coco.get("info", {}), [c.get("supercategory") for c in coco.get("categories", [])]
        if (info.get("count"), info.get("seed"), info.get("model"), kinds) == (
            count,
            recipe.seed,
            spec.name,
            list(spec.kinds),
        ):
            say(f"{out}: up to date")
            continue
        say(f"{out}: making {count} images...")
        make_dataset(spec, split, count, recipe.seed, out, photos)
        written.append(out)
    return written


def train_all(
    recipe: Recipe,
    model_set: ModelSet,
    progress=None,
    say: Callable[[str], None] = print,
    only: tuple[str, ...] | None = None,
) -> list:
    """Train every model in the recipe's order (``only``: these of them; the others' weights stay as they are),
    phase after phase (each resumable; a finished phase is kept), then copy each model's last result beside
    the set's weights (``<weights stem>.safetensors`` + ``.json``). Returns the last TrainResult of each model."""
    from .training import train

    unknown = set(only or ()) - {r.name for r in recipe.models}
    if unknown:
        raise ConfigError(f"{sorted(unknown)} not in the recipe {recipe.source}")
    results = []
    for r in recipe.models:
        if only is not None and r.name not in only:
            continue
        entry = model_set[r.name]
        result = None
        for k, cfg in enumerate(phase_configs(recipe, model_set, r.name)):
            if r.others_fraction(k) > 0:
                cfg = replace(cfg, train_dir=shared_dataset(recipe, model_set, r.name, r.others_fraction(k)))
            what = f"{r.name} phase {k + 1}/{len(r.runs())}" if len(r.runs()) > 1 else r.name
            say(
                f"training {what} ({entry.architecture}, {len(cfg.class_names)} classes, "
                f"{cfg.steps} steps at {cfg.image_size} px)"
            )
            result = train(cfg, progress)
        target = Path(entry.weights).with_suffix(".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(result.checkpoint_dir / result.meta.weights_file, target)
        shutil.copy2(result.checkpoint_dir / f"{r.name}.json", target.with_suffix(".json"))
        say(f"{r.name}: copied to {target} (+ .json)")
        results.append(result)
    return results


def phase_configs(recipe: Recipe, model_set: ModelSet, name: str) -> list:
    """The TrainConfig of each of ``name``'s phases: the first starts where the recipe says, each next
    one from the last one's result (``<run>/phase<k>``; one phase: ``<run>``)."""
    r = recipe.model(name)
    runs = r.runs()
    configs = []
    for k, overrides in enumerate(runs):
        out = phase_run(recipe, name, k)
        cfg = train_config(recipe, model_set, name, out_dir=out, **overrides)
        if k:
            cfg = replace(cfg, init=configs[-1].out_dir, init_model=name, head_map=None, backbone_init=None)
        configs.append(cfg)
    return configs


def phase_run(recipe: Recipe, name: str, k: int) -> Path:
    """Where phase ``k`` (0-based) of ``name`` runs: ``<run>/phase<k+1>``, or ``<run>`` for one phase."""
    r = recipe.model(name)
    return recipe.run(name) / f"phase{k + 1}" if len(r.runs()) > 1 else recipe.run(name)


def shared_dataset(recipe: Recipe, model_set: ModelSet, name: str, fraction: float = 1.0) -> Path:
    """``name``'s train split joined with the train splits of its ``also_train_on`` models (the first
    ``fraction`` of each one's images), their class ids mapped to ``name``'s by object kind:
    ``<data>/<name>/train_shared`` (``train_shared_<fraction>`` for a part; images linked, not copied)."""
    r = recipe.model(name)
    out = recipe.dataset(name, "train_shared" if fraction >= 1 else f"train_shared_{fraction:g}")
    own = json.loads((recipe.dataset(name, "train") / "annotations.json").read_text())
    sources = [(name, own, None)] + [
        (
            o,
            json.loads((recipe.dataset(o, "train") / "annotations.json").read_text()),
            head_map(recipe, model_set, o, name),
        )
        for o in r.also_train_on
    ]
    stamp = {
        "sources": [
            [src, ann.get("info", {}).get("count"), ann.get("info", {}).get("seed")] for src, ann, _ in sources
        ],
        "fraction": fraction,
    }
    ann_path = out / "annotations.json"
    if ann_path.exists() and json.loads(ann_path.read_text()).get("info", {}).get("shared") == stamp:
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for src, ann, mapping in sources:
        ids = {}
        kept = ann["images"] if mapping is None else ann["images"][: round(fraction * len(ann["images"]))]
        for img in kept:
            new_id = len(images) + 1
            ids[img["id"]] = new_id
            file_name = f"{src}__{img['file_name']}"
            link = out / "images" / file_name
            if not link.exists():
                link.symlink_to((recipe.dataset(src, "train") / "images" / img["file_name"]).resolve())
            images.append({**img, "id": new_id, "file_name": file_name})
        for a in ann["annotations"]:
            cat = a["category_id"] if mapping is None else mapping.get(a["category_id"])
            if cat is None or a["image_id"] not in ids:
                continue  # a kind the first model does not have, or an image left out (fraction)
            annotations.append({**a, "id": len(annotations) + 1, "image_id": ids[a["image_id"]], "category_id": cat})
    merged = {
        "info": {**own.get("info", {}), "shared": stamp},
        "images": images,
        "annotations": annotations,
        "categories": own["categories"],
    }
    ann_path.write_text(json.dumps(merged))
    return out


def train_config(recipe: Recipe, model_set: ModelSet, name: str, recipe_fields: bool = True, **overrides):
    """The ``TrainConfig`` of ``name``'s run in ``recipe`` (``overrides``: any of its fields). Without
    ``recipe_fields``, only its data, start and paths come from the recipe, every training field from
    TrainConfig's defaults (an ablation's base then does not change when the recipe does)."""
    from .training import TrainConfig

    r = recipe.model(name)
    entry = model_set[name]
    fields_ = dict(
        model=name,
        class_names=entry.class_names,
        architecture=entry.architecture,
        train_dir=recipe.dataset(name, "train"),
        val_dir=recipe.dataset(name, "val"),
        out_dir=recipe.run(name),
        # another model's start is that model's weights in the set (``train_all`` copies each result there before
        # the next model trains, so a model trained alone starts from the shipped ones)
        init=model_set.source if r.init else None,
        init_model=r.init,
        head_map=head_map(recipe, model_set, name, r.init) if r.init and r.init != name else None,
        seed=recipe.seed,
    )
    if recipe_fields:
        fields_.update(r.train)
    fields_.update(overrides)
    return TrainConfig(**fields_)


def head_map(recipe: Recipe, model_set: ModelSet, name: str, source: str) -> dict[int, int]:
    """Class id of ``name`` -> class id of ``source`` for the same object kind (``object_kinds``); a class of a
    kind ``source`` does not have is left out."""
    from .synthetic import kind_table

    theirs = {k: c for c, k in kind_table(data_spec(recipe, model_set, source)).items()}
    return {c: theirs[k] for c, k in kind_table(data_spec(recipe, model_set, name)).items() if k in theirs}


@dataclass(frozen=True)
class AblationRow:
    variant: str
    changes: dict
    steps: int
    map50: float
    map: float
    loss_last: float | None
    wall_s: float
    start: str
    before_bn_recalibration: dict | None = None


def ablate(
    base,
    variants: dict[str, dict],
    out: Path,
    progress=None,
    say: Callable[[str], None] = print,
    wall_s: float | None = None,
    probe_steps: int = 20,
):
    """Train ``base`` (a TrainConfig) once per variant (its field overrides), each in ``out/<variant>``
    (resumable), same seed and data; returns one AblationRow per variant (mAP on the final images).

    ``wall_s``: every variant gets about this much training time instead of ``steps`` (choices that cost less
    a step, e.g. a frozen part, take more steps): each first runs ``probe_steps`` steps (``out/<variant>/probe``,
    no evaluation) whose seconds a step set its step count."""
    import dataclasses

    from .training import train

    rows = []
    for name, changes in variants.items():
        cfg = dataclasses.replace(base, out_dir=Path(out) / name, **(changes or {}))
        if wall_s:
            probe = dataclasses.replace(
                cfg,
                out_dir=cfg.out_dir / "probe",
                steps=probe_steps,
                warmup_pct=0.25,
                val_dir=None,
                bn_recalibrate=0,
                eval_every=0,
            )
            walls = [row["wall_s"] for row in train(probe).history]
            half = len(walls) // 2  # the first steps run slower (allocator, data workers starting): left out
            per_step = (walls[-1] - walls[half - 1]) / (len(walls) - half)
            cfg = dataclasses.replace(cfg, steps=max(1, round(wall_s / per_step)))
            say(f"{name}: {per_step:.2f} s a step -> {cfg.steps} steps in {wall_s:.0f} s")
        say(f"{name}: {changes or 'as the base'} ({cfg.steps} steps)")
        t = train(cfg, progress).meta.training
        rows.append(
            AblationRow(
                name,
                changes or {},
                t["steps"],
                t["val"]["map50"],
                t["val"]["map"],
                t["loss_last"],
                t["wall_s"],
                t["start"],
                t.get("val_before_bn_recalibration"),
            )
        )
        say(f"{name}: mAP@0.5 {rows[-1].map50:.3f}  mAP@[.5:.95] {rows[-1].map:.3f}  ({t['wall_s']:.0f} s)")
    return rows
