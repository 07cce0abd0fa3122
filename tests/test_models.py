"""Every registered model builds, runs forward and backward, and keeps the contracts the engine relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from common.errors import UserError
from common.registry import create_model, get_model_spec, list_models, register_model

ALL_MODELS = list_models()
TORCHVISION_MODELS = [name for name in ALL_MODELS if get_model_spec(name).torchvision_weights]


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_forward_backward(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10).train()
    # 64x64 is the smallest common size: VGG and ResNet downsample 32x, and batch norm in training mode needs
    # more than one value per channel, so the last feature map should not collapse to 1x1 with a batch of 1.
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"


@pytest.mark.parametrize("arch", ALL_MODELS)
def test_spec_is_complete(arch):
    spec = get_model_spec(arch)
    assert spec.description, f"{arch} has no docstring"
    with torch.device("meta"):
        model = create_model(arch, num_classes=10)
    head = model.get_submodule(spec.head)
    assert isinstance(head, nn.Linear) and head.out_features == 10


def test_duplicate_registration_raises():
    existing = ALL_MODELS[0]
    constructor = get_model_spec(existing).constructor
    with pytest.raises(ValueError, match="registered twice"):
        register_model(existing)(lambda num_classes=1000: nn.Identity())
    assert get_model_spec(existing).constructor is constructor


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "mobilenet_v3_large"])
def test_width_mult_refused_without_one(arch):
    with pytest.raises(UserError, match="no width multiplier"):
        create_model(arch, width_mult=0.5)


def test_width_mult_refused_when_undefined():
    with pytest.raises(UserError, match="not defined"):
        create_model("mobilenet_v1", width_mult=0.3)


@pytest.mark.parametrize("width_mult, channels", [(1.0, 1024), (0.75, 768), (0.5, 512), (0.25, 256)])
def test_width_mult_accepted_for_mobilenet_v1(width_mult, channels):
    with torch.device("meta"):
        model = create_model("mobilenet_v1", num_classes=10, width_mult=width_mult)
    assert model.get_submodule(get_model_spec("mobilenet_v1").head).in_features == channels


def test_width_mult_accepted_for_mobilenet_v2():
    with torch.device("meta"):
        model = create_model("mobilenet_v2", num_classes=10, width_mult=1.4)
    assert model.classifier[1].in_features == 1792


@pytest.mark.parametrize("arch", TORCHVISION_MODELS)
def test_published_parameter_counts(arch):
    """The parameter count torchvision publishes with each ImageNet weight (1000 classes)."""
    weights = getattr(torchvision.models, get_model_spec(arch).torchvision_weights).DEFAULT
    with torch.device("meta"):
        assert weights.meta["num_params"] == sum(p.numel() for p in create_model(arch).parameters())


# One per family and head type (fc, classifier[1], classifier[3], classifier[6]): building full-size models
# on the CPU is slow.
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn"])
def test_torchvision_checkpoint_fine_tunes_into_our_model(arch, tmp_path):
    """A checkpoint of torchvision's own 1000-class model (as its hub weights are) loads through ``--pretrained``
    into ours with a 7-class head: every backbone tensor is taken over, the new head keeps its fresh init."""
    from common.builders import build_model

    spec = get_model_spec(arch)
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / "theirs.pt"
    torch.save(theirs.state_dict(), path)
    ours = build_model(spec, num_classes=7, pretrained=str(path))
    head = ours.get_submodule(spec.head)
    assert head.out_features == 7
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    backbone = [k for k in ours_state if not k.startswith(spec.head + ".")]
    assert backbone and all(torch.equal(ours_state[k], theirs_state[k]) for k in backbone)
    assert not torch.equal(head.weight[:7], theirs.get_submodule(spec.head).weight[:7])


@pytest.mark.parametrize("arch", ["resnet50", "resnet101", "resnet152"])
def test_resnet_is_v1_5(arch):
    """v1.5 (NVIDIA's recipe, torchvision's model) downsamples on the bottleneck's 3x3 convolution, v1 on its
    first 1x1: the difference is 0.5% top-1 and 12% of the speed, so the registry must build v1.5."""
    with torch.device("meta"):
        model = create_model(arch)
    for stage in (model.layer2, model.layer3, model.layer4):
        assert stage[0].conv1.stride == (1, 1) and stage[0].conv2.stride == (2, 2)
