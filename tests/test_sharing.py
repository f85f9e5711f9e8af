"""Shared work (multidet.sharing): what models of a set have in common is found from their weights, computed once
and held once, and every path gives each model the answer it gives alone.

The set mixes two architectures and every kind of sharing, built from seeded random models the way users make
them (``detlab.checkpoints.graft``: a fine-tune with parts frozen keeps them bit for bit): ``pets_head`` is ``pets``
with a class net of its own (4 classes), ``pets_trunk`` keeps only ``pets``'s backbone, ``birds`` shares nothing,
``pets_copy`` is ``pets`` under another name, and ``signs_head`` is the D1 ``signs`` with its own class net.
"""

from __future__ import annotations

import pytest
import torch

from detlab import build
from detlab.checkpoints import generate_model_set, graft, save_checkpoint
from helpers import IMAGES, PHOTOS, assert_schema
from multidet.config import Settings
from multidet.modelset import ModelEntry, ModelSet, load_models, read_model_set
from multidet.optimizations import OPTIMIZATIONS, build_optimization
from multidet.pipeline import Detector
from multidet.quality import raw_difference
from multidet.sharing import Plan, hold_once, segments
from multidet.weights import read_state_dict, tensor_digest

CPU = torch.device("cpu")
BASES = [
    ("pets", "efficientdet_d0", ["cat", "dog", "rabbit"]),
    ("signs", "tf_efficientdet_d1", ["stop", "yield", "speed limit", "no entry", "crossing"]),
    ("birds", "efficientdet_d0", ["owl", "gull", "crow", "swan"]),
    ("roads", "tf_efficientdet_d1", ["lane", "curb"]),
]
# name: (base, donor, the parts taken from the donor)
DERIVED = {
    "pets_head": ("pets", "birds", ("class_net.",)),
    "pets_trunk": ("pets", "birds", ("fpn.", "class_net.", "box_net.")),
    "pets_copy": ("pets", "pets", ()),
    "signs_head": ("signs", "roads", ("class_net.",)),
}
ORDER = ["pets", "signs", "pets_head", "birds", "pets_trunk", "signs_head", "pets_copy"]
D0 = ["pets", "pets_head", "birds", "pets_trunk", "pets_copy"]  # the D0 group, in the set's order


@pytest.fixture(scope="module")
def shared_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    bases = generate_model_set(BASES, folder, [p.read_bytes() for p in PHOTOS[:1]], seed=11)
    spec = {name: (arch, classes) for name, arch, classes in BASES}
    states = {e.name: read_state_dict(e.weights) for e in bases}
    entries = {e.name: e for e in bases}
    for name, (base, donor, own) in DERIVED.items():
        arch, classes = spec[donor] if own else spec[base]
        save_checkpoint(folder, name, arch, classes, graft(states[base], states[donor], own), seed=None, source="graft")
        entries[name] = ModelEntry(name=name, architecture=arch, weights=(folder / f"{name}.pth").resolve())
    model_set = ModelSet(tuple(entries[n] for n in ORDER), folder / "shared.yaml")
    model_set.write(model_set.source)
    return model_set.source


@pytest.fixture(scope="module")
def baseline(shared_set):
    return Detector.from_model_set(shared_set, Settings(optimization="baseline"), CPU)


@pytest.fixture(scope="module")
def images(photos):
    return list(photos.values())[:2]


def group_of(detector: Detector, architecture: str):
    return next(g for g in detector.groups if g.architecture == architecture)


def test_sharing_is_found_from_the_weights(baseline):
    """Nothing is declared: the plan shares exactly the parts the models were made to share."""
    d0 = group_of(baseline, "efficientdet_d0")
    names = [baseline.models[k].name for k in d0.indices]
    assert names == D0
    plan = d0.optimization.network.plan
    shares = plan.describe(names)["shares"]
    assert shares["pets_head"]["with"] == ["pets"] and shares["pets_head"]["parts"] == ["backbone", "fpn", "box_net"]
    assert shares["pets_trunk"]["parts"] == ["backbone"]
    assert shares["pets_copy"]["parts"] == ["backbone", "fpn", "class_net", "box_net"]
    assert "birds" not in shares
    trunk, heads = segments(baseline.models[0].net)
    per_net = len(trunk) + sum(len(h) for h in heads.values())
    # pets (and its copy) whole, pets_head's class net, birds whole, pets_trunk after its backbone
    backbone = sum(1 for s in trunk if s.name.startswith("backbone"))
    assert plan.computed == per_net + len(heads["class_net"]) + per_net + (per_net - backbone)
    assert plan.total == 5 * per_net
    d1 = group_of(baseline, "tf_efficientdet_d1")
    shares = d1.optimization.network.plan.describe(["signs", "signs_head"])["shares"]
    assert shares["signs_head"]["parts"] == ["backbone", "fpn", "box_net"]


def test_a_shared_part_is_held_once(shared_set):
    models = load_models(read_model_set(shared_set))
    by_name = {m.name: m.net for m in models}
    pets, head, trunk, copy = (by_name[n] for n in ("pets", "pets_head", "pets_trunk", "pets_copy"))
    assert head.backbone.conv_stem.weight is pets.backbone.conv_stem.weight
    assert head.box_net.predict.conv_pw.weight is pets.box_net.predict.conv_pw.weight
    assert head.class_net.predict.conv_pw.weight is not pets.class_net.predict.conv_pw.weight
    assert trunk.backbone.blocks[6][0].conv_pw.weight is pets.backbone.blocks[6][0].conv_pw.weight
    assert trunk.fpn.cell[0].fnode[0].after_combine.conv.conv_pw.weight is not (
        pets.fpn.cell[0].fnode[0].after_combine.conv.conv_pw.weight
    )
    assert all(a is b for a, b in zip(copy.parameters(), pets.parameters()))

    def held(nets):  # bytes of the distinct tensors
        seen = {}
        for net in nets:
            for t in list(net.parameters()) + list(net.buffers()):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def size(module):
        return held([module])

    assert held([pets, copy]) == size(pets)
    # at most each model's own parts on top of pets (less where random models happen to agree: BatchNorm's
    # initial weights, the BiFPN's initial fusion weights), at least their random convolutions
    most = size(pets) + size(head.class_net) + size(trunk) - size(trunk.backbone)
    least = size(pets) + size(head.class_net.predict.conv_pw) + size(trunk.box_net.predict.conv_pw)
    assert least < held([pets, head, trunk, copy]) <= most
    assert hold_once([m.net for m in models]) == 0  # already held once: nothing more to free


def test_the_shared_baseline_is_bit_identical_to_each_network_alone(baseline, images):
    x = baseline.preprocessors[0].prepare_bytes(images, "cpu", 10**8).tensor
    for g in baseline.groups:
        if g.architecture != "efficientdet_d0":
            continue
        with torch.inference_mode():
            got = g.optimization.forward(x, range(len(g.indices)))
            alone = g.optimization.forward(x, [3])  # one model asked for: its own path only
            for j, k in enumerate(g.indices):
                cls_out, box_out = baseline.models[k].net(x)
                assert all(torch.equal(a, b) for a, b in zip(cls_out + box_out, got[j][0] + got[j][1])), j
        assert list(alone) == [3] and all(torch.equal(a, b) for a, b in zip(alone[3][0], got[3][0]))


@pytest.mark.parametrize("name", ["grouped", "onnxruntime", "onnxruntime_stacked"])
def test_stacked_and_exported_paths_share_and_agree(name, shared_set, baseline, images, tmp_path):
    """The stacked forms stack only what the models do not share (birds with pets_trunk's rest, pets_head's
    class net with pets's); every model's raw outputs stay within the path's tolerance of the baseline's."""
    build_optimization(name, baseline.models, tmp_path, build.context(photos=IMAGES))
    det = Detector.from_model_set(shared_set, Settings(optimization=name), CPU, tmp_path)
    for g, ref in zip(det.groups, baseline.groups):
        x = (
            det.preprocessors[0].prepare_bytes(images, "cpu", 10**8).tensor
            if g.architecture == "efficientdet_d0"
            else None
        )
        x = (
            next(p for p in det.preprocessors if p.input_size == ref.preprocessor.input_size)
            .prepare_bytes(images, "cpu", 10**8)
            .tensor
        )
        with torch.inference_mode():
            want = ref.optimization.forward(x, range(len(ref.indices)))
            got = g.optimization.forward(x, range(len(g.indices)))
        for j in want:
            diff = raw_difference(want[j][0] + want[j][1], got[j][0] + got[j][1])
            assert diff <= OPTIMIZATIONS[name].raw_tolerance, (g.architecture, j, diff)
    assert_schema(det.predict_one(images[0]), models=tuple(ORDER))


def test_an_exported_graph_holds_a_shared_part_once(baseline, tmp_path):
    """Two models with the same weights export to the graph of one (plus nothing): the ONNX file's size."""
    from multidet.optimizations.onnx import export_onnx

    pets = [m for m in baseline.models if m.name in ("pets", "pets_copy")]
    one, two = export_onnx(pets[:1], tmp_path / "one.onnx", True), export_onnx(pets, tmp_path / "two.onnx", True)
    assert abs(two.stat().st_size - one.stat().st_size) < 0.01 * one.stat().st_size
    assert Plan([m.net for m in pets]).computed == Plan([pets[0].net]).computed


def test_the_archive_stores_a_shared_tensor_once(shared_set, baseline, images, tmp_path):
    """A model archive holds the set's weights as one store of distinct tensors and an index per model: the store
    is the distinct tensors' bytes, the set loads from it to the same answers, and a changed byte is refused."""
    from detlab.packaging import write_model_set
    from multidet.modelset import ModelSetError
    from multidet.weights import CheckpointError

    set_file = write_model_set(read_model_set(shared_set), baseline.models, tmp_path)
    store = tmp_path / "models" / "tensors.safetensors"
    distinct, whole = {}, 0
    for m in baseline.models:
        for t in m.net.state_dict().values():
            distinct[tensor_digest(t)] = t.numel() * t.element_size()
            whole += t.numel() * t.element_size()
    assert sum(distinct.values()) < store.stat().st_size < sum(distinct.values()) + 2**20  # + the store's header
    assert store.stat().st_size < 0.6 * whole  # seven models, four of them made from two
    again = Detector.from_model_set(set_file, Settings(optimization="baseline"), CPU)
    want, got = baseline.predict_one(images[0]), again.predict_one(images[0])
    assert want["detections"] == got["detections"]
    data = bytearray(store.read_bytes())
    data[-100] ^= 0xFF
    store.write_bytes(bytes(data))
    with pytest.raises((CheckpointError, ModelSetError), match="integrity"):
        load_models(read_model_set(set_file))
