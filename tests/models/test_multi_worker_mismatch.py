"""Two fgr-train workers given different runs refuse to train, each in one line, before any step."""

import os

from bench.fixtures import workers as workers_lib
from models.data import prepare, sources
from tests.models import multi_worker_testlib

DATA = sources.DataSpec(name="synthetic", synthetic={"num_ads": 1000, "num_users": 50, "num_sessions": 300, "seed": 3})
FLAGS = [*multi_worker_testlib.TINY_FLAGS, "--epochs=1"]
TIMEOUT_S = 240  # Bounds a hung job; the refusal comes once both workers have started.


def test_workers_given_different_batch_sizes_refuse_to_train(tmp_path):
  # Mismatched collectives: after ~50 s each worker died with a gRPC "Collective instance ... expected
  # type" or "tasks have crashed" traceback.
  data_dir, log_dir = str(tmp_path / "data"), str(tmp_path / "logs")
  os.makedirs(log_dir)
  prepare.prepare(DATA, data_dir, records_per_shard=1000, progress=False)
  common = [*FLAGS, f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'run'}"]
  for _ in range(3):  # Another process may take a port between choosing and binding it.
    flags_of = [[*common, "--batch_size=32"], [*common, "--batch_size=16"]]
    with multi_worker_testlib.workers_running(flags_of, log_dir) as workers:
      codes = [worker.wait(timeout=TIMEOUT_S) for worker in workers]
    if not workers_lib.lost_a_port(log_dir):
      break
  for index, code in enumerate(codes):
    with open(os.path.join(log_dir, f"worker{index}.log")) as f:
      log = f.read()
    assert code == 1, log[-3000:]
    assert "fgr-train: error: the workers of TF_CONFIG's cluster were given different runs" in log, log[-3000:]
    assert "[0] / [1]" in log and "Traceback" not in log, log[-3000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
