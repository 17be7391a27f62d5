"""Benchmarks: recall, QPS, latency, build time and bytes of the in-graph index backends."""

import os

from serving.util import runtime

# Same as engine/: TFRS and the towers need Keras 2; set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# A model run in a benchmark's own process runs on the kernels fgr-serve runs it on, so the two compare.
# Training here (and in the CLIs a benchmark starts) runs on them too; fgr-train keeps TensorFlow's default.
runtime.use_eigen_kernels()
