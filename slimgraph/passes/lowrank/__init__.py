"""Low-rank factorization passes (issue 3) and their shared machinery (``common``).

Weight-only: fc-svd, spatial-svd, tucker2, cp, flatten-conv. Data-driven: channel-lowrank
(imported when its module is present). Importing this package registers them.
"""

import importlib
import importlib.util

from slimgraph.passes.lowrank import cp, fc_svd, flatten_conv, spatial_svd, tucker2  # noqa: F401

if importlib.util.find_spec("slimgraph.passes.lowrank.channel_lowrank") is not None:
    importlib.import_module("slimgraph.passes.lowrank.channel_lowrank")
