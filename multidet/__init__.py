"""multidet: three EfficientDet-D0 detectors answering every request together.

The data path, one module per step:
    decode -> preprocess -> optimizations (the three networks + effdet's top-k/NMS) -> postprocess
and ``pipeline.Detector`` ties them together. Optimization paths are optimization classes registered
by name in ``multidet.optimizations``.
"""

import warnings

# effdet decorates helpers with torch.jit.script at import time; torch 2.14 warns about that on
# every import. It is effdet's business, not the user's.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

__version__ = "0.1.0"
