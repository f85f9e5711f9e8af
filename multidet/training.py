"""Fine-tuning: effdet's own training bench on any COCO-format dataset.

``DetBenchTrain`` (focal + box loss) wraps the same ``EfficientDet`` the service runs; anchors are
labelled in the data-loader worker by effdet's ``AnchorLabeler`` and images are augmented by effdet's
training transforms (random horizontal flip, random scale 0.1-2.0 with crop, then letterbox).
AdamW with a one-cycle schedule, an EMA of the weights (timm's ``ModelEmaV3``), bf16 autocast where
the CPU has native bf16 (AMX / AVX-512 BF16) or on CUDA, periodic COCO evaluation of the EMA weights
through the whole serving path (``evaluation.evaluate`` at the service's 512 px), and a resumable
state file written every ``save_every`` steps.

Any effdet architecture and label set (``TrainConfig.architecture``, ``class_names``). Start from
scratch, or from a model of a model set (``init``: a models file, or a folder holding ``models.yaml``
such as another run's output): with another class count its last class layer
(``class_net.predict``) is re-initialised and everything else is kept, as when fine-tuning a COCO
detector to a new label set. Training may run at a smaller input size than the service (the network
is fully convolutional; anchors follow the size): fast, then a short pass at 512 px adapts it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from effdet import DetBenchTrain
from effdet.anchors import AnchorLabeler, Anchors
from effdet.data import DetectionDatset, resolve_input_config
from effdet.data.loader import DetectionFastCollate
from effdet.data.parsers.parser_coco import CocoParser
from effdet.data.parsers.parser_config import CocoParserCfg
from effdet.data.transforms import transforms_coco_train

from .checkpoints import (
    CLASS_HEAD,
    CheckpointMeta,
    LoadedModel,
    build_network,
    load_entry,
    save_checkpoint,
    sha256_file,
)
from .config import Settings
from .device import native_bf16
from .modelset import MODELS_FILE, ModelEntry, ModelSet, read_model_set

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str  # the model's name (its checkpoint is <out_dir>/<model>.safetensors)
    class_names: tuple[str, ...]  # its classes, by 1-based class id (the dataset's category ids)
    train_dir: Path  # COCO-format dataset: images/ + annotations.json
    architecture: str = "efficientdet_d0"  # any effdet config name
    val_dir: Path | None = None  # evaluated every eval_every steps and at the end
    out_dir: Path = Path("outputs/train")  # the trained checkpoint + the resumable state
    init: Path | None = None  # a model set (file, or folder with models.yaml) to start from (None: scratch)
    init_model: str | None = None  # which model of ``init`` (default: ``model``)
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_pct: float = 0.1
    image_size: int = 256
    seed: int = 0
    ema_decay: float = 0.999  # 0: no EMA
    amp: str = "auto"  # auto (bf16 where native) | bf16 | off
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 1
    eval_every: int = 250
    eval_images: int = 64  # images of val_dir per periodic evaluation (final: all)
    save_every: int = 50

    def to_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["class_names"] = list(self.class_names)
        return out


@dataclass
class TrainResult:
    checkpoint_dir: Path
    meta: CheckpointMeta
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(amp: str, device: torch.device) -> bool:
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and native_bf16()


def initial_network(cfg: TrainConfig):
    """A fresh network for ``cfg``'s model; with ``cfg.init`` every weight but a mismatched class layer
    is taken from that model. Returns (network, description of the start)."""
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.architecture, len(cfg.class_names), cfg.image_size)
    if cfg.init is None:
        return net, "scratch"
    source = cfg.init_model or cfg.model
    entry = read_model_set(cfg.init)[source]
    if entry.architecture != cfg.architecture:
        raise ValueError(f"{source} is {entry.architecture}; this model is {cfg.architecture}")
    state = load_entry(entry).net.state_dict()
    own = net.state_dict()
    reset = [k for k in own if k.startswith(CLASS_HEAD.rsplit(".", 1)[0]) and own[k].shape != state[k].shape]
    for k in reset:
        state[k] = own[k]  # effdet's prior-probability init of the class layer
    net.load_state_dict(state, strict=True)
    digest = sha256_file(entry.weights)[:12]
    return net, f"{source}@{digest}" + (" (class layer re-initialised)" if reset else "")


class _Batches:
    """Endless (images uint8 NCHW, anchor-labelled target) batches, reshuffled every epoch."""

    def __init__(self, cfg: TrainConfig, net, num_classes: int):
        input_cfg = resolve_input_config({}, net.config)
        self.mean = torch.tensor([x * 255 for x in input_cfg["mean"]]).view(1, 3, 1, 1)
        self.std = torch.tensor([x * 255 for x in input_cfg["std"]]).view(1, 3, 1, 1)
        ann = Path(cfg.train_dir) / "annotations.json"
        if not ann.exists():
            raise FileNotFoundError(f"{ann} not found: a training dataset is images/ + annotations.json (COCO)")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it indexes
            parser = CocoParser(CocoParserCfg(ann_filename=str(ann)))
        unknown = [c for c in parser.cat_ids if not 1 <= c <= num_classes]
        if unknown:
            raise ValueError(f"{ann}: category ids {unknown} are outside this model's 1..{num_classes}")
        self.dataset = DetectionDatset(Path(cfg.train_dir) / "images", parser=parser)
        self.dataset.transform = transforms_coco_train(
            (cfg.image_size, cfg.image_size),
            interpolation="random",
            use_prefetcher=True,
            fill_color=input_cfg["fill_color"],
            mean=input_cfg["mean"],
            std=input_cfg["std"],
        )
        labeler = AnchorLabeler(Anchors.from_config(net.config), num_classes, match_threshold=0.5)
        self.cfg = cfg
        self.collate = DetectionFastCollate(anchor_labeler=labeler)

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(self, start_step: int) -> Iterator[tuple[torch.Tensor, dict]]:
        epoch = start_step * self.cfg.batch_size // max(len(self.dataset), 1)
        while True:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.cfg.batch_size,
                shuffle=True,
                drop_last=True,
                generator=g,
                num_workers=self.cfg.workers,
                collate_fn=self.collate,
                worker_init_fn=_seed_worker,
                persistent_workers=False,
            )
            yield from loader
            epoch += 1

    def normalise(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        return images.to(device).float().sub_(self.mean.to(device)).div_(self.std.to(device))


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def evaluate_weights(
    state: dict,
    cfg: TrainConfig,
    val_dir: Path,
    device: torch.device,
    limit: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """COCO mAP of ``state`` through the whole serving path (the architecture's letterbox, NMS, original pixels)."""
    from .evaluation import evaluate
    from .pipeline import Detector

    net = build_network(cfg.architecture, len(cfg.class_names))
    net.load_state_dict(state)
    detector = Detector([LoadedModel(cfg.model, tuple(cfg.class_names), net.eval())], Settings(), device)
    return evaluate(detector, val_dir, cfg.model, limit=limit, progress=progress).summary()


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) and write ``cfg.out_dir/<model>.safetensors`` + ``.json``, and
    ``cfg.out_dir/models.yaml``: the result is a one-model set, served or merged into another set as is."""
    if not cfg.class_names:
        raise ValueError("class_names: the model's classes are needed (one per 1-based class id)")
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.amp, device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / f"{cfg.model}.train.pt"

    net, start = initial_network(cfg)
    batches = _Batches(cfg, net, len(cfg.class_names))
    bench = DetBenchTrain(net, create_labeler=False).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup_pct
    )
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=cfg.ema_decay, use_warmup=True)

    step, history, wall = 0, [], 0.0
    if state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        mismatch = {
            k: (saved["config"].get(k), v)
            for k, v in cfg.to_json().items()
            if k in ("model", "architecture", "steps", "batch_size", "lr", "image_size", "seed", "train_dir")
            and saved["config"].get(k) != v
        }
        if mismatch:
            raise ValueError(
                f"{state_path} was written by another run (differs in {mismatch}); "
                "delete it or use another --out to start afresh"
            )
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None and saved.get("ema") is not None:
            ema.module.load_state_dict(saved["ema"])
        step, history, wall = saved["step"], saved["history"], saved["wall_s"]
        start = saved["start"]
        log.info("resumed %s at step %d/%d", state_path, step, cfg.steps)

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "config": cfg.to_json(),
                "step": step,
                "history": history,
                "wall_s": wall,
                "start": start,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.module.state_dict() if ema else None,
            },
            tmp,
        )
        tmp.replace(state_path)

    def weights() -> dict:
        return {k: v.detach().cpu() for k, v in (ema.module if ema else net).state_dict().items()}

    def run_eval(limit: int | None) -> dict | None:
        if cfg.val_dir is None:
            return None
        return evaluate_weights(weights(), cfg, Path(cfg.val_dir), device, limit)

    data = batches.iterate(step)
    t_last = time.perf_counter()
    while step < cfg.steps:
        images, target = next(data)
        x = batches.normalise(images, device)
        target = {
            k: v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v] for k, v in target.items()
        }
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = bench(x, target)
        loss = out["loss"].float()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(net, step=step)
        step += 1
        now = time.perf_counter()
        wall += now - t_last
        t_last = now
        row = {
            "step": step,
            "of": cfg.steps,
            "loss": round(loss.item(), 4),
            "class_loss": round(out["class_loss"].item(), 4),
            "box_loss": round(out["box_loss"].item(), 5),
            "lr": scheduler.get_last_lr()[0],
        }
        if cfg.val_dir is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            net.eval()
            row["val"] = run_eval(cfg.eval_images)
            net.train()
            t_last = time.perf_counter()
        history.append(row)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state()
        if progress:
            progress(row)

    final = run_eval(None)
    if progress and final:
        progress({"step": step, "final": final})
    annotations = Path(cfg.train_dir) / "annotations.json"
    training = {
        "dataset": str(cfg.train_dir),
        "dataset_sha256": sha256_file(annotations),
        # the class ids its data used (class k = the k-th): labelled check sets of the same kinds
        "class_ids": [c["id"] for c in json.loads(annotations.read_text()).get("categories", [])],
        "images": len(batches),
        "val_dataset": str(cfg.val_dir) if cfg.val_dir else None,
        "start": start,
        "seed": cfg.seed,
        "steps": step,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "lr": cfg.lr,
        "ema_decay": cfg.ema_decay,
        "bf16": bf16,
        "device": str(device),
        "wall_s": round(wall, 1),
        "val": final,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": sum(r["loss"] for r in history[-20:]) / max(len(history[-20:]), 1) if history else None,
    }
    meta = save_checkpoint(
        out_dir,
        cfg.model,
        cfg.architecture,
        cfg.class_names,
        weights(),
        seed=cfg.seed,
        source="trained",
        fmt="safetensors",
        training=training,
    )
    entry = ModelEntry(cfg.model, cfg.architecture, (out_dir / meta.weights_file).resolve())
    ModelSet((entry,)).write(out_dir / MODELS_FILE)
    (out_dir / f"{cfg.model}.history.json").write_text(json.dumps(history) + "\n")
    return TrainResult(out_dir, meta, history)
