"""Version management: availability-preserving swaps, failures, reloads."""

import collections
import concurrent.futures
import logging
import os
import shutil
import threading

import grpc
import pytest
import serving_testlib as lib
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.core import aspired_versions_policy, file_system_source, loader, model_manager
from serving.servables import warmup

State = get_model_status_pb2.ModelVersionStatus.State


def _predict(stub, model, x=2.0, label=None, version=None):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  if label:
    request.model_spec.version_label = label
  if version:
    request.model_spec.version.value = version
  request.inputs["x"].CopyFrom(tf.make_tensor_proto([x], dtype=tf.float32))
  return stub.Predict(request, timeout=30)


def _states(stub, model):
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = model
  response = stub.GetModelStatus(request, timeout=30)
  return {s.version: s for s in response.model_version_status}


def _state(stub, model, version):
  """The state of one version in GetModelStatus, None while it has none."""
  status = _states(stub, model).get(version)
  return status.state if status is not None else None


def _publish(base, version, tmp_path, **kwargs):
  """Writes a version next to `base`, then renames it in (atomic publish)."""
  staging = str(tmp_path / f"staging-{version}")
  lib.write_tf2_half_plus_two(staging, **kwargs)
  os.rename(staging, os.path.join(base, str(version)))


@pytest.mark.usefixtures("native")
def test_swap_under_load_then_failed_version(tmp_path):
  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=base, file_system_poll_wait_seconds=0.2)
  stop = threading.Event()
  results, failures = [], []
  per_client = [[] for _ in range(4)]  # Each client's answers, in order.

  def client(answers):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    while not stop.is_set():
      try:
        response = _predict(stub, "m")
        answer = (response.model_spec.version.value, response.outputs["y"].float_val[0])
        answers.append(answer)
        results.append(answer)
      except grpc.RpcError as e:
        failures.append(e)
    channel.close()

  threads = [threading.Thread(target=client, args=(answers,)) for answers in per_client]
  try:
    for t in threads:
      t.start()
    lib.wait_for(lambda: len(results) > 20)
    _publish(base, 2, tmp_path, b=3.0)
    lib.wait_for(lambda: _states(server.model, "m")[1].state == State.END)
    seen = len(results)
    lib.wait_for(lambda: len(results) > seen + 20)
    stop.set()
    for t in threads:
      t.join()
    assert not failures, failures[:3]
    assert set(results) == {(1, 3.0), (2, 4.0)}
    for answers in per_client:  # Once a client sees version 2, it stays.
      assert answers == sorted(answers), answers
    assert _predict(server.predict, "m").model_spec.version.value == 2
    states = _states(server.model, "m")
    assert states[2].state == State.AVAILABLE
    assert states[1].status.error_code == 0

    # A version that fails to load leaves version 2 serving.
    lib.write_broken(os.path.join(base, "3"))
    lib.wait_for(
      lambda: _states(server.model, "m").get(3) is not None and _states(server.model, "m")[3].state == State.END
    )
    failed = _states(server.model, "m")[3]
    assert failed.status.error_code != 0
    assert "model: m, version: 3" in failed.status.error_message
    assert _states(server.model, "m")[2].state == State.AVAILABLE
    assert _predict(server.predict, "m").model_spec.version.value == 2

    # So does one whose variables are missing (a half-copied directory): TF's loader would serve it
    # with uninitialised variables.
    os.makedirs(os.path.join(base, "4"))
    shutil.copy(os.path.join(base, "2", "saved_model.pb"), os.path.join(base, "4"))
    lib.wait_for(
      lambda: _states(server.model, "m").get(4) is not None and _states(server.model, "m")[4].state == State.END
    )
    assert "variables/variables.index is missing" in _states(server.model, "m")[4].status.error_message
    assert _predict(server.predict, "m").model_spec.version.value == 2
    shutil.rmtree(os.path.join(base, "4"))

    # Rewriting the broken version retries it.
    shutil.rmtree(os.path.join(base, "3"))
    _publish(base, 3, tmp_path, b=4.0)
    lib.wait_for(lambda: _states(server.model, "m")[3].state == State.AVAILABLE)
    assert _predict(server.predict, "m").outputs["y"].float_val[0] == 5.0
  finally:
    stop.set()
    server.stop()


def _config(*models):
  config = model_server_config_pb2.ModelServerConfig()
  for name, base, versions, labels in models:
    model = config.model_config_list.config.add(name=name, base_path=base, model_platform="tensorflow")
    if versions:
      model.model_version_policy.specific.versions.extend(versions)
    for label, version in labels.items():
      model.version_labels[label] = version
  return config


@pytest.mark.usefixtures("native")
def test_reload_config_and_config_file_polling(tmp_path):
  a = str(tmp_path / "a")
  b = str(tmp_path / "b")
  lib.write_tf2_half_plus_two(os.path.join(a, "1"))
  lib.write_tf2_half_plus_two(os.path.join(a, "2"), b=3.0)
  lib.write_tf1_half_plus_two(os.path.join(b, "7"))
  config_file = tmp_path / "models.config"
  config_file.write_text(str(_config(("a", a, [], {}))))
  server = lib.InProcessServer(
    model_config_file=str(config_file), model_config_file_poll_wait_seconds=1, file_system_poll_wait_seconds=0
  )
  try:
    assert _predict(server.predict, "a").model_spec.version.value == 2

    request = model_management_pb2.ReloadConfigRequest(
      config=_config(("a", a, [1, 2], {"stable": 1, "canary": 2}), ("b", b, [], {}))
    )
    # The file poller re-applies the file every second, as TF Serving's does, so the file must say
    # the same as the RPC or a poll between the two would revert it.
    config_file.write_text(str(request.config))
    response = server.model.HandleReloadConfigRequest(request, timeout=60)
    assert response.status.error_code == 0
    assert _predict(server.predict, "a", label="stable").outputs["y"].float_val[0] == 3.0
    assert _predict(server.predict, "a", label="canary").outputs["y"].float_val[0] == 4.0
    assert _states(server.model, "b")[7].state == State.AVAILABLE

    # A label on a version the new policy would unload is refused, before anything changes.
    bad = model_management_pb2.ReloadConfigRequest(config=_config(("a", a, [1], {"stable": 2}), ("b", b, [], {})))
    with pytest.raises(grpc.RpcError) as info:
      server.model.HandleReloadConfigRequest(bad, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "which is not currently available" in info.value.details()
    assert _states(server.model, "a")[2].state == State.AVAILABLE
    assert _predict(server.predict, "a", label="canary").outputs["y"].float_val[0] == 4.0

    # Editing the config file drops model b (polled every second).
    config_file.write_text(str(_config(("a", a, [], {}))))

    def b_gone():
      try:
        _predict(server.predict, "b")
        return False
      except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND

    lib.wait_for(b_gone)
  finally:
    server.stop()


@pytest.mark.usefixtures("native")
def test_a_reload_asking_back_an_unloading_version_answers_once_it_serves(tmp_path):
  """Reloads to a version not on disk (the model stops serving), then straight back: the second
  reload found the old version still unloading and answered OK while nothing served until the next
  file-system poll. It now reloads that version and answers once it serves."""
  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=base, file_system_poll_wait_seconds=0)
  try:
    for _ in range(3):
      for versions in ([9], []):
        request = model_management_pb2.ReloadConfigRequest(config=_config(("m", base, versions, {})))
        assert server.model.HandleReloadConfigRequest(request, timeout=60).status.error_code == 0
      assert _predict(server.predict, "m").outputs["y"].float_val[0] == 3.0
  finally:
    server.stop()


def test_warmup_replays_and_limits(tmp_path):
  path = str(tmp_path / "1")
  lib.write_tf1_half_plus_two(path)
  lib.write_warmup(path, "m", count=5)
  bundle = loader.load_once("m", 1, path, loader.LoaderOptions())
  try:
    assert warmup.run_warmup(bundle) == 5
  finally:
    bundle.close()
  lib.write_warmup(path, "m", count=warmup.MAX_WARMUP_RECORDS + 1)
  with pytest.raises(errors.ServingError) as info:
    loader.load_once("m", 1, path, loader.LoaderOptions())
  assert "exceeds the maximum (1000)" in info.value.message


def test_warmup_stops_between_records_once_the_server_stops(tmp_path, monkeypatch):
  """SIGTERM during a batched warm-up waited out every record's batch timeout (up to 1000 of them):
  the replay now ends before the next record, and the load fails CANCELLED."""
  path = str(tmp_path / "1")
  lib.write_tf1_half_plus_two(path)
  lib.write_warmup(path, "m", count=50)
  stop = threading.Event()
  replayed = []
  real_replay = warmup._replay

  def replay_then_stop(bundle, log):
    real_replay(bundle, log)
    replayed.append(log)
    if len(replayed) == 2:
      stop.set()

  monkeypatch.setattr(warmup, "_replay", replay_then_stop)
  with pytest.raises(errors.ServingError) as info:
    loader.load_once("m", 1, path, loader.LoaderOptions(), stop)
  assert info.value.code == grpc.StatusCode.CANCELLED
  assert "the server is stopping" in info.value.message
  assert len(replayed) == 2


@pytest.mark.parametrize(
  "policy, expected",
  [
    ("", {3}),
    ("latest { num_versions: 2 }", {2, 3}),
    ("all {}", {1, 2, 3}),
    ("specific { versions: 1 versions: 5 }", {1}),
  ],
)
def test_version_policies(policy, expected):
  config = text_format.Parse(
    f"name: 'm' base_path: '/x' model_version_policy {{ {policy} }}" if policy else "name: 'm' base_path: '/x'",
    model_server_config_pb2.ModelConfig(),
  )
  on_disk = {1: "/x/1", 2: "/x/2", 3: "/x/3"}
  assert file_system_source.aspired_versions(on_disk, config) == expected


def test_unloaded_version_is_freed_at_unload(tmp_path):
  """The old graph goes at unload, not at some later full collection."""
  import gc  # pylint: disable=g-import-not-at-top
  import weakref  # pylint: disable=g-import-not-at-top

  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  server = lib.InProcessServer(model_name="m", model_base_path=base, file_system_poll_wait_seconds=0.2)
  gc.disable()  # Only the unload's own collection may free it.
  try:
    (manager,) = server.server.core.managers()
    with manager.handle("m") as bundle:
      old_graph = weakref.ref(bundle._imported.graph)  # pylint: disable=protected-access
    del bundle
    _publish(base, 2, tmp_path)
    lib.wait_for(lambda: _states(server.model, "m")[1].state == State.END)
    assert old_graph() is None
  finally:
    gc.enable()
    server.stop()


def test_load_gives_the_load_thread_back_its_cpus_and_priority(tmp_path):
  """The restore and warm-up run on one CPU at idle priority; the thread gets
  its CPUs and scheduling policy back."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top

  if not hasattr(os, "sched_getaffinity") or not hasattr(os, "SCHED_IDLE"):
    pytest.skip("no CPU affinity or SCHED_IDLE on this platform")
  before = os.sched_getaffinity(0), os.sched_getscheduler(0)
  with saved_model_bundle.background_load():
    assert len(os.sched_getaffinity(0)) == 1 or len(before[0]) == 1
    with saved_model_bundle.idle_priority():
      idle = saved_model_bundle._can_leave_idle_priority()  # pylint: disable=protected-access
      assert (os.sched_getscheduler(0) == os.SCHED_IDLE) == idle
    assert os.sched_getscheduler(0) == before[1]
  path = lib.write_tf2_half_plus_two(str(tmp_path / "1"))
  bundle = saved_model_bundle.SavedModelBundle("m", 1, path)
  try:
    assert (os.sched_getaffinity(0), os.sched_getscheduler(0)) == before
    name = bundle.signature_defs["serving_default"].inputs["x"].name
    fetch = bundle.signature_defs["serving_default"].outputs["y"].name
    assert bundle.session_run({name: [2.0]}, [fetch])[0].tolist() == [3.0]
  finally:
    bundle.close()


def test_close_tears_the_session_down_at_idle_priority(tmp_path):
  """An unload's teardown frees at idle priority (where the thread may go back),
  so the serving version's runs keep the malloc arena; the thread's policy is
  restored afterwards."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top

  if not hasattr(os, "SCHED_IDLE"):
    pytest.skip("no SCHED_IDLE on this platform")
  before = os.sched_getscheduler(0)
  bundle = saved_model_bundle.SavedModelBundle("m", 1, lib.write_tf2_half_plus_two(str(tmp_path / "1")))
  session = bundle._session  # pylint: disable=protected-access
  policies = []
  close_session = session.close

  def recording_close():
    policies.append(os.sched_getscheduler(0))
    close_session()

  session.close = recording_close
  bundle.close()
  idle = saved_model_bundle._can_leave_idle_priority()  # pylint: disable=protected-access
  assert policies == [os.SCHED_IDLE if idle else before]
  assert os.sched_getscheduler(0) == before


def test_versions_with_one_saved_model_pb_share_the_graph(tmp_path):
  """An index refresh's version (N's saved_model.pb, new variables) reuses N's
  imported graph, with its own session and variables."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top

  first = lib.write_tf2_half_plus_two(str(tmp_path / "1"))
  other = lib.write_tf2_half_plus_two(str(tmp_path / "other"), a=1.0, b=0.0)
  second = str(tmp_path / "2")
  shutil.copytree(first, second, ignore=shutil.ignore_patterns("variables"))
  shutil.copytree(os.path.join(other, "variables"), os.path.join(second, "variables"))

  def answer(bundle):
    signature = bundle.signature_defs["serving_default"]
    return bundle.session_run({signature.inputs["x"].name: [2.0]}, [signature.outputs["y"].name])[0].tolist()

  bundles = [
    saved_model_bundle.SavedModelBundle("m", version, path) for version, path in [(1, first), (2, second), (3, other)]
  ]
  try:
    graphs = [bundle._imported.graph for bundle in bundles]  # pylint: disable=protected-access
    assert graphs[0] is graphs[1]  # Same saved_model.pb: imported once.
    assert graphs[2] is not graphs[0]  # Traced again: its own graph.
    assert [answer(bundle) for bundle in bundles] == [[3.0], [2.0], [2.0]]
    bundles[0].close()
    assert answer(bundles[1]) == [2.0]  # Closing one session leaves the other's variables.
  finally:
    for bundle in bundles:
      bundle.close()


def test_first_load_is_rehearsed_when_freed_memory_is_retained(tmp_path):
  """The first version loads once more and unloads before it serves (its
  freed memory then serves the next version); later versions load once."""
  from serving.servables import saved_model_bundle  # pylint: disable=g-import-not-at-top

  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  loads = []
  original = saved_model_bundle.SavedModelBundle.__init__

  def counting_init(self, name, version, *args, **kwargs):
    loads.append(version)
    original(self, name, version, *args, **kwargs)

  saved_model_bundle.SavedModelBundle.__init__ = counting_init
  try:
    server = lib.InProcessServer(
      model_name="m", model_base_path=base, retain_freed_memory=True, file_system_poll_wait_seconds=0.2
    )
    try:
      assert loads == [1, 1]
      assert _predict(server.predict, "m").outputs["y"].float_val == [3.0]
      _publish(base, 2, tmp_path)
      lib.wait_for(lambda: _states(server.model, "m")[1].state == State.END)
      assert loads == [1, 1, 2]
    finally:
      server.stop()
  finally:
    saved_model_bundle.SavedModelBundle.__init__ = original


@pytest.mark.parametrize(
  "argv, retained",
  [
    (["--port=0"], True),  # On by default: see runtime.retain_freed_memory.
    (["--retain_freed_memory"], True),
    (["--retain_freed_memory=true"], True),
    (["--retain_freed_memory", "--noretain_freed_memory"], False),  # The last one wins.
    (["--noretain_freed_memory", "--retain_freed_memory=1"], True),
    (["--retain_freed_memory=false"], False),
    # Every spelling absl's boolean parser takes (these were read as "on").
    (["--retain_freed_memory=FALSE"], False),
    (["--retain_freed_memory=f"], False),
    (["-retain_freed_memory=0"], False),
    (["-noretain_freed_memory"], False),
    (["--noretain_freed_memory", "--retain_freed_memory=T"], True),
  ],
)
def test_retained_memory_follows_the_flag_read_before_tensorflow(argv, retained):
  from serving.util import runtime  # pylint: disable=g-import-not-at-top

  assert runtime.retain_requested(argv) == retained


def test_a_path_no_file_system_holds_lists_no_versions():
  assert file_system_source.list_versions("/tmp/x\0y") == {}


@pytest.mark.usefixtures("native")
def test_a_bad_config_changes_nothing_and_polling_goes_on(tmp_path, caplog, monkeypatch):
  """A base_path with a NUL byte: the reload RPC answers INVALID_ARGUMENT with the model untouched;
  as a --model_config_file it is logged once and a later valid file is still applied. A poll of
  the base paths that raises is logged once per distinct error, and polling goes on."""
  a = str(tmp_path / "a")
  lib.write_tf2_half_plus_two(os.path.join(a, "1"))
  config_file = tmp_path / "models.config"
  config_file.write_text(str(_config(("a", a, [], {}))))
  server = lib.InProcessServer(
    model_config_file=str(config_file), model_config_file_poll_wait_seconds=0.2, file_system_poll_wait_seconds=0.2
  )
  caplog.set_level(logging.INFO, logger="absl")
  core = server.server.core
  config_reads = _counting(monkeypatch, server.server, "_model_server_config")
  try:
    bad = _config(("a", "/tmp/x\0y", [], {}))
    with pytest.raises(grpc.RpcError) as info:
      server.model.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL byte" in info.value.details()
    assert core.config.model_config_list.config[0].base_path == a
    assert [m.config.base_path for m in core.managers()] == [a]
    assert _predict(server.predict, "a").outputs["y"].float_val[0] == 3.0

    def failures():
      return [r for r in caplog.records if "Reloading" in r.getMessage() and "NUL byte" in r.getMessage()]

    config_file.write_text(str(bad))
    lib.wait_for(failures)
    _wait_for_more_calls(config_reads, 2)  # At least one more whole poll of the same bad file.
    assert len(failures()) == 1
    b = str(tmp_path / "b")
    lib.write_tf1_half_plus_two(os.path.join(b, "7"))
    config_file.write_text(str(_config(("a", a, [], {}), ("b", b, [], {}))))

    def b_available():
      try:
        return _states(server.model, "b")[7].state == State.AVAILABLE
      except (grpc.RpcError, KeyError):  # Not configured, or not found on disk, yet.
        return False

    lib.wait_for(b_available)

    listings_of_a = []

    def broken_listing(base_path):
      if base_path == a:
        listings_of_a.append(base_path)
      raise RuntimeError("listing broke")

    def logged(text):
      return [r for r in caplog.records if text in r.getMessage()]

    with monkeypatch.context() as patch:
      patch.setattr(file_system_source, "list_versions", broken_listing)
      lib.wait_for(lambda: logged("Polling model a failed"))
      _wait_for_more_calls(listings_of_a, 3)  # Several more polls, the same error.
      assert len(logged("Polling model a failed")) == 1
    lib.wait_for(lambda: logged("Polling model a works again"))
    assert _predict(server.predict, "a").outputs["y"].float_val[0] == 3.0
  finally:
    server.stop()


def _counting(monkeypatch, owner, name: str) -> list[tuple]:
  """Has `owner.name` record the arguments of each call (then run as before); returns the record."""
  calls = []
  real = getattr(owner, name)

  def counting(*args):
    calls.append(args)
    return real(*args)

  monkeypatch.setattr(owner, name, counting)
  return calls


def _wait_for_more_calls(calls: list, more: int) -> None:
  """Waits for `more` calls past those in `calls` now: with `more` >= 2, the one before the last has
  returned, so a poll that started after this call has run whole (a poller makes one call per poll).

  A count, not a sleep: a loaded machine cannot make the wait cover fewer polls than it says.
  """
  seen = len(calls)
  lib.wait_for(lambda: len(calls) >= seen + more)


def _retrying_server(
  tmp_path, poll_seconds: float, retries: int, interval_micros: int
) -> tuple[str, lib.InProcessServer]:
  """Model "m" serving version 1 from <tmp_path>/m, polled every `poll_seconds`, with load retries."""
  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  server = lib.InProcessServer(
    model_name="m",
    model_base_path=base,
    file_system_poll_wait_seconds=poll_seconds,
    max_num_load_retries=retries,
    load_retry_interval_micros=interval_micros,
  )
  return base, server


class _LoadAttempts:
  """Counts `loader.load_once` calls (the manager's load attempts) and their failures, per version."""

  def __init__(self, monkeypatch):
    self.started: collections.Counter = collections.Counter()
    self.failed: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    real = loader.load_once

    def counting(name, version, *args, **kwargs):
      with self._lock:
        self.started[version] += 1
      try:
        return real(name, version, *args, **kwargs)
      except errors.ServingError:
        with self._lock:
          self.failed[version] += 1
        raise

    monkeypatch.setattr(loader, "load_once", counting)


def _write_incomplete(base, version, source):
  """A half-copied version: `source`'s saved_model.pb without its variables (fails to load)."""
  os.makedirs(os.path.join(base, str(version)))
  shutil.copy(os.path.join(base, str(source), "saved_model.pb"), os.path.join(base, str(version)))


_MISSING_VARIABLES = "variables/variables.index is missing"
# Far longer than any wait below: a version that waited for a retry would fail the test.
_HOUR_MICROS = 3600 * 10**6


@pytest.mark.usefixtures("native")
def test_a_failing_version_that_leaves_the_aspired_set_stops_retrying(tmp_path, monkeypatch):
  """A failed version is retried only while aspired, as TF Serving's CancelLoadServableRetry: removed
  from disk, or superseded by a newer version under latest-1, it ends at the next poll with its load
  error, and the newer version loads at once instead of after the retries (an hour apart here). Back in
  the aspired set, it is tried again. The native data plane serves the new version too (`native`)."""
  attempts = _LoadAttempts(monkeypatch)
  base, server = _retrying_server(tmp_path, poll_seconds=0.2, retries=5, interval_micros=_HOUR_MICROS)
  (manager,) = server.server.core.managers()
  try:

    def state(version):
      return _state(server.model, "m", version)

    # Removed from disk while it waits for a retry.
    _write_incomplete(base, 2, source=1)
    lib.wait_for(lambda: attempts.failed[2] == 1)
    shutil.rmtree(os.path.join(base, "2"))
    lib.wait_for(lambda: state(2) == State.END)
    assert _MISSING_VARIABLES in _states(server.model, "m")[2].status.error_message
    assert attempts.started[2] == 1
    assert _predict(server.predict, "m").model_spec.version.value == 1

    # Superseded by a complete newer version.
    _write_incomplete(base, 3, source=1)
    lib.wait_for(lambda: attempts.failed[3] == 1)
    _publish(base, 4, tmp_path, b=3.0)
    lib.wait_for(lambda: state(4) == State.AVAILABLE)
    response = _predict(server.predict, "m")
    assert (response.model_spec.version.value, response.outputs["y"].float_val[0]) == (4, 4.0)
    failed = _states(server.model, "m")[3]
    assert failed.state == State.END and _MISSING_VARIABLES in failed.status.error_message
    assert "model: m, version: 3" in failed.status.error_message
    assert attempts.started[3] == 1
    lib.wait_for(lambda: state(1) == State.END)  # Unloaded once version 4 served.

    # Aspired again (version 4 deleted, as a rollback by hand): version 3 is tried again and waits
    # for its retry, while version 4 keeps serving.
    shutil.rmtree(os.path.join(base, "4"))
    lib.wait_for(lambda: attempts.failed[3] == 2)
    assert state(3) == State.LOADING
    assert _predict(server.predict, "m").model_spec.version.value == 4
  finally:
    server.stop()
  # Stopping ended the pending retry rather than leaving it for an hour.
  assert {v: s for v, s, _ in manager.version_states()}[3] == State.END


@pytest.mark.usefixtures("native")
def test_a_failing_version_still_aspired_retries_up_to_its_limit(tmp_path, monkeypatch):
  """An aspired version that keeps failing is tried 1 + max_num_load_retries times, then ends with its
  error; the version serving before keeps serving, and later polls do not try it again."""
  attempts = _LoadAttempts(monkeypatch)
  base, server = _retrying_server(tmp_path, poll_seconds=0.1, retries=2, interval_micros=200_000)
  try:
    _write_incomplete(base, 2, source=1)
    lib.wait_for(lambda: _state(server.model, "m", 2) == State.END)
    assert attempts.started[2] == 3
    assert _MISSING_VARIABLES in _states(server.model, "m")[2].status.error_message
    assert _predict(server.predict, "m").model_spec.version.value == 1
    _wait_for_more_calls(_counting(monkeypatch, file_system_source, "list_versions"), 3)  # Several more polls.
    assert attempts.started[2] == 3
  finally:
    server.stop()


@pytest.mark.usefixtures("native")
def test_a_version_waiting_for_a_retry_holds_no_load_thread(tmp_path, monkeypatch):
  """Under latest-2 both a failing version and a newer complete one are aspired: the failing one keeps
  its retries (an hour apart here), and the newer one loads meanwhile on the only load thread."""
  attempts = _LoadAttempts(monkeypatch)
  base = str(tmp_path / "m")
  lib.write_tf2_half_plus_two(os.path.join(base, "1"))
  config_file = tmp_path / "models.config"
  config_file.write_text(
    f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: "tensorflow" '
    "model_version_policy { latest { num_versions: 2 } } } }"
  )
  server = lib.InProcessServer(
    model_config_file=str(config_file),
    file_system_poll_wait_seconds=0.2,
    max_num_load_retries=5,
    load_retry_interval_micros=_HOUR_MICROS,
  )
  try:
    _write_incomplete(base, 2, source=1)
    lib.wait_for(lambda: attempts.failed[2] == 1)
    _publish(base, 3, tmp_path, b=3.0)
    lib.wait_for(lambda: _state(server.model, "m", 3) == State.AVAILABLE)
    assert _predict(server.predict, "m").model_spec.version.value == 3
    states = _states(server.model, "m")
    assert states[2].state == State.LOADING  # Still aspired: its retries go on.
    assert attempts.started[2] == 1
  finally:
    server.stop()


def test_a_queued_load_no_longer_aspired_is_never_tried(tmp_path, monkeypatch):
  """With one load thread busy, version 2 waits in the queue; version 3 appears (latest-1) before
  its turn, so version 2 ends CANCELLED without a load attempt. Version 1, whose attempt was already
  running when it stopped being aspired, finishes it and serves until version 3 does."""
  gate = threading.Event()
  started = []

  class FakeBundle:
    def __init__(self, version):
      self.version = version

    def context(self):
      return f"model: m, version: {self.version}"

    def close(self):
      pass

  def fake_load_once(name, version, path, options, stop=None):
    started.append(version)
    if version == 1:
      gate.wait(60)
    return FakeBundle(version)

  monkeypatch.setattr(loader, "load_once", fake_load_once)
  base = tmp_path / "m"
  config = model_server_config_pb2.ModelConfig(name="m", base_path=str(base))
  load_pool = concurrent.futures.ThreadPoolExecutor(1)
  unload_pool = concurrent.futures.ThreadPoolExecutor(1)
  manager = model_manager.ModelManager(
    config,
    loader.LoaderOptions(enable_warmup=False),
    load_pool,
    unload_pool,
    aspired_versions_policy.AvailabilityPreservingPolicy(),
  )

  def add_version(version):
    (base / str(version)).mkdir(parents=True)
    (base / str(version) / "saved_model.pb").write_bytes(b"")
    manager.poll()

  try:
    add_version(1)
    lib.wait_for(lambda: started == [1])
    add_version(2)
    add_version(3)
    gate.set()
    assert manager.wait_until_settled(timeout=60)
    lib.wait_for(lambda: manager.available_versions() == [3])
    assert started == [1, 3]
    states = {v: (s, e) for v, s, e in manager.version_states()}
    assert states[2][0] == State.END and states[2][1].code == grpc.StatusCode.CANCELLED
    lib.wait_for(lambda: {v: s for v, s, _ in manager.version_states()}[1] == State.END)
  finally:
    gate.set()
    manager.stop()
    manager.wait_until_unloaded(60)
    load_pool.shutdown()
    unload_pool.shutdown()
