"""A full or read-only disk met by a TensorFlow write, and Ctrl-C, end a tool in one line, not a traceback."""

import pytest
import tensorflow as tf

from cli import launch


@pytest.mark.parametrize(
  "error,message",
  [
    (
      tf.errors.ResourceExhaustedError(
        None, None, "{{function_node __wrapped__SaveV2}} run/ckpt-001_temp/part; No space left on device [Op:SaveV2]"
      ),
      "cannot write: run/ckpt-001_temp/part; No space left on device",
    ),
    (
      tf.errors.PermissionDeniedError(None, None, "run; Read-only file system [Op:CreateSummaryFileWriter] name: "),
      "cannot write: run; Read-only file system",
    ),
    (  # fgr-prepare --output_dir=<a file>/out.
      tf.errors.FailedPreconditionError(None, None, "data.jsonl is not a directory"),
      "cannot write: data.jsonl is not a directory",
    ),
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1000000000]"), None),
  ],
)
def test_storage_failures_of_tensorflow_writes_are_user_errors(error, message):
  assert launch.user_error_message(error) == message


def test_ctrl_c_ends_the_tool_with_one_line_and_status_130(capsys):
  def training():
    raise KeyboardInterrupt()

  with pytest.raises(SystemExit) as info:
    launch._ending_quietly_on_ctrl_c(training, ["/venv/bin/fgr-train"])
  assert info.value.code == 130
  assert capsys.readouterr().err.strip() == "fgr-train: interrupted"
  with pytest.raises(KeyboardInterrupt):  # Debugging: where it was, as before.
    launch._ending_quietly_on_ctrl_c(training, ["fgr-train", "--verbosity=1"])
