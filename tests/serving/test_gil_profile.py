"""bench/gil_profile.py: how py-spy's sampled stacks are charged to fgr-serve code."""

import os

from bench import gil_profile

_SERVING = os.path.join(gil_profile.REPO, "serving")
_LOOP = "Handle._run (/usr/lib/python3.11/asyncio/events.py)"
_PREDICT = f"ServingApi.predict_async ({_SERVING}/model_servers/service_impl.py)"
_DECODE = f"to_ndarray ({_SERVING}/servables/tensor_util.py)"
_NUMPY = "frombuffer (/venv/lib/python3.11/site-packages/numpy/_core/numeric.py)"


def test_stack_is_charged_to_its_innermost_fgr_serve_function():
  assert gil_profile.charge([_LOOP, _PREDICT, _DECODE, _NUMPY]) == "serving.servables.tensor_util.to_ndarray"


def test_stack_without_fgr_serve_code_is_charged_to_its_innermost_library_frame():
  assert (
    gil_profile.charge(["run_forever (/usr/lib/python3.11/asyncio/base_events.py)", _LOOP])
    == "Handle._run (asyncio/events.py), no fgr-serve frame"
  )
  assert gil_profile.charge([_NUMPY]) == "frombuffer (numpy/_core/numeric.py), no fgr-serve frame"


def test_breakdown_sums_py_spy_raw_lines_by_charge():
  raw = [
    f'process 12:"python -m serving.model_servers.main";{_LOOP};{_PREDICT};{_DECODE} 7\n',
    f'process 12:"python -m serving.model_servers.main";{_LOOP};{_PREDICT} 2\n',
    f"{_LOOP};{_PREDICT};{_DECODE};{_NUMPY} 3\n",
    "\n",
  ]
  total, charged = gil_profile.breakdown(raw)
  assert total == 12
  assert charged == {
    "serving.servables.tensor_util.to_ndarray": 10,
    "serving.model_servers.service_impl.ServingApi.predict_async": 2,
  }
