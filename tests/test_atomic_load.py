"""A failed load changes nothing: ``restore_pruned`` and ``enable_pruned_loading`` + ``load_state_dict``.

Every failing load below runs into a model whose parameters and buffers were first filled with
values that no checkpoint holds, and afterwards every tensor must be bitwise what it was, every
module the same object of the same type at the same name. Loads that torch accepts (``strict=False``
with missing or unexpected keys, a version-less state_dict without ``num_batches_tracked``) must
still succeed.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torchvision
from models import ConvNet, conv_batches, warm_up_bn
from torch import nn

from lightning_eigendamage import KFELayer, enable_pruned_loading, prune, restore_pruned

ROUTES = ("restore_pruned", "load_state_dict")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _load(route: str, model: nn.Module, sd: dict[str, Any], *, strict: bool = True) -> Any:
    if route == "restore_pruned":
        return restore_pruned(model, sd, strict=strict)
    enable_pruned_loading(model)
    return model.load_state_dict(sd, strict=strict)


def _scramble(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every parameter and buffer values no checkpoint here has (floats in [0.5, 1.5))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randint(1000, 2000, t.shape, generator=g))
    return model


def _snapshot(model: nn.Module) -> dict[str, Any]:
    sd = model.state_dict()
    return {
        "tensors": {k: v.detach().clone() for k, v in sd.items() if torch.is_tensor(v)},
        "extra": {k: copy.deepcopy(v) for k, v in sd.items() if not torch.is_tensor(v)},
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "tensor_objects": [
            (n, id(t), t.requires_grad)
            for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
        ],
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _changed(model: nn.Module, snap: dict[str, Any]) -> list[str]:
    """Names of the tensors that are not bitwise what they were (missing ones included)."""
    now = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    out = [k for k in now.keys() ^ snap["tensors"].keys()]
    for k, old in snap["tensors"].items():
        new = now.get(k)
        if new is not None and (
            new.dtype != old.dtype or new.shape != old.shape or not torch.equal(_bits(new), _bits(old))
        ):
            out.append(k)
    return sorted(out)


def _assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == snap["modules"]
    assert [
        (n, id(t), t.requires_grad)
        for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
    ] == snap["tensor_objects"]
    changed = _changed(model, snap)
    assert not changed, f"{len(changed)} tensors changed by a failed load: {changed}"
    extra = {k: v for k, v in model.state_dict().items() if not torch.is_tensor(v)}
    assert extra == snap["extra"]


def _copy_sd(sd: dict[str, Any], *, metadata: bool = True) -> OrderedDict:
    out = OrderedDict((k, copy.deepcopy(v) if isinstance(v, dict) else v) for k, v in sd.items())
    if metadata and hasattr(sd, "_metadata"):
        out._metadata = copy.deepcopy(sd._metadata)
    return out


def _fails_and_changes_nothing(
    route: str, model: nn.Module, sd: dict[str, Any], err: type, match: str, *, strict: bool = True
) -> None:
    snap = _snapshot(model)
    with pytest.raises(err, match=f"(?s){match}"):
        _load(route, model, sd, strict=strict)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# Pruned checkpoints (built once per module)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_sd() -> OrderedDict:
    """State_dict of a torchvision resnet18 (10 classes) pruned by half."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    prune(model, batches, ratio=0.5, layer_cap=0.95, rank_by="damage")
    assert any(isinstance(m, KFELayer) for m in model.modules())
    return model.state_dict()


def _pruned_convnet(n_classes: int = 10, ratio: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvNet(n_classes)
    batches = conv_batches(2, n=8, size=16, n_classes=n_classes, seed=seed)
    warm_up_bn(model, batches)
    prune(model, batches, ratio=ratio, layer_cap=0.95, rank_by="damage")
    return model.eval()


@pytest.fixture(scope="module")
def conv_model() -> nn.Module:
    model = _pruned_convnet()
    assert {n for n, m in model.named_modules() if isinstance(m, KFELayer)} == {
        "features.5",
        "features.7",
        "fc1",
    }
    return model


@pytest.fixture
def conv_sd(conv_model: nn.Module) -> OrderedDict:
    return _copy_sd(conv_model.state_dict())


def _record_key(sd: dict[str, Any], form: str = "bottleneck") -> str:
    return next(k for k, v in sd.items() if k.endswith("._extra_state") and v["form"] == form)


# ---------------------------------------------------------------------------------------------
# Another architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_other_class_count_changes_nothing(route: str, resnet_sd: OrderedDict) -> None:
    model = _scramble(torchvision.models.resnet18(num_classes=100))
    _fails_and_changes_nothing(
        route, model, _copy_sd(resnet_sd), RuntimeError, r"fc\.weight.*\(10, 512\).*\(100, 512\)"
    )


@pytest.mark.parametrize("route", ROUTES)
def test_other_class_count_with_strict_false_changes_nothing(route: str, resnet_sd: OrderedDict) -> None:
    """torch raises on a size mismatch whatever ``strict`` is: so must the pre-check."""
    model = _scramble(torchvision.models.resnet18(num_classes=100))
    _fails_and_changes_nothing(
        route, model, _copy_sd(resnet_sd), RuntimeError, r"size mismatch.*fc\.bias", strict=False
    )


@pytest.mark.parametrize("route", ROUTES)
def test_resnet18_checkpoint_into_resnet34_changes_nothing(route: str, resnet_sd: OrderedDict) -> None:
    model = _scramble(torchvision.models.resnet34(num_classes=10))
    _fails_and_changes_nothing(
        route, model, _copy_sd(resnet_sd), RuntimeError, r"Missing key.*layer1\.2\.conv1\.weight"
    )


@pytest.mark.parametrize("route", ROUTES)
def test_already_pruned_model_keeps_its_own_pruned_layers(route: str, conv_sd: OrderedDict) -> None:
    """A model pruned to another architecture (and another class count): its KFELayers, not
    fresh ones, are what stays after the failure."""
    model = _scramble(_pruned_convnet(n_classes=5, ratio=0.3, seed=1))
    assert any(isinstance(m, KFELayer) for m in model.modules())
    _fails_and_changes_nothing(route, model, conv_sd, RuntimeError, r"fc2\.weight.*\(10, 32\).*\(5, 32\)")


# ---------------------------------------------------------------------------------------------
# Missing and unexpected keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("key", ["fc2.bias", "features.5.rotate_out.weight", "features.3.running_var"])
def test_missing_key_changes_nothing(route: str, key: str, conv_sd: OrderedDict) -> None:
    del conv_sd[key]
    _fails_and_changes_nothing(route, _scramble(ConvNet()), conv_sd, RuntimeError, rf"Missing key.*{key}")


@pytest.mark.parametrize("route", ROUTES)
def test_missing_record_changes_nothing(route: str, conv_sd: OrderedDict) -> None:
    """Without its record a pruned layer's weights fit nothing in the model."""
    del conv_sd["fc1._extra_state"]
    _fails_and_changes_nothing(
        route,
        _scramble(ConvNet()),
        conv_sd,
        RuntimeError,
        r"Missing key.*fc1\.weight.*Unexpected key.*fc1\.core",
    )


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("key", ["fc2.extra", "junk", "features.5.core.extra", "features.5.extra.weight"])
def test_unexpected_key_changes_nothing(route: str, key: str, conv_sd: OrderedDict) -> None:
    conv_sd[key] = torch.zeros(3)
    _fails_and_changes_nothing(route, _scramble(ConvNet()), conv_sd, RuntimeError, rf"Unexpected key.*{key}")


@pytest.mark.parametrize("route", ROUTES)
def test_strict_false_still_loads_with_missing_and_unexpected_keys(route: str, conv_sd: OrderedDict) -> None:
    """What torch accepts is not refused: ``strict=False`` skips missing and unexpected keys."""
    del conv_sd["fc2.bias"]
    conv_sd["junk"] = torch.zeros(3)
    model = _scramble(ConvNet())
    kept = model.fc2.bias.detach().clone()
    out = _load(route, model, conv_sd, strict=False)
    if route == "load_state_dict":
        assert out.missing_keys == ["fc2.bias"] and out.unexpected_keys == ["junk"]
    sd = model.state_dict()
    assert torch.equal(sd["fc2.bias"], kept)
    assert all(torch.equal(sd[k], v) for k, v in conv_sd.items() if torch.is_tensor(v) and k != "junk")
    assert {n for n, m in model.named_modules() if isinstance(m, KFELayer)} == {
        "features.5",
        "features.7",
        "fc1",
    }


@pytest.mark.parametrize("route", ROUTES)
def test_version_less_state_dict_without_num_batches_tracked_still_loads(
    route: str, conv_model: nn.Module, conv_sd: OrderedDict
) -> None:
    """BatchNorm fills a missing ``num_batches_tracked`` when the state_dict has no metadata."""
    sd = _copy_sd(conv_sd, metadata=False)
    del sd["features.3.num_batches_tracked"]
    model = ConvNet()
    _load(route, model, sd)
    x = conv_batches(1, n=4, size=16)[0][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), conv_model(x))
    # With metadata saying version 2, torch counts it as missing: so do we, and nothing changes.
    del conv_sd["features.3.num_batches_tracked"]
    _fails_and_changes_nothing(
        route, _scramble(ConvNet()), conv_sd, RuntimeError, r"Missing key.*features\.3\.num_batches_tracked"
    )


# ---------------------------------------------------------------------------------------------
# Corrupted records and weights that do not fit them
# ---------------------------------------------------------------------------------------------


def _corrupt(sd: OrderedDict, how: str) -> tuple[type, str]:
    """Corrupt ``sd`` in place; returns the expected error type and message pattern."""
    key = _record_key(sd)  # features.5 (bottleneck, 24→32, ranks 18, 12)
    if how == "rank_in+1":  # a well-formed record that disagrees with its own weights
        sd[key] = dict(sd[key], rank_in=sd[key]["rank_in"] + 1)
        return (
            RuntimeError,
            r"size mismatch.*features\.5\.rotate_in\.weight.*\(18, 24, 1, 1\).*\(19, 24, 1, 1\)",
        )
    if how == "negative rank":
        sd[key] = dict(sd[key], rank_out=-3)
        return ValueError, r"features\.5.*bad ranks"
    if how == "rank above width":
        sd[key] = dict(sd[key], rank_in=25)
        return ValueError, r"features\.5.*rank"
    if how == "unknown form":
        sd[key] = dict(sd[key], form="pyramid")
        return ValueError, "unknown form"
    if how == "other widths":
        sd[key] = dict(sd[key], in_features=999)
        return ValueError, "do not match"
    if how == "short weight":  # a record whose weights have the wrong shape
        sd["fc1.core.weight"] = sd["fc1.core.weight"][:1]
        return RuntimeError, r"size mismatch.*fc1\.core\.weight.*\(1, 6\).*\(32, 6\)"
    if how == "not a tensor":
        sd["fc2.weight"] = sd["fc2.weight"].tolist()
        return RuntimeError, r"fc2\.weight.*expected a tensor"
    raise AssertionError(how)


CORRUPTIONS = [
    "rank_in+1",
    "negative rank",
    "rank above width",
    "unknown form",
    "other widths",
    "short weight",
    "not a tensor",
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_checkpoint_changes_nothing(route: str, how: str, conv_sd: OrderedDict) -> None:
    err, match = _corrupt(conv_sd, how)
    _fails_and_changes_nothing(route, _scramble(ConvNet()), conv_sd, err, match)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_checkpoint_into_an_already_pruned_model_changes_nothing(
    route: str, how: str, conv_model: nn.Module, conv_sd: OrderedDict
) -> None:
    err, match = _corrupt(conv_sd, how)
    _fails_and_changes_nothing(route, _scramble(copy.deepcopy(conv_model)), conv_sd, err, match)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("garbage", ["garbage", {"format": "lightning_eigendamage/v0"}, None])
def test_garbage_record_of_an_existing_pruned_layer_changes_nothing(
    route: str, garbage: Any, conv_model: nn.Module, conv_sd: OrderedDict
) -> None:
    """Not a record at all (so nothing to reshape by): the layer would refuse it mid-load."""
    conv_sd["fc1._extra_state"] = garbage
    _fails_and_changes_nothing(
        route, _scramble(copy.deepcopy(conv_model)), conv_sd, RuntimeError, r"fc1\._extra_state"
    )


# ---------------------------------------------------------------------------------------------
# Successful loads are unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_successful_load_reproduces_outputs(route: str, conv_model: nn.Module, conv_sd: OrderedDict) -> None:
    model = _scramble(ConvNet())
    _load(route, model, conv_sd)
    x = conv_batches(1, n=4, size=16)[0][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), conv_model(x))
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in conv_model.named_parameters()
    ]


def test_hook_under_a_prefix_changes_nothing_on_failure(conv_model: nn.Module) -> None:
    """The hook on a LightningModule-like wrapper: keys under ``net.``."""
    outer_pruned = nn.Module()
    outer_pruned.net = conv_model
    sd = _copy_sd(outer_pruned.state_dict())
    del sd["net.fc2.bias"]
    outer = nn.Module()
    outer.net = _scramble(ConvNet())
    enable_pruned_loading(outer)
    snap = _snapshot(outer)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*net\.fc2\.bias"):
        outer.load_state_dict(sd)
    _assert_unchanged(outer, snap)
    outer.load_state_dict(sd, strict=False)
    assert {n for n, m in outer.named_modules() if isinstance(m, KFELayer)} == {
        "net.features.5",
        "net.features.7",
        "net.fc1",
    }


@pytest.mark.parametrize("route", ROUTES)
def test_unpruned_checkpoint_with_pruned_loading_enabled_changes_nothing(route: str) -> None:
    """No records at all: the load is still checked whole (here: another class count)."""
    sd = _copy_sd(ConvNet(n_classes=10).state_dict())
    _fails_and_changes_nothing(
        route, _scramble(ConvNet(n_classes=5)), sd, RuntimeError, r"fc2\.weight.*\(10, 32\)"
    )


def _rename_legacy_key(state_dict, prefix, *args) -> None:
    if prefix + "w_old" in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "w_old")


@pytest.mark.parametrize("route", ROUTES)
def test_modules_with_their_own_load_rules_are_left_to_torch(route: str, conv_sd: OrderedDict) -> None:
    """A module whose load pre-hook renames a legacy key: torch accepts the load, so must we."""
    conv_sd["fc2.w_old"] = conv_sd.pop("fc2.weight")
    model = ConvNet()
    model.fc2._register_load_state_dict_pre_hook(_rename_legacy_key)
    _load(route, model, conv_sd)
    assert torch.equal(model.fc2.weight, conv_sd["fc2.w_old"])
    assert isinstance(model.fc1, KFELayer)


def test_hook_outside_load_state_dict_does_not_guess_strictness(conv_sd: OrderedDict) -> None:
    """Called directly, the hook cannot know ``strict``: it refuses what torch refuses either way
    (a size mismatch) and leaves missing keys to the caller."""
    from lightning_eigendamage.checkpoint import PrunedLoadingHook

    bad = _copy_sd(conv_sd)
    bad["fc2.bias"] = bad["fc2.bias"][:3]
    model = _scramble(ConvNet())
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"size mismatch for fc2\.bias.*\(3,\).*\(10,\)"):
        PrunedLoadingHook()(model, bad, "")
    _assert_unchanged(model, snap)
    del conv_sd["fc2.bias"]
    PrunedLoadingHook()(model, conv_sd, "")
    assert isinstance(model.fc1, KFELayer)
