"""fgr-serve runs TensorFlow's Eigen kernels, not oneDNN's, unless TF_ENABLE_ONEDNN_OPTS says otherwise."""

import serving_testlib as lib

from serving.util import runtime

# TensorFlow's own view of its kernels, after fgr-serve's process set-up.
_REPORT = """
    import json, os
    from tensorflow.python.util import _pywrap_util_port
    print(json.dumps({"env": os.environ.get(runtime.ONEDNN_ENV), "onednn": _pywrap_util_port.IsMklEnabled()}))
"""


def _run_entry_point(*argv: str, onednn_env: str | None = None) -> dict:
  return lib.run_server_setup(_REPORT, *argv, env={runtime.ONEDNN_ENV: onednn_env, "TF_CPP_MIN_LOG_LEVEL": "2"})[0]


def test_server_process_turns_onednn_off():
  # Under the default allocator the process re-executes: the setting has to survive the exec.
  for argv in (["--port=0"], ["--allocator=system"]):
    report = _run_entry_point(*argv)
    assert report == {"env": "0", "onednn": False}, argv


def test_a_users_setting_is_kept():
  assert _run_entry_point("--allocator=system", onednn_env="1")["env"] == "1"
