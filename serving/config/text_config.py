"""Reads TF Serving's text-format configuration files."""

from typing import TypeVar

from google.protobuf import message, text_format

from serving import errors

M = TypeVar("M", bound=message.Message)


def parse_text_proto(path: str, message_class: type[M]) -> M:
  """Parses the text-format proto in `path` into a new `message_class`.

  Raises:
    ServingError: INVALID_ARGUMENT if the file can't be read or parsed.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    return text_format.Parse(text, message_class())
  except (OSError, text_format.ParseError, UnicodeDecodeError) as e:
    raise errors.invalid_argument(f"Failed to read {message_class.DESCRIPTOR.name} from {path}: {e}") from e
