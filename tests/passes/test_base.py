import pytest

from slimgraph.errors import PassConfigError
from slimgraph.passes import available_passes, create_pass, format_pipeline, parse_pipeline
from slimgraph.passes.base import parse_value


def test_builtin_passes_are_registered():
    assert {"cleanup", "const-fold", "fold-bn"} <= set(available_passes())


def test_pipeline_round_trip():
    passes = parse_pipeline(" cleanup , fold-bn ")
    assert [p.name for p in passes] == ["cleanup", "fold-bn"]
    assert format_pipeline(passes) == "cleanup,fold-bn"
    assert parse_pipeline("") == [] and parse_pipeline(None) == []


def test_values_parse():
    assert parse_value("0.9") == 0.9 and parse_value("3") == 3
    assert parse_value("true") is True and parse_value("none") is None
    assert parse_value("vbmf") == "vbmf" and parse_value("[1,2]") == (1, 2)


@pytest.mark.parametrize("text,match", [
    ("fold-bn,nope", "unknown pass 'nope'"),
    ("fold-bn{bogus=1}", "has no option 'bogus'"),
    ("fold-bn{", "unbalanced"),
    ("cleanup,,fold-bn", "empty pass name"),
    ("fold-bn{x}", "must be key=value"),
])
def test_bad_pipelines_raise_one_clear_error(text, match):
    with pytest.raises(PassConfigError, match=match):
        parse_pipeline(text)


def test_create_pass_unknown_name_lists_available():
    with pytest.raises(PassConfigError, match="available: .*fold-bn"):
        create_pass("fold-bm")
