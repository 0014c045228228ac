"""Every zoo model builds, runs, is seeded, carries non-trivial norm layers, and stays small."""

import functools
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from slimgraph.errors import ModelLoadError
from slimgraph.ir.loading import load_factory
from slimgraph.zoo import NUM_CLASSES, ZOO, zoo_factory
from slimgraph.zoo import architectures as arch

# (min, max) parameter counts, aux heads included: the shrunk configurations stay shrunk.
PARAM_BOUNDS = {
    "squeezenet": (40_000, 60_000),
    "mobilenet_v1": (140_000, 180_000),
    "mobilenet_v2": (100_000, 130_000),
    "mobilenet_v3": (130_000, 170_000),
    "shufflenet_v2": (60_000, 80_000),
    "efficientnet_b0": (170_000, 220_000),
    "mnasnet": (220_000, 280_000),
    "regnet_x": (100_000, 140_000),
    "googlenet": (260_000, 330_000),
    "densenet": (85_000, 115_000),
    "resnet50": (135_000, 175_000),
    "convnext": (240_000, 300_000),
    "alexnet": (215_000, 275_000),
    "vgg_bn": (170_000, 220_000),
}
ZOO_PARAM_BUDGET = 3_000_000
# Architectures whose paper has no batch norm, and what they normalize with instead.
NO_BATCHNORM = {"squeezenet": None, "alexnet": None, "convnext": nn.LayerNorm}

NAMES = sorted(ZOO)


@functools.cache
def _built(name):
    return ZOO[name]()


def _other_input(x):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_matches_bounds():
    assert set(ZOO) == set(PARAM_BOUNDS)


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_eval_with_sane_logits(name):
    model, inputs = _built(name)
    assert not any(m.training for m in model.modules())
    assert len(inputs) == 1 and inputs[0].shape[:2] == (1, 3)
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == (1, NUM_CLASSES)
    assert torch.isfinite(out).all()
    assert out.std() > 0.1 and out.abs().max() < 100


@pytest.mark.parametrize("name", NAMES)
def test_output_depends_on_input(name):
    model, (x,) = _built(name)
    with torch.no_grad():
        a, b = model(x), model(_other_input(x))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_norm_layers_are_present_and_not_identity(name):
    model, _ = _built(name)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if name in NO_BATCHNORM:
        assert not bns
        other = NO_BATCHNORM[name]
        assert other is None or any(isinstance(m, other) for m in model.modules())
        return
    assert bns
    for bn in bns:
        assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 1.5
        assert bn.running_mean.abs().max() > 0 and not torch.allclose(bn.running_var, torch.ones(1))
        assert not torch.allclose(bn.weight, torch.ones(1)) and bn.bias.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_within_bounds(name):
    lo, hi = PARAM_BOUNDS[name]
    assert lo <= _num_params(_built(name)[0]) <= hi


def test_whole_zoo_fits_the_budget():
    assert sum(_num_params(_built(n)[0]) for n in NAMES) <= ZOO_PARAM_BUDGET


@pytest.mark.parametrize("name", NAMES)
def test_seeded_and_leaves_global_rng_alone(name):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, x1 = ZOO[name]()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1)
    second, x2 = ZOO[name]()
    assert torch.equal(x1[0], x2[0])
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace_matches_eager(name):
    model, inputs = _built(name)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_randomize_names_an_uncovered_parameter():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.alpha = nn.Parameter(torch.ones(1))

    with pytest.raises(TypeError, match="alpha"):
        arch.randomize_(Odd(), torch.Generator().manual_seed(0))


def test_zoo_factory_and_file_spec():
    model, (x,) = zoo_factory("alexnet")
    spec_model, (spec_x,) = load_factory(f"{Path(arch.__file__)}:alexnet_factory")
    assert torch.equal(x, spec_x)
    with torch.no_grad():
        assert torch.equal(model(x), spec_model(spec_x))
    with pytest.raises(ModelLoadError, match="known: squeezenet"):
        zoo_factory("lenet")


def test_training_mode_paths():
    googlenet, (x,) = zoo_factory("googlenet")
    outs = googlenet.train()(torch.cat([x, x]))
    assert len(outs) == 3 and all(o.shape == (2, NUM_CLASSES) for o in outs)
    drop = arch.StochasticDepth(0.5)
    ones = torch.ones(64, 3)
    assert torch.equal(drop.eval()(ones), ones)
    kept = drop.train()(ones)
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and 0 < kept.sum() < 2 * ones.sum()


def test_shuffle_interleaves_channel_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert arch.channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
