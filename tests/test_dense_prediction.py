"""nsl.convert on torchvision detection and segmentation models: same function at conversion, and a
training step at batch 1 and 2 (the predictors' GroupNorm needs no batch statistics).

Needs torchvision (a torch it was built for, e.g. torch 2.14.1 + torchvision 0.29.1: the second job of
``.ci/run``). Skipped without it, unless ``NSL_REQUIRE_TORCHVISION=1`` (CI), where a missing torchvision fails.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import nsl

try:
    from torchvision.models import detection, segmentation
except Exception as e:  # ImportError, or a torchvision built for another torch
    if os.environ.get("NSL_REQUIRE_TORCHVISION") == "1":
        raise RuntimeError(f"NSL_REQUIRE_TORCHVISION=1 but torchvision cannot be imported: {e}") from e
    pytest.skip(f"torchvision cannot be imported beside this torch ({e}); see .ci/run", allow_module_level=True)

SIZE = 64
DYNAMIC_KINDS = [n for n, k in nsl.LAYER_KINDS.items() if k.predictor is not None]
_DET = dict(weights=None, weights_backbone=None, num_classes=3, min_size=SIZE, max_size=SIZE)
_SEG = dict(weights=None, weights_backbone=None, num_classes=3)
MODELS = {
    "retinanet": lambda: detection.retinanet_resnet50_fpn(**_DET),
    "fasterrcnn": lambda: detection.fasterrcnn_resnet50_fpn(**_DET),
    "maskrcnn": lambda: detection.maskrcnn_resnet50_fpn(**_DET),
    "fcn": lambda: segmentation.fcn_resnet50(**_SEG),
    "deeplabv3": lambda: segmentation.deeplabv3_resnet50(**_SEG),
}


def _loss(name: str, model: nn.Module, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(batch)]
    if name in ("fcn", "deeplabv3"):
        out = model(torch.stack(images))["out"]
        return nn.functional.cross_entropy(out, torch.randint(0, 3, (batch, SIZE, SIZE), generator=g))
    targets = []
    for _ in range(batch):
        t = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
        if name == "maskrcnn":
            t["masks"] = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
            t["masks"][:, 8:40, 8:40] = 1
        targets.append(t)
    return sum(model(images, targets).values())


def _train_mode(name: str, model: nn.Module) -> None:
    model.train()
    if name == "deeplabv3":  # its ASPP pooling branch's BN sees one value per channel at batch 1 even unconverted:
        for m in model.modules():  # freeze the model's own BNs, as small-batch segmentation does
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


# every model x every dynamic kind at batch 1; batch 2 for one kind per model
CASES = [(name, kind, 1) for name in MODELS for kind in DYNAMIC_KINDS]
CASES += [(name, DYNAMIC_KINDS[i % len(DYNAMIC_KINDS)], 2) for i, name in enumerate(MODELS)]


@pytest.mark.parametrize("name,kind,batch", CASES)
def test_converted_model_keeps_its_function_and_trains(name, kind, batch):
    torch.manual_seed(0)
    original = MODELS[name]().eval()
    captured = {}  # each converted conv's input and output in the original model
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, (args[0], out)))
               for n, m in original.named_modules() if type(m) is nn.Conv2d and m.kernel_size != (1, 1)]
    model = nsl.convert(original, kind=kind)
    with torch.no_grad():
        x = torch.rand(1, 3, SIZE, SIZE)
        ref = original(x) if name in ("fcn", "deeplabv3") else original.backbone(x)
        for h in handles:
            h.remove()
        layers = dict(model.named_modules())
        converted = [n for n in captured if isinstance(layers[n], (nsl.DynamicNSConv2d, nsl.DynamicFilterConv2d))]
        assert converted and len(converted) == len(captured)
        for n in converted:  # the same input gives the same output, layer by layer
            inp, out = captured[n]
            torch.testing.assert_close(layers[n](inp), out, atol=1e-4, rtol=1e-4)
        got = model(x) if name in ("fcn", "deeplabv3") else model.backbone(x)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-3, rtol=1e-3)
    _train_mode(name, model)
    loss = _loss(name, model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n in converted for p in layers[n].predictor.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if kind == "dynamic-filter":  # its mixing A starts at 0, so g gets gradient from the second step on
        assert any(layers[n].mix.weight.grad.abs().sum() > 0 for n in converted)
    else:
        assert any(g.abs().sum() > 0 for g in grads)
