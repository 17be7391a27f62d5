"""A TF_CONFIG cluster with a job MultiWorkerMirroredStrategy does not run is refused, not waited for."""

import pytest

from models import distribute


@pytest.mark.parametrize("job", ["ps", "evaluator", "workers"])
def test_a_job_no_fgr_train_task_runs_is_refused_naming_it(monkeypatch, job):
  # A "ps" job made the worker wait for its task until --cluster_timeout_seconds, then say the
  # cluster "did not start".
  tf_config = f'{{"cluster": {{"worker": ["localhost:1234"], "{job}": ["localhost:1235"]}}, '
  tf_config += '"task": {"type": "worker", "index": 0}}'
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(ValueError, match=f"^TF_CONFIG: cluster job '{job}' is not one MultiWorkerMirroredStrategy runs"):
    distribute.make_strategy("multi_worker", cluster_timeout_seconds=5)


def test_a_chief_and_workers_pass_the_check():
  tf_config = '{"cluster": {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}, "task": {"type": "chief", "index": 0}}'
  assert distribute._checked_cluster(tf_config) == {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}
