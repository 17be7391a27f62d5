"""Feature names, dtypes and padded lengths shared by the data sources, the towers and the export.

Every source (synthetic, MovieLens, a user's own logs) is turned into the same two feature sets:

- query features: who is searching, what they typed and what they clicked recently;
- item features: the ad's id and side info.

String features are dense and padded with "" so that they travel in plain TF Serving tensors; the
towers mask the padding. Lengths below are what training pads to; served requests may use any
length of at least one.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

PAD = ""

# Query features.
USER_ID = "user_id"  # [B] string
USER_FEATURES = "user_features"  # [B, P] string tokens such as "age:25-34"
QUERY_TOKENS = "query_tokens"  # [B, Q] string tokens of the query (or current context)
HIST_IDS = "hist_ids"  # [B, L] string ids of recently clicked items, most recent first
HIST_CATEGORIES = "hist_categories"  # [B, L] string categories of those items
HIST_BRANDS = "hist_brands"  # [B, L] string brands of those items

# Item features.
AD_ID = "ad_id"  # [B] string
CATEGORY = "category"  # [B] string
BRAND = "brand"  # [B] string
AD_TOKENS = "ad_tokens"  # [B, T] string bidword / title tokens
STATUS = "status"  # catalog only: "active" or "paused"; not a tower input

# Example fields beside the features, when the source logs them (not tower inputs).
CONVERTED = "converted"  # bool [B] (int64 in TFRecords): the click converted.
BID = "bid"  # float32 [B]: the clicked ad's bid.
QUERY_CATEGORY = "query_category"  # string [B]: the category the query is about.

QUERY_FEATURE_NAMES = (USER_ID, USER_FEATURES, QUERY_TOKENS, HIST_IDS, HIST_CATEGORIES, HIST_BRANDS)
ITEM_FEATURE_NAMES = (AD_ID, CATEGORY, BRAND, AD_TOKENS)
HISTORY_FEATURES = {HIST_IDS: AD_ID, HIST_CATEGORIES: CATEGORY, HIST_BRANDS: BRAND}

# Padded lengths used in training.
USER_FEATURES_LEN = 4
QUERY_TOKENS_LEN = 8
HISTORY_LEN = 20
AD_TOKENS_LEN = 8

_SEQUENCE_FEATURES = {USER_FEATURES, QUERY_TOKENS, HIST_IDS, HIST_CATEGORIES, HIST_BRANDS, AD_TOKENS}


def feature_spec(name: str) -> tf.TensorSpec:
  """Serving spec of one feature: [None] for scalars per row, [None, None] for token lists."""
  shape = [None, None] if name in _SEQUENCE_FEATURES else [None]
  return tf.TensorSpec(shape, tf.string, name=name)


def query_specs() -> dict[str, tf.TensorSpec]:
  return {name: feature_spec(name) for name in QUERY_FEATURE_NAMES}


def item_specs() -> dict[str, tf.TensorSpec]:
  return {name: feature_spec(name) for name in ITEM_FEATURE_NAMES}


def pad_tokens(rows: list[list[str]], length: int) -> np.ndarray:
  """Packs token lists into an object array [len(rows), length], truncating and padding with PAD."""
  out = np.full([len(rows), length], PAD, dtype=object)
  for i, tokens in enumerate(rows):
    tokens = tokens[:length]
    out[i, : len(tokens)] = tokens
  return out
