"""Mixed-precision towers: float32 outputs, a finite Retrieval loss, checkpoints shared across dtypes, XLA."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from models import precision as precision_lib
from models import retrieval, train
from models.data import schema
from tests.conftest import TINY_TOWER


def _examples(n=8):
  return {
    schema.USER_ID: tf.constant([f"u{i}" for i in range(n)]),
    schema.USER_FEATURES: tf.constant([["age:18-24", ""]] * n),
    schema.QUERY_TOKENS: tf.constant([[f"t{i}", ""] for i in range(n)]),
    schema.HIST_IDS: tf.constant([[f"ad{i + 1}", "ad9", ""] for i in range(n)]),
    schema.HIST_CATEGORIES: tf.constant([["c1", "c2", ""]] * n),
    schema.HIST_BRANDS: tf.constant([["b1", "", ""]] * n),
    schema.AD_ID: tf.constant([f"ad{i}" for i in range(n)]),
    schema.CATEGORY: tf.constant([f"c{i % 3}" for i in range(n)]),
    schema.BRAND: tf.constant([f"b{i}" for i in range(n)]),
    schema.AD_TOKENS: tf.constant([[f"t{i}", "x"] for i in range(n)]),
  }


@pytest.mark.parametrize(
  "precision,compute_dtype,attention,encoder",
  [("mixed_bfloat16", tf.bfloat16, "din", "none"), ("mixed_float16", tf.float16, "dot", "self_attention")],
)
def test_mixed_towers_output_float32_and_retrieval_trains(precision, compute_dtype, attention, encoder):
  assert tf.keras.mixed_precision.global_policy().name == "float32"  # The towers carry their own policy.
  tower = dataclasses.replace(TINY_TOWER, precision=precision, attention=attention, sequence_encoder=encoder)
  model = retrieval.RetrievalModel(tower)
  batch = _examples()
  query, item = model.query_tower(batch), model.item_tower(batch)
  assert query.dtype == tf.float32 and item.dtype == tf.float32
  np.testing.assert_allclose(np.linalg.norm(query.numpy(), axis=1), 1.0, rtol=1e-3)
  # The towers really compute in the mixed dtype, with float32 variables.
  hidden = model.query_tower.mlp.layers[0]
  assert hidden.compute_dtype == compute_dtype.name and hidden.kernel.dtype == tf.float32
  assert model.query_tower.user_embedding.embedding.compute_dtype == compute_dtype.name

  model.compile(optimizer=retrieval.make_optimizer(1e-2, precision))
  history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(3), epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"]).all()
  assert np.isfinite(float(model.compute_loss(batch)))


def test_a_float32_checkpoint_restores_into_mixed_towers_and_xla(trained_run):
  batch = _examples()
  reference, _ = train.restore(trained_run)
  expected = reference.query_tower(batch).numpy()
  compiled, _ = train.restore(trained_run, jit_compile=True)
  np.testing.assert_allclose(compiled.query_tower(batch).numpy(), expected, atol=1e-5)
  np.testing.assert_allclose(compiled.item_tower(batch).numpy(), reference.item_tower(batch).numpy(), atol=1e-5)
  mixed, run_config = train.restore(trained_run, precision="mixed_bfloat16", jit_compile=True)
  assert run_config["tower"].precision == "mixed_bfloat16"
  out = mixed.query_tower(batch)
  assert out.dtype == tf.float32
  # bfloat16 keeps about 3 significant digits: the same direction, slightly perturbed.
  assert np.min(np.sum(out.numpy() * expected, axis=1)) > 0.98


def test_serving_defaults_are_measured_for_cpu_and_safe_elsewhere():
  cpu = precision_lib.serving_defaults("CPU")
  assert cpu == precision_lib.MEASURED_FASTEST["CPU"]
  assert precision_lib.serving_defaults("TPU") == precision_lib.ServingOptions("float32", False)
  with pytest.raises(ValueError, match="precision"):
    precision_lib.ServingOptions("float8", False)
