"""fgr-serve runs TensorFlow's Eigen kernels, not oneDNN's, unless TF_ENABLE_ONEDNN_OPTS says otherwise."""

import json
import os
import subprocess
import sys
import textwrap

from serving.util import runtime

# What fgr-serve's entry points run first, then TensorFlow's own view of its kernels.
_ENTRY_POINT = textwrap.dedent("""
    import json, os, sys
    from serving.util import runtime
    runtime.prepare_server_process(sys.argv[1:])
    from tensorflow.python.util import _pywrap_util_port
    print(json.dumps({"env": os.environ.get(runtime.ONEDNN_ENV), "onednn": _pywrap_util_port.IsMklEnabled()}))
""")


def _run_entry_point(*argv: str, onednn_env: str | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != runtime.ONEDNN_ENV}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  if onednn_env is not None:
    env[runtime.ONEDNN_ENV] = onednn_env
  process = subprocess.run(
    [sys.executable, "-c", _ENTRY_POINT, *argv], capture_output=True, text=True, env=env, timeout=120, check=False
  )
  assert process.returncode == 0, process.stderr
  return json.loads(process.stdout.strip().splitlines()[-1])


def test_server_process_turns_onednn_off():
  # Under the default allocator the process re-executes: the setting has to survive the exec.
  for argv in (["--port=0"], ["--allocator=system"]):
    report = _run_entry_point(*argv)
    assert report == {"env": "0", "onednn": False}, argv


def test_a_users_setting_is_kept():
  assert _run_entry_point("--allocator=system", onednn_env="1")["env"] == "1"
