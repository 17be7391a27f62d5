"""Packaging for fullgraph-retrieval: towers, in-graph ANN index and a TF Serving-compatible server."""

import setuptools

# fgr-query and fgr-loadtest (clients/), kept out of the server install: fgr-serve needs none of them.
# The benchmarks drive servers with fgr-loadtest's driver, and the tests run both, so those extras
# bring them too.
CLIENTS = [
  "tqdm>=4.60",  # fgr-loadtest's progress bar (and fgr-bench's).
  "hdrhistogram>=0.10",  # fgr-loadtest's latency percentiles.
  "matplotlib>=3.8",  # fgr-loadtest's latency plot (and the benchmarks' reports).
]

# The extension module serving/native/build.py writes beside serving/native/__init__.py.
NATIVE_MODULE = "_fgr_native*.so"

setuptools.setup(
  name="fullgraph-retrieval",
  version="0.1.0",
  description=(
    "A TensorFlow engine for the recall stage: query tower, item tower and "
    "nearest-neighbour index in one SavedModel, served over TF Serving's API."
  ),
  python_requires=">=3.10,<3.13",
  packages=setuptools.find_packages(
    include=["cli*", "engine*", "models*", "export*", "serving*", "clients*", "bench*"]
  ),
  # fgr-serve's native data plane, when `make install` (serving/native/build.py) has built it in this
  # checkout: without it a `pip install .` served on the Python path only, and could not build it
  # (the C++ sources stay in the checkout).
  package_data={"serving.native": [NATIVE_MODULE]},
  install_requires=[
    # scann 1.4.2's TF ops are compiled against TF 2.20 exactly: keep these in lock-step.
    "tensorflow==2.20.*",
    "tf-keras==2.20.*",
    "tensorflow-recommenders==0.7.7",
    "scann[tf]==1.4.2",
    "tensorflow-serving-api==2.20.*",
    "grpcio>=1.60",
    "grpcio-health-checking>=1.60",
    "absl-py>=2.0",
    "numpy>=1.26",
    "prometheus-client>=0.20",
    "tqdm>=4.60",  # fgr-prepare's progress bar.
    # fgr-serve's malloc (serving/util/allocator.py); preloaded, so Linux only.
    "cmeel-mimalloc==3.4.*; sys_platform == 'linux'",
    # Headers of the native module (serving/native/build.py, run by `make install`). Debian's
    # pybind11-dev (2.10) predates numpy 2: its arrays read every itemsize as 0.
    "pybind11==2.13.*",
  ],
  extras_require={
    "clients": CLIENTS,
    # ruff is pinned: its formatter's output is what `make lint` checks against.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "psutil>=5.9", "ruff==0.17.6"] + CLIENTS,
    "bench": ["hnswlib==0.8.0", "faiss-cpu==1.15.*", "py-spy>=0.3", "psutil>=5.9"] + CLIENTS,
  },
  entry_points={
    "console_scripts": [
      "fgr-prepare=cli.launch:fgr_prepare",
      "fgr-train=cli.launch:fgr_train",
      "fgr-export=cli.launch:fgr_export",
      "fgr-serve=cli.launch:fgr_serve",
      "fgr-query=cli.launch:fgr_query",
      "fgr-eval=cli.launch:fgr_eval",
      "fgr-refresh=cli.launch:fgr_refresh",
      "fgr-bench=cli.launch:fgr_bench",
      "fgr-loadtest=cli.launch:fgr_loadtest",
    ]
  },
)
