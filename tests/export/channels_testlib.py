"""A tower of features for channel-graph tests: no training, and a query can aim at one ad exactly."""

import tensorflow as tf

DIM = 8


class HashTower(tf.Module):
  """Embeds the first token of a string feature as a unit vector of salted hashes: a tower of features.

  A channel's query and item towers share the salt, so a query whose first token is an ad's id lands
  on that ad's embedding (score 1, the most a unit vector can score): that ad tops the channel alone.
  """

  def __init__(self, feature: str, salt: str):
    super().__init__()
    self.feature = feature
    self.salt = salt
    self.scale = tf.Variable(1.0, name="scale")  # A variable for the refreshed graphs to carry over.

  def __call__(self, features):
    value = features[self.feature]
    if value.shape.rank == 2:
      value = value[:, 0]
    buckets = [tf.strings.to_hash_bucket_fast(tf.strings.join([value, f"#{self.salt}{j}"]), 2001) for j in range(DIM)]
    x = tf.cast(tf.stack(buckets, axis=1), tf.float32) - 1000.0
    return self.scale * tf.math.l2_normalize(x, axis=1)
