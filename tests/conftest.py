"""Suite-wide settings.

One torch intra-op thread for the whole suite: the tests use small tensors on a shared 2-core
machine, where torch's thread pool spinning against TVM's workers and other processes made
them 15-40x slower. (tests/passes/test_prune_weights.py used to set this at import, which
applied it to every test collected after it; it is stated here once instead.)
"""

import torch

torch.set_num_threads(1)
