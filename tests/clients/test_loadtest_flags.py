"""fgr-loadtest's flags refuse values it has no meaning for, as absl reports a bad flag."""

import pytest
from absl import flags as absl_flags

from clients.loadtest import loadtest_cli  # noqa: F401  # Defines the flags.


@pytest.mark.parametrize("value", ["0", "-2"])
def test_num_requests_below_one_is_refused(value):
  """--num_requests=-2 ran with 298 distinct requests (a slice of the synthetic ones from its end)."""
  parser = absl_flags.FLAGS["num_requests"].parser
  with pytest.raises(ValueError, match="is not a positive integer"):
    parser.parse(value)
