"""A zoo of classic CNN architectures, shrunk, with seeded random weights.

``ZOO[name]()`` (or ``zoo_factory(name)``) gives ``(module_in_eval_mode, example_inputs)``: the
models users bring, written as torchvision writes them, small enough for fast tests of how
slimgraph imports, compresses and compiles them. See ``slimgraph.zoo.architectures``.
"""

from slimgraph.zoo.architectures import (
    NUM_CLASSES,
    ZOO,
    ZooEntry,
    normalize_scales_,
    randomize_,
    zoo_factory,
)

__all__ = ["NUM_CLASSES", "ZOO", "ZooEntry", "normalize_scales_", "randomize_", "zoo_factory"]
