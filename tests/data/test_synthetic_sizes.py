"""The synthetic log refuses a user count it cannot draw users from, before anything is generated."""

import pytest

from models.data import synthetic


@pytest.mark.parametrize("num_users", [0, -3])
def test_no_users_is_refused(num_users):
  """fgr-train --num_users=0 (or -3) trained on one user (or on negative user ids) without a word."""
  with pytest.raises(ValueError, match=f"num_users must be 1 or more, got {num_users}"):
    synthetic.SyntheticConfig(num_ads=1000, num_users=num_users)


def test_one_user_is_a_log():
  assert synthetic.SyntheticConfig(num_ads=1000, num_users=1).num_users == 1
