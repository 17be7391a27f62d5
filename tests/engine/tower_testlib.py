"""Towers whose output a test knows exactly, for graphs checked against NumPy."""

import numpy as np
import tensorflow as tf


class TableTower(tf.Module):
  """Looks a row's embedding up in a fixed table: feature `feature` holds the rows."""

  def __init__(self, table: np.ndarray, feature: str):
    super().__init__()
    self.table = tf.Variable(table, trainable=False)
    self.feature = feature

  def __call__(self, features):
    return tf.gather(self.table, features[self.feature])
