"""What a compiled artifact directory holds: file names and the manifest's format tag.

One module that the builder (``artifact``), the device runners (``device``) and the loaders
import, so none of them imports another for a file name.
"""

MANIFEST = "manifest.json"  # target, inputs/outputs, versions, pipeline, schedules, sha256
LIBRARY = "model.so"  # the exported TVM library
CUBIN = "kernels.cubin"  # CUDA builds: the kernels compiled by NVRTC for the target's sm_XX
FORMAT = "slimgraph-tvm-artifact"
FORMAT_VERSION = 1
