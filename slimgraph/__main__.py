"""``python -m slimgraph``: the command line (same as ``slimgraph``)."""

import sys

from slimgraph.cli import main

sys.exit(main())
