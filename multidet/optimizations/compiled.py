"""``compile`` / ``compile_reduce_overhead``: the baseline's three networks under ``torch.compile``
(Inductor). Post-processing stays eager (NMS breaks graphs; it is shared by every optimization anyway).

Compilation is slow on a small CPU (about a minute per network on the 2-core development VM), so it
is paid once, at MAR build time: ``Optimization.build`` compiles the three networks on a 512x512 batch of
one, under ``torch.inference_mode`` exactly as serving calls them, and saves Inductor's portable
cache (``torch.compiler.save_cache_artifacts``) to ``artifacts/compile_cache.bin``, packed into the
MAR. A worker loads it before its first call, so start-up replays compiled kernels instead of
compiling (a cold start without it compiles during warm-up; startupTimeout allows it).
Shapes are static: a new batch size (TorchServe batching) compiles once more, then hits the cache.
``compile_reduce_overhead`` adds CUDA graphs on CUDA; on CPU it is the same as ``compile``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import BuildContext, LoadedModel, RawOutput, register
from .baseline import Baseline

log = logging.getLogger(__name__)
CACHE_FILE = "compile_cache.bin"
# Dynamo counts every compiled variant of one code object (EfficientDet.forward) against one limit:
# three networks x each batch size TorchServe hands over (or several compiled optimizations in one process,
# as in the ablation) pass the default of 8, after which Dynamo silently runs the rest eagerly.
RECOMPILE_LIMIT = 64


class Compiled(Baseline):
    mode: str | None = None
    auto_candidate = False  # compiles for minutes unless its MAR-built cache is there
    build_step = "torch.compile of each network; Inductor's cache saved"
    build_minutes = 3.0  # about a minute per network on 2 cores: the tests compile it once, through a MAR

    @classmethod
    def build(
        cls, models: Sequence[LoadedModel], artifact_dir: Path, context: BuildContext | None = None
    ) -> list[Path]:
        say = (context or BuildContext()).log
        t0 = time.perf_counter()
        optimization = cls(models, torch.device("cpu"))
        x = torch.zeros(1, 3, *models[0].net.config.image_size)
        with torch.inference_mode():
            for k, net in enumerate(optimization.nets):
                say(f"compiling {models[k].name} ({k + 1}/{len(models)}, mode={cls.mode})...")
                net(x)
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise RuntimeError("torch.compile produced no cache artifacts to save")
        path = Path(artifact_dir) / CACHE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(artifacts[0])
        say(f"compiled in {time.perf_counter() - t0:.0f} s; cache {path.stat().st_size / 1e6:.1f} MB")
        return [path]

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        cache = (self.artifact_dir / CACHE_FILE) if self.artifact_dir else None
        if cache is not None and cache.exists():
            torch.compiler.load_cache_artifacts(cache.read_bytes())
            log.info("loaded Inductor cache %s (%.1f MB)", cache, cache.stat().st_size / 1e6)
        elif cache is not None:
            log.warning(
                "no %s: the first call compiles from scratch (build it with `make mar OPT=%s`)", cache, self.name
            )
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.nets = [torch.compile(net, mode=self.mode, dynamic=False) for net in self.nets]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        return self.forward_each(images, active)  # one program per network: shared parts run in each


@register
class Compile(Compiled):
    name = "compile"


@register
class CompileReduceOverhead(Compiled):
    name = "compile_reduce_overhead"
    mode = "reduce-overhead"
    same_as = {"cpu": "compile"}  # CUDA graphs need CUDA: on a CPU this is compile
