"""Every approximate pass at its default options keeps the trained digits CNN (no recovery step).

The bar: top-1 agreement with the original on the 360 held-out test images >= 0.95 after
``fold-bn,<pass>`` with the unlabeled training images as calibration data, and the pass still
compresses (fewer MACs or parameters, or sparsity). The measurement is tools/defaults_eval.py's,
run here on the model and data that ship with the package. A pass added to the registry is
picked up automatically.
"""

import importlib.util
from pathlib import Path

import pytest

from slimgraph.errors import PassConfigError
from slimgraph.passes import parse_pipeline

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "defaults_eval.py"
_spec = importlib.util.spec_from_file_location("defaults_eval", _TOOL)
defaults_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(defaults_eval)

# Passes with no defaults to trust: a required option, so running them bare is a config error.
NO_DEFAULTS = {"prune-channels": "ratio or target_macs"}


@pytest.fixture(scope="module")
def digits():
    return defaults_eval.setup()


@pytest.mark.parametrize("name", [n for n in defaults_eval.approximate_passes() if n not in NO_DEFAULTS])
def test_defaults_keep_the_trained_model(name, digits):
    row = defaults_eval.evaluate(name, digits)
    assert "error" not in row, row.get("error")
    assert row["changed"] and row["compressed"], row
    assert row["agreement"] >= defaults_eval.AGREEMENT_BAR, row


@pytest.mark.parametrize("name", sorted(NO_DEFAULTS))
def test_passes_without_defaults_refuse_to_run_bare(name):
    assert name in defaults_eval.approximate_passes()
    with pytest.raises(PassConfigError):
        parse_pipeline(name)


def test_the_measurement_covers_every_approximate_pass():
    names = defaults_eval.approximate_passes()
    assert {"fc-svd", "spatial-svd", "channel-lowrank", "tucker2", "cp", "flatten-conv",
            "prune-weights"} <= set(names) and "finetune" not in names
