"""fgr-loadtest: histogram accuracy, coordinated-omission correction, open/closed loops and reports."""

import collections
import json
import os
import re

import numpy as np
import pytest
import serving_testlib as lib
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from tensorflow_serving.apis import prediction_log_pb2

from bench import echo_server
from clients.loadtest import driver, histogram, loadtest_cli, report, request_source

FEATURES = {"user_id": "u1", "query_tokens": ["red", "shoes"]}


@pytest.fixture(scope="module")
def echo():
  server, port = echo_server.start(max_workers=4, response=echo_server.fixed_response(10))
  yield f"127.0.0.1:{port}"
  server.stop(grace=1)


@pytest.fixture(scope="module")
def requests():
  return [request_source.features_request(FEATURES)]


def test_histogram_percentiles_match_numpy():
  values = np.random.default_rng(0).lognormal(mean=-6.0, sigma=1.2, size=20_000)  # Seconds, ~2.5 ms median.
  hist = histogram.LatencyHistogram()
  for v in values:
    hist.record(float(v))
  assert hist.count == len(values)
  for p in (50, 90, 99, 99.9):
    expected = np.percentile(values, p, method="inverted_cdf")
    # 3 significant digits, plus half a microsecond of rounding.
    assert hist.percentile(p) == pytest.approx(expected, rel=2e-3, abs=1e-6), p
  summary = hist.summary_ms()
  assert summary["p999"] == pytest.approx(np.percentile(values, 99.9) * 1e3, rel=2e-3)
  assert summary["max"] == pytest.approx(values.max() * 1e3, rel=1e-3)


def test_timeline_percentiles_per_second_come_from_hdr_histograms():
  rng = np.random.default_rng(1)
  latencies = rng.lognormal(mean=-6.0, sigma=1.0, size=2_000)  # Seconds.
  intended = np.repeat([0.2, 1.5], 1_000)  # Two one-second buckets.
  ok = np.ones(2_000, dtype=bool)
  ok[::10] = False
  result = driver.LoadResult(
    spec=driver.LoadSpec(duration_seconds=2.0, warmup_seconds=0.0, progress=False),
    target="t",
    started_at="",
    latency=histogram.LatencyHistogram(),
    service=histogram.LatencyHistogram(),
    send_lag=histogram.LatencyHistogram(),
    statuses=collections.Counter(),
    sent=2_000,
    cancelled=0,
    measured_seconds=2.0,
    intended=intended,
    latencies=latencies,
    ok=ok,
  )
  rows = report.timeline(result)
  assert [(row["t"], row["requests"], row["errors"]) for row in rows] == [(0.0, 1_000, 100), (1.0, 1_000, 100)]
  for row, bucket in zip(rows, (slice(0, 1_000), slice(1_000, 2_000))):
    good = latencies[bucket][ok[bucket]]
    # HdrHistogram's 3 significant digits, plus rounding to the microsecond and the reported 0.001 ms.
    for key, expected in (
      ("p50_ms", np.percentile(good, 50, method="inverted_cdf")),
      ("p99_ms", np.percentile(good, 99, method="inverted_cdf")),
      ("max_ms", good.max()),
    ):
      assert row[key] == pytest.approx(expected * 1e3, rel=2e-3, abs=2e-3), key


def test_open_loop_against_echo(echo, requests):
  spec = driver.LoadSpec(mode="open", qps=200, warmup_seconds=0.5, duration_seconds=1.5, progress=False)
  result = driver.run(driver.GrpcPredictTarget(echo), requests, spec)
  assert result.sent == 400  # Counted from the schedule, however late the sends.
  assert result.successes == 300 and not result.errors
  # At most the offered rate: the period measured is at least 1.5 s (give or take float rounding). How close
  # it comes depends on the machine.
  assert result.measured_seconds > 1.5 - 1e-6
  assert 0 < result.throughput < 200 + 1e-3
  assert 0 < result.percentile_ms(50) <= result.percentile_ms(99) <= result.latency.summary_ms()["max"]


def test_closed_loop_against_echo(echo, requests):
  spec = driver.LoadSpec(mode="closed", concurrency=4, warmup_seconds=0.3, duration_seconds=1.0, progress=False)
  result = driver.run(driver.GrpcPredictTarget(echo, channels=2), requests, spec)
  assert result.successes > 0 and not result.errors
  assert result.throughput == pytest.approx(result.successes / result.measured_seconds)
  # Closed loop sends the next request when the previous answer arrives: it never runs behind a schedule,
  # so the typical send lag is less than the typical round trip it would otherwise queue behind.
  assert result.send_lag.count == result.successes
  assert result.send_lag.percentile(50) < result.service.percentile(50)


def test_max_requests_bounds_a_closed_loop(echo, requests):
  # The duration is only an upper bound: the run ends at the 20th request, however slow the machine.
  spec = driver.LoadSpec(
    mode="closed", concurrency=2, warmup_seconds=0, duration_seconds=600, max_requests=20, progress=False
  )
  assert driver.run(driver.GrpcPredictTarget(echo), requests, spec).sent == 20


def test_stalled_server_shows_in_percentiles(requests):
  """A 0.5 s stall a quarter of the way into a 2 s run delays a quarter of the requests.

  With one outstanding request allowed, the sender is blocked during the stall just like a synchronous
  client. Measured from actual send times (what an uncorrected tool reports) only one request looks slow;
  measured from intended send times, the queued-up requests show a linear ramp of 500 ms down to 0.
  """
  server, port = echo_server.start(
    max_workers=1, response=echo_server.fixed_response(10), stall_after=100, stall_seconds=0.5
  )
  try:
    spec = driver.LoadSpec(
      mode="open", qps=200, warmup_seconds=0, duration_seconds=2.0, max_in_flight=1, progress=False
    )
    result = driver.run(driver.GrpcPredictTarget(f"127.0.0.1:{port}"), requests, spec)
  finally:
    server.stop(grace=1)
  # Only lower bounds on times: the stall guarantees them, a slow machine only adds to them.
  assert result.successes == 400
  assert result.service.percentile(99.9) >= 0.45  # The one request that hit the stall...
  assert result.latency.percentile(90) >= 0.2  # ...but, corrected, >= 15% of requests waited >= 200 ms,
  assert result.latency.percentile(99) >= 0.4
  assert result.send_lag.percentile(90) >= 0.2  # having been sent late.
  # The uncorrected view hides the stall: its p90 is below the corrected one.
  assert result.service.percentile(90) < result.latency.percentile(90)


def test_errors_are_counted_by_status_code(requests):
  spec = driver.LoadSpec(mode="open", qps=40, warmup_seconds=0, duration_seconds=0.5, progress=False)
  with lib.refusing_port() as port:  # Held for the run: no one else can listen there.
    result = driver.run(driver.GrpcPredictTarget(f"127.0.0.1:{port}", timeout=60), requests, spec)
  assert result.successes == 0
  assert result.errors == {"UNAVAILABLE": 20}


def test_features_are_sent_as_utf8_and_bad_values_are_named():
  request = request_source.features_request({"text": "héllo", "query_tokens": ["口红", b"\xff"], "user_id": 7})
  assert tf.make_ndarray(request.inputs["text"]).tolist() == ["héllo".encode()]
  assert tf.make_ndarray(request.inputs["query_tokens"]).tolist() == [["口红".encode(), b"\xff"]]
  assert tf.make_ndarray(request.inputs["user_id"]).tolist() == [b"7"]
  assert tf.make_ndarray(request_source.features_request({"hist_ids": []}).inputs["hist_ids"]).shape == (1, 0)
  for value, message in (
    ([["a"], ["b", "c"]], "feature 'text': nested lists must all have the same length"),
    (["a", ["b"]], "feature 'text': nested lists must all have the same length"),
    ({"a": "b"}, "feature 'text': values must be strings or lists of strings, got dict"),
    (None, "got NoneType"),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      request_source.features_request({"text": value})


def test_limits_that_would_hang_or_fail_every_call_are_refused():
  """max_in_flight=0 left the open-loop sender waiting forever; channels=0 failed each call in the client,
  counted as UNKNOWN:ZeroDivisionError server errors."""
  for limits, message in (
    ({"max_in_flight": 0}, "max_in_flight must be >= 1, got 0"),
    ({"max_requests": 0}, "max_requests must be >= 1"),
    ({"drain_seconds": -1.0}, "drain_seconds must be >= 0"),
  ):
    with pytest.raises(ValueError, match=message):
      driver.LoadSpec(**limits)
  with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
    driver.GrpcPredictTarget("127.0.0.1:1", channels=0)
  with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
    driver.GrpcPredictTarget("127.0.0.1:1", timeout=0)
  # fgr-loadtest refuses them when it parses its flags.
  for flag, message in (
    ("--max_in_flight=0", "--max_in_flight=0: 0 is not a positive integer"),
    ("--channels=0", "--channels=0: 0 is not a positive integer"),
    ("--max_requests=0", "--max_requests=0: 0 is not a positive integer"),
    ("--timeout=0", "--timeout must be more than 0 seconds"),
  ):
    with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError, match=message):
      flags.FLAGS(["fgr-loadtest", flag])


def test_request_files_round_trip(tmp_path, requests):
  jsonl = tmp_path / "r.jsonl"
  jsonl.write_text(json.dumps(FEATURES) + "\n\n" + json.dumps({"user_id": "u2"}) + "\n")
  from_json = request_source.read_requests_file(str(jsonl))
  assert len(from_json) == 2 and from_json[0] == requests[0]
  assert tf.make_ndarray(from_json[0].inputs["query_tokens"]).shape == (1, 2)
  addressed = request_source.with_model_spec(from_json, "ads", "encode_query", 3)
  assert addressed[0].model_spec.name == "ads" and addressed[0].model_spec.version.value == 3
  assert not from_json[0].model_spec.name  # Copies, not edits.

  records = tmp_path / "r.tfrecord"
  with tf.io.TFRecordWriter(str(records)) as writer:
    writer.write(requests[0].SerializeToString())
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=addressed[1]))
    writer.write(log.SerializeToString())
  from_records = request_source.read_requests_file(str(records))
  assert from_records == [requests[0], addressed[1]]
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="holds no requests"):
    request_source.read_requests_file(str(empty))
  # fgr-loadtest and fgr-query read feature lines alike: a bad one is named by file and line.
  for text, message in (
    ('{"user_id": "u1"}\n{not json\n', r"bad.jsonl:2: not JSON \(Expecting property name"),
    ('["t1"]\n', "bad.jsonl:1: a request must be a JSON object of features"),
  ):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
      request_source.read_requests_file(str(bad))


def test_bad_request_files_are_value_errors_naming_the_file(tmp_path, requests):
  """What the clients' launcher prints in one line (`<tool>: error: ...`) instead of a traceback."""
  ragged = tmp_path / "ragged.jsonl"
  ragged.write_text('{"text": "a"}\n\n{"text": [["a"], ["b", "c"]]}\n')
  latin1 = tmp_path / "latin1.jsonl"
  latin1.write_bytes('{"text": "a"}\n{"text": "h\u00e9llo"}\n'.encode("latin-1"))
  empty = tmp_path / "empty.tfrecord"
  tf.io.TFRecordWriter(str(empty)).close()
  text = tmp_path / "requests.txt"  # JSONL under a name read as TFRecord.
  text.write_text(json.dumps(FEATURES) * 20 + "\n")
  not_a_request = tmp_path / "other.tfrecord"
  with tf.io.TFRecordWriter(str(not_a_request)) as writer:
    writer.write(requests[0].SerializeToString())
    writer.write(b"\xff\xff\xff")
  for path, message in (
    (tmp_path / "missing.jsonl", f"cannot read {tmp_path}/missing.jsonl: No such file or directory"),
    (tmp_path / "missing.tfrecord", f"cannot read {tmp_path}/missing.tfrecord: No such file or directory"),
    (tmp_path, f"cannot read {tmp_path}: Is a directory"),
    (ragged, f"{ragged}:3: feature 'text': nested lists must all have the same length"),
    (latin1, f"{latin1}:2: not UTF-8 text"),
    (empty, f"{empty} holds no requests"),
    (text, f"{text} is not a TFRecord file (corrupted record at 0"),
    (not_a_request, f"{not_a_request}: record 2: neither a PredictionLog with a Predict request nor a PredictRequest"),
  ):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      request_source.read_requests_file(str(path))
  with pytest.raises(ValueError, match="^" + re.escape(f"cannot read {tmp_path}: Is a directory")):
    request_source.read_feature_lines(str(tmp_path))  # fgr-query's reader.
  with pytest.raises(ValueError, match=re.escape(f"{ragged}:3: feature 'text'")):
    request_source.read_feature_lines(str(ragged))


def test_cli_writes_json_report_and_plot(echo, tmp_path):
  requests_file = tmp_path / "r.jsonl"
  requests_file.write_text(json.dumps(FEATURES) + "\n")
  prefix = str(tmp_path / "out" / "run")
  flags.FLAGS(["fgr-loadtest"])
  with flagsaver.flagsaver(
    server=echo,
    requests_file=str(requests_file),
    mode="open",
    qps=100,
    warmup_seconds=0.2,
    duration_seconds=1.0,
    output_prefix=prefix,
    progress=True,
  ):
    loadtest_cli.main(["fgr-loadtest"])
  with open(prefix + ".json") as f:
    data = json.load(f)
  assert data["mode"] == "open" and data["offered_qps"] == 100 and data["concurrency"] is None
  assert data["requests"]["ok"] == 100 and data["errors"] == {}
  # At most the offered rate: the period measured is at least 1 s (give or take float rounding).
  assert 0 < data["throughput_qps"] < 100 + 1e-6
  assert set(data["latency_ms"]) == {"count", "min", "mean", "p50", "p90", "p99", "p999", "max"}
  assert data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["p999"]
  assert data["coordinated_omission_corrected"] is True
  assert data["model_name"] == "retrieval" and data["num_distinct_requests"] == 1
  assert [row["t"] for row in data["timeline"]] == [0.0, 1.0]
  assert os.path.getsize(prefix + ".png") > 10_000


def test_the_progress_bar_draws_each_tick_once(capsys):
  """Its phase was set with a redraw of the previous tick's figures, then the tick drawn: each state
  was drawn twice, which a log of stderr (a CI job's) showed as every line written twice."""
  spec = driver.LoadSpec(warmup_seconds=0.0, duration_seconds=10.0)

  async def tick_a_few_times():
    start = driver.time.perf_counter()
    recorder = driver._Recorder(start, start, start + spec.duration_seconds)
    progress = driver.asyncio.create_task(driver._progress(spec, recorder, start + spec.duration_seconds))
    await driver.asyncio.sleep(2.2)
    progress.cancel()
    await driver.asyncio.gather(progress, return_exceptions=True)

  driver.asyncio.run(tick_a_few_times())
  draws = [draw.strip() for draw in capsys.readouterr().err.split("\r") if draw.strip()]
  ticks = draws[:-1]  # The last is the bar's close, which draws the final state again to leave it.
  assert len(ticks) >= 3 and sum("measure" in draw for draw in ticks) >= 2, draws
  assert [a for a, b in zip(ticks, ticks[1:]) if a == b] == [], draws
