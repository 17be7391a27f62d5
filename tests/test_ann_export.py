"""bench.ann_export: the index-only SavedModel answers what the full graph's search does for the same embedding."""

import numpy as np
import tensorflow as tf

from bench import ann_export
from export import refresh_state
from tests.serving import scann_testlib


def test_index_only_export_finds_the_full_graphs_ads(trained_run, tree_export, tmp_path):
  import scann  # noqa: F401  Registers ScaNN's ops for the in-process loads.

  # A tree-AH ScaNN version with a third of its ads paused: the mask must come along with the index.
  catalog = refresh_state.read_state(tree_export)
  eligible = catalog.eligible.copy()
  eligible[::3] = False
  version = scann_testlib.publish_eligible(tree_export, str(tmp_path / "full"), eligible)
  report = ann_export.export(version, str(tmp_path / "ann"))
  assert report.index_config["update"] == "incremental" and report.index_config["encoded_rows"] == 0  # Not retrained.

  full, ann = tf.saved_model.load(version), tf.saved_model.load(report.path)
  features = {name: tf.constant(values) for name, values in scann_testlib.held_out_queries(trained_run, 32).items()}
  embeddings = full.signatures["encode_query"](**features)["embedding"]
  expected = full.signatures["serving_default"](**features)
  answer = ann.signatures["serving_default"](embedding=embeddings)
  ids, scores = answer["ids"].numpy().astype(str), answer["scores"].numpy()
  assert ids.shape == scores.shape == (32, scann_testlib.K)
  # The same graph ops over the same assets: the same ads, up to how near-ties fall.
  assert scann_testlib.recall(ids, expected["ids"].numpy().astype(str)) >= 0.98
  assert not set(ids.ravel()) & set(catalog.ids[~eligible])
  state = refresh_state.read_state(version)
  np.testing.assert_allclose(scores, scann_testlib.dot_scores(embeddings.numpy(), ids, state), rtol=1e-4, atol=1e-4)
  # A batch of one takes ScaNN's single-query op, which rounds its leaf and AH scores its own way, so an
  # ad at a leaf or reorder boundary may fall the other way. Over 30 training seeds, 0-6 of these 320
  # places differed; a broken single-query path (wrong leaves, mask or rows) differs in most of them.
  single = np.concatenate(
    [ann.signatures["serving_default"](embedding=embeddings[i : i + 1])["ids"].numpy().astype(str) for i in range(32)]
  )
  assert scann_testlib.recall(single, ids) >= 0.95
  assert not set(single.ravel()) & set(catalog.ids[~eligible])
  # Whichever way those ads fall, both ops are as close to the exact top-k (within 0.03 recall).
  exact = scann_testlib.exact_ids(embeddings.numpy(), state)
  assert abs(scann_testlib.recall(single, exact) - scann_testlib.recall(ids, exact)) <= 0.03
