"""Test helpers for fgr-serve: y = a*x + b SavedModels and servers to drive.

The models mirror TF Serving's half_plus_two test data: one TF1 graph export
through tf.compat.v1's SavedModelBuilder, one `tf.saved_model.save` export.
"""

import contextlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TF1_MODEL = "half_plus_two"
TF2_MODEL = "half_plus_two_tf2"
KERAS_MODEL = "half_plus_two_keras"
SCANN_MODEL = "scann_search"
SCANN_DATABASE = np.random.default_rng(0).normal(size=(200, 8)).astype("f4")
TF1_VERSION = 123


# --rest_api_port value for a kernel-chosen port (server.REST_API_ANY_PORT).
REST_ANY_PORT = -1

# --native for the servers started here unless told otherwise: the `native` fixture sets it per
# test; FGR_TEST_NATIVE=on runs every test's servers on the native data plane.
NATIVE = os.environ.get("FGR_TEST_NATIVE", "off")


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
  """A loopback port where connections are refused, for as long as it's open.

  The socket is bound but never listens: connects get a reset, and nothing
  else can bind the port meanwhile (a port merely found free could be taken).
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]


def self_signed_cert(directory: str, names: Sequence[str] = ("localhost", "127.0.0.1")) -> tuple[str, str]:
  """(key path, certificate path) of a new self-signed certificate for `names` (host names or IP
  addresses, the first also its CN), as PEM files in `directory`; skips the test without `openssl`.

  Self-signed, it is its own root: a client trusts it as such, and a server's SSLConfig custom_ca can
  be a client's certificate.
  """
  if shutil.which("openssl") is None:
    pytest.skip("the openssl command is needed to make a self-signed certificate")
  key, cert = os.path.join(directory, f"{names[0]}.key.pem"), os.path.join(directory, f"{names[0]}.cert.pem")
  alt_names = ",".join(f"IP:{name}" if _is_ip_address(name) else f"DNS:{name}" for name in names)
  subprocess.run(
    ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={names[0]}",
     "-keyout", key, "-out", cert, "-addext", f"subjectAltName={alt_names}"],
    check=True,
    capture_output=True,
  )  # fmt: skip
  return key, cert


def _is_ip_address(name: str) -> bool:
  try:
    ipaddress.ip_address(name)
  except ValueError:
    return False
  return True


def write_tf1_half_plus_two(export_dir: str, a: float = 0.5, b: float = 2.0, c: float = 3.0) -> str:
  """TF1 graph SavedModel (SavedModelBuilder) with TF Serving's signatures.

  Signatures, as in saved_model_half_plus_two: "serving_default" and
  "predict_x_to_y" (Predict x -> y), "classify_x_to_y" (scores),
  "regress_x_to_y" and "regress_x2_to_y3" (Regress on serialized
  tf.Examples with features x and x2).
  """
  graph = tf.Graph()
  with graph.as_default():
    serialized = tf.compat.v1.placeholder(tf.string, [None], name="tf_example")
    features = tf.io.parse_example(
      serialized,
      {"x": tf.io.FixedLenFeature([1], tf.float32), "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])},
    )
    va = tf.compat.v1.Variable(a, name="a")
    vb = tf.compat.v1.Variable(b, name="b")
    vc = tf.compat.v1.Variable(c, name="c")
    x = tf.identity(features["x"], name="x")
    y = tf.add(tf.multiply(va, x), vb, name="y")
    x2 = tf.identity(features["x2"], name="x2")
    y3 = tf.add(tf.multiply(va, x2), vc, name="y3")
    info = tf.compat.v1.saved_model.utils.build_tensor_info
    sig = tf.compat.v1.saved_model.signature_def_utils
    predict = sig.build_signature_def(
      inputs={"x": info(x)}, outputs={"y": info(y)}, method_name="tensorflow/serving/predict"
    )
    predict_two = sig.build_signature_def(
      inputs={"x": info(x)}, outputs={"y": info(y), "x_out": info(x)}, method_name="tensorflow/serving/predict"
    )
    classify = sig.build_signature_def(
      inputs={"inputs": info(serialized)}, outputs={"scores": info(y)}, method_name="tensorflow/serving/classify"
    )
    regress = sig.build_signature_def(
      inputs={"inputs": info(serialized)}, outputs={"outputs": info(y)}, method_name="tensorflow/serving/regress"
    )
    regress_y3 = sig.build_signature_def(
      inputs={"inputs": info(serialized)}, outputs={"outputs": info(y3)}, method_name="tensorflow/serving/regress"
    )
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      builder = tf.compat.v1.saved_model.Builder(export_dir)
      builder.add_meta_graph_and_variables(
        sess,
        ["serve"],
        signature_def_map={
          "serving_default": predict,
          "predict_x_to_y": predict,
          "predict_two_outputs": predict_two,
          "classify_x_to_y": classify,
          "regress_x_to_y": regress,
          "regress_x2_to_y3": regress_y3,
        },
      )
      builder.save()
  return export_dir


class _HalfPlusTwo(tf.Module):
  def __init__(self, a: float, b: float):
    super().__init__()
    self.a = tf.Variable(a)
    self.b = tf.Variable(b)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
  def serve(self, x):
    return {"y": self.a * x + self.b}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
  def echo(self, text):
    return {"text_out": text, "length": tf.strings.length(text), "blob_bytes": text}


def write_tf2_half_plus_two(export_dir: str, a: float = 0.5, b: float = 2.0) -> str:
  """TF2 SavedModel from tf.saved_model.save: x [N] float -> y [N]."""
  module = _HalfPlusTwo(a, b)
  tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve, "echo": module.echo})
  return export_dir


class _Tf2ClassifyRegress(tf.Module):
  """half_plus_two's classify and regress signatures, as TF2 writes them."""

  def _y(self, inputs):
    x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
    return 0.5 * x + 2.0  # [N, 1]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def classify(self, inputs):
    y = self._y(inputs)
    classes = tf.tile(tf.constant([["y", "minus_y"]]), [tf.shape(y)[0], 1])
    return {"classes": classes, "scores": tf.concat([y, -y], axis=1)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def regress(self, inputs):
    return {"outputs": self._y(inputs)}


def write_tf2_classify_regress(export_dir: str) -> str:
  """`tf.saved_model.save` export whose classify/regress-shaped signatures
  ("classify_x_to_y", "regress_x_to_y", on tf.Examples with feature x)
  declare method_name tensorflow/serving/predict, as every TF2 signature."""
  module = _Tf2ClassifyRegress()
  tf.saved_model.save(
    module, export_dir, signatures={"classify_x_to_y": module.classify, "regress_x_to_y": module.regress}
  )
  return export_dir


def write_keras_half_plus_two(export_dir: str) -> str:
  """A Keras model (Dense with kernel 0.5, bias 2) saved as a SavedModel."""
  inputs = tf.keras.Input(shape=(1,), name="x")
  dense = tf.keras.layers.Dense(
    1,
    name="y",
    kernel_initializer=tf.keras.initializers.Constant(0.5),
    bias_initializer=tf.keras.initializers.Constant(2.0),
  )
  model = tf.keras.Model(inputs, dense(inputs))
  tf.saved_model.save(model, export_dir)
  return export_dir


class _ScannSearch(tf.Module):
  """Brute-force ScaNN top-5 by dot product, its index saved as variables."""

  def __init__(self, database):
    super().__init__()
    from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top

    self._ops = scann_ops
    self.state = scann_ops.builder(database, 5, "dot_product").score_brute_force().build().serialize_to_module()

  @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="q")])
  def serve(self, q):
    s = self.state
    handle = self._ops.tensors_to_scann(
      s.dataset,
      s.scann_config,
      s.serialized_partitioner,
      s.datapoint_to_token,
      s.ah_codebook,
      s.hashed_dataset,
      s.int8_dataset,
      s.int8_multipliers,
      s.dp_norms,
    )
    ids, scores = self._ops.scann_search_batched(handle, q, 5, -1, -1, False)
    return {"ids": ids, "scores": scores}


def write_scann_model(export_dir: str, database) -> str:
  """A SavedModel whose graph uses Scann>... ops (stock TF Serving fails)."""
  module = _ScannSearch(database)
  tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
  return export_dir


def write_warmup(export_dir: str, model_name: str, count: int = 3) -> str:
  """Writes assets.extra/tf_serving_warmup_requests with Predict logs."""
  path = os.path.join(export_dir, "assets.extra")
  os.makedirs(path, exist_ok=True)
  path = os.path.join(path, "tf_serving_warmup_requests")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(count):
      request = predict_pb2.PredictRequest()
      request.model_spec.name = model_name
      request.inputs["x"].CopyFrom(tf.make_tensor_proto([[float(i)]], dtype=tf.float32))
      log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())
  return path


def write_broken(export_dir: str) -> str:
  """A version directory whose saved_model.pb is garbage (fails to load)."""
  os.makedirs(export_dir, exist_ok=True)
  with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
    f.write(b"\x00not a saved model\xff" * 4)
  return export_dir


class ServerProcess:
  """An fgr-serve subprocess and clients for it.

  Args:
    args: fgr-serve flags.
    tmp_dir: Where its port file and logs go.
    native: --native (default: NATIVE).
  """

  def __init__(self, args, tmp_dir, native: str | None = None):
    self.port_file = os.path.join(tmp_dir, "ports")
    self.stderr_path = os.path.join(tmp_dir, "stderr.log")
    self.stdout_path = os.path.join(tmp_dir, "stdout.log")
    # PYTHONFAULTHANDLER: SIGABRT dumps every thread's stack (see terminate).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT, PYTHONFAULTHANDLER="1")
    self._stderr = open(self.stderr_path, "wb")
    self._stdout = open(self.stdout_path, "wb")
    self.process = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "serving.model_servers.main",
        "--port=0",
        f"--port_file={self.port_file}",
        "--max_num_load_retries=0",
        f"--native={native or NATIVE}",
      ]
      + args,
      cwd=REPO_ROOT,
      env=env,
      stdout=self._stdout,
      stderr=self._stderr,
    )
    deadline = time.monotonic() + 180
    while not os.path.exists(self.port_file):
      if self.process.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"fgr-serve did not start:\n{self.stderr()}")
      time.sleep(0.1)
    ports = dict(line.split("=") for line in open(self.port_file).read().split())
    self.grpc_port, self.rest_port = int(ports["grpc"]), int(ports["rest"])
    self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
    self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

  def stderr(self) -> str:
    with open(self.stderr_path, "rb") as f:
      return f.read().decode("utf-8", "replace")

  def terminate(self, timeout: float = 60) -> int:
    """Sends SIGTERM and returns the exit code.

    Raises:
      AssertionError: The server did not exit within `timeout`. It is then
        aborted, which dumps its threads' stacks to its log; the message
        holds the end of that log, to show where the shutdown stopped.
    """
    self.channel.close()
    self.process.send_signal(signal.SIGTERM)
    try:
      return self.process.wait(timeout)
    except subprocess.TimeoutExpired as e:
      # No core file from the abort: the stacks are all the test needs.
      resource.prlimit(self.process.pid, resource.RLIMIT_CORE, (0, 0))
      self.process.send_signal(signal.SIGABRT)
      with contextlib.suppress(subprocess.TimeoutExpired):
        self.process.wait(30)
      raise AssertionError(
        f"fgr-serve did not exit within {timeout} s of SIGTERM; the end of its log:\n{self.stderr()[-4000:]}"
      ) from e
    finally:
      if self.process.poll() is None:
        self.process.kill()
      self._stderr.close()
      self._stdout.close()


class InProcessServer:
  """A `serving.model_servers.server.Server` in this process, with stubs."""

  def __init__(self, **options):
    from serving.model_servers import server as server_lib  # pylint: disable=g-import-not-at-top

    options.setdefault("port", 0)
    options.setdefault("max_num_load_retries", 0)
    options.setdefault("native", NATIVE)
    self.server = server_lib.Server(server_lib.Options(**options))
    self.server.start()
    self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}")
    self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

  def stop(self):
    self.channel.close()
    self.server.stop(grace_seconds=5)


def batching_server(tmp_path, batching_parameters: str, **options) -> "InProcessServer":
  """An in-process server of model "m" (at tmp_path/m, written by the caller) batching with the given
  text BatchingParameters (`native=` picks the path, NATIVE by default)."""
  params = tmp_path / "batching.config"
  params.write_text(batching_parameters)
  return InProcessServer(
    model_name="m",
    model_base_path=str(tmp_path / "m"),
    enable_batching=True,
    batching_parameters_file=str(params),
    **options,
  )


def run_server_setup(report: str, *argv: str, env: dict[str, str | None]) -> tuple[dict, int]:
  """Runs fgr-serve's process set-up (`runtime.prepare_server_process(argv)`, which may re-execute the
  process) in a fresh process, then `report`: Python that prints a JSON object as its last line.
  Returns that object and the pid the process started with. `env` overrides this process's
  environment; None removes a variable."""
  script = "import sys\nfrom serving.util import runtime\nruntime.prepare_server_process(sys.argv[1:])\n"
  environment = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
  for name in (k for k, v in env.items() if v is None):
    environment.pop(name, None)
  process = subprocess.Popen(
    [sys.executable, "-c", script + textwrap.dedent(report), *argv],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=environment,
  )
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  return json.loads(out.strip().splitlines()[-1]), process.pid


def wait_for(condition, timeout: float = 60, interval: float = 0.05):
  """Polls `condition()` until truthy; fails the test after `timeout`.

  The timeout only bounds a hang: tests wait for things to happen, they
  don't assert how fast (the machine may be loaded).
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(interval)
  raise AssertionError(f"condition not met within {timeout}s")


def grpc_code(call, request, timeout: float = 120) -> tuple[grpc.StatusCode, str]:
  """(status code, details) of a unary call; OK and "" when it succeeds."""
  try:
    call(request, timeout=timeout)
  except grpc.RpcError as e:
    return e.code(), e.details()
  return grpc.StatusCode.OK, ""


def post_json(port: int, path: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
  """(HTTP status, decoded JSON body) of a POST to fgr-serve's REST API on `port`."""
  request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())
