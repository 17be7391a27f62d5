"""Training examples whose behaviour sequence is what the user did next: the time-reversed log.

Items a user interacts with close together are related whichever came first; item co-occurrence
(ItemCF, Swing, item2vec) counts both orders, while next-item examples teach only one. Adding, for
every training event, an example whose sequence is the user's following interactions (the nearest
first) gives the towers the other half of that signal. Only training events are read, so no test
event reaches training, and served requests are unchanged: their sequence is the past, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.data import schema, sequences


def following_examples(
  source, num_events: int | None = None, chunk_size: int = 8192
) -> Iterator[dict[str, np.ndarray]]:
  """One example per training event of `source`, its sequence the same user's next events.

  The training stream is read whole (in time order) and replayed backwards through a
  `sequences.HistoryTracker`, so memory grows with the training split, as `cache_examples` does.

  Args:
    source: the data source.
    num_events: read only the first training events (those not held out for validation).
    chunk_size: examples per yielded batch.
  """
  batches = list(source.examples("train"))
  if not batches:
    return
  names = (schema.USER_ID, schema.USER_FEATURES, schema.QUERY_TOKENS, schema.AD_ID)
  columns = {name: np.concatenate([b[name] for b in batches])[:num_events] for name in names}
  rows = np.asarray([source.row_of(str(ad_id)) for ad_id in columns[schema.AD_ID]], dtype=np.int64)
  backwards = np.arange(len(rows))[::-1]
  following = np.empty([len(rows), schema.HISTORY_LEN], dtype=np.int64)
  following[backwards] = sequences.HistoryTracker().observe(columns[schema.USER_ID][backwards], rows[backwards])
  for start in range(0, len(rows), chunk_size):
    part = slice(start, start + chunk_size)
    yield sequences.make_examples(
      source,
      user_ids=columns[schema.USER_ID][part],
      user_features=columns[schema.USER_FEATURES][part],
      query_tokens=columns[schema.QUERY_TOKENS][part],
      hist_rows=following[part],
      item_rows=rows[part],
    )
