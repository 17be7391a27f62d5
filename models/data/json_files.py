"""The JSON files a run or a preparation keeps beside its data (config.json, prepare_spec.json, the
manifest), read with errors that name the file: json's own named neither the file nor what to do."""

from __future__ import annotations

import json
from typing import Any

import tensorflow as tf


def read_json_object(path: str, keys: tuple[str, ...] = (), remedy: str = "the file is damaged") -> dict[str, Any]:
  """The JSON object at `path` (any `tf.io.gfile` path), with `keys` in it.

  Raises:
    ValueError: `{path} is not JSON (...)` or `{path} lacks ...`, then `remedy`, for a file that is
      not such an object (damaged, or cut short by a full disk).
  """
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    content = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{path} is not JSON ({e}): {remedy}") from None
  missing = [key for key in keys if not isinstance(content, dict) or key not in content]
  if not isinstance(content, dict) or missing:
    raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing) or 'an object'}: {remedy}")
  return content
