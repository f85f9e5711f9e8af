"""``mock``: the benchmarks' lower bound. No network runs: every call returns the same constant raw
outputs (box regressions 0, class logits so low that no score reaches any threshold > 0), so a
request pays for decode, preprocess, tensor transfer, the shared top-k/threshold step and the JSON,
and nothing else. The real optimization's latency minus the mock's is what the three networks cost.

It answers "nothing detected" for every image, so it is for measuring only: it lives in the lab and
registers itself when the lab's experiments import it (never in an archive or a replica); ``auto`` never
considers it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from multidet.optimizations.base import Optimization, RawOutput, class_head_widths, register

NO_OBJECT_LOGIT = -30.0  # sigmoid(-30) ~ 9e-14


@register
class Mock(Optimization):
    name = "mock"
    separable = True

    def __init__(self, models, device, max_detections=100, artifact_dir=None):
        super().__init__(models, device, max_detections, artifact_dir)
        config = self.models[0].net.config
        self.box_width = config.num_scales * len(config.aspect_ratios) * 4
        self.class_widths = class_head_widths([m.net for m in self.models])
        self.feature_sizes = [
            config.image_size[0] // 2**level for level in range(config.min_level, config.max_level + 1)
        ]
        self._cache: dict[int, dict[int, RawOutput]] = {}

    def _outputs(self, batch: int) -> dict[int, RawOutput]:
        if batch not in self._cache:

            def levels(channels: int, fill: float) -> list[torch.Tensor]:
                return [torch.full((batch, channels, s, s), fill, device=self.device) for s in self.feature_sizes]

            self._cache[batch] = {
                i: (levels(width, NO_OBJECT_LOGIT), levels(self.box_width, 0.0))
                for i, width in enumerate(self.class_widths)
            }
        return self._cache[batch]

    def forward(self, images: torch.Tensor, active: Sequence[int]) -> dict[int, RawOutput]:
        outputs = self._outputs(images.shape[0])
        return {i: outputs[i] for i in active}
