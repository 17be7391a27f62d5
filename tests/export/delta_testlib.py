"""Catalog delta lines (fgr-refresh's JSON Lines) for tests that refresh a version."""

import json

from models.data import schema


def ad_line(ad_id, features, row, **extra):
  """A delta line upserting `ad_id` with the side info of catalog row `row` of `features`, plus `extra` fields."""
  tokens = [t for t in features[schema.AD_TOKENS][row] if t]
  return json.dumps(
    {
      "ad_id": ad_id,
      "category": features[schema.CATEGORY][row],
      "brand": features[schema.BRAND][row],
      "tokens": tokens,
      **extra,
    }
  )
