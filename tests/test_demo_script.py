"""`make demo` runs tools/demo.py, which no other test imports: check it parses and defines its flags.

The full demo takes minutes (it trains, exports and serves); tests/test_full_graph_serving.py covers the
same path on a tiny model, so here we only guard against the demo script itself being broken.
"""

import os
import py_compile
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "tools", "demo.py")


def test_demo_script_compiles(tmp_path):
  py_compile.compile(DEMO, cfile=str(tmp_path / "demo.pyc"), doraise=True)


def test_demo_script_imports_and_lists_its_flags():
  # absl prints the flags and exits 1 for --helpshort; what matters is that the module imported.
  # PYTHONPATH: the demo imports this checkout's packages, not whichever one the venv installed.
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  result = subprocess.run([sys.executable, DEMO, "--helpshort"], capture_output=True, text=True, timeout=60, env=env)
  for flag in ("--output_dir", "--num_ads", "--num_sessions", "--epochs", "--latency_requests"):
    assert flag in result.stdout, result.stderr
