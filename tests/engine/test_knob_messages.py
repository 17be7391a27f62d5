"""The knob rules' messages reach clients through a graph Assert unchanged: nothing in them is C-escaped."""

import re

from engine import knob_rules


def test_no_rule_message_holds_a_character_the_assert_escapes():
  """A request got "channel depths must be at most each channel\\'s exported depth": TF's Assert formats
  its string inputs C-escaped, so a quote or backslash reached the client with a backslash before it."""
  messages = [rule.message for rule in knob_rules.RULES] + [knob_rules.depth_cap([40, 40]).message]
  escaped = [message for message in messages if re.search(r"['\"\\]|[^\x20-\x7e]", message)]
  assert not escaped, escaped
