"""Built-in synthetic search-ads logs: seeded, deterministic and streamable from 1k to 10M ads.

Every attribute of an ad, a user or a session is a pure function of its index and the seed (a
counter-based hash, like a stateless RNG), so any slice of the catalog or of the log can be produced
on its own, in any chunking, without holding the rest in memory.

The generative story:
- Ads belong to categories (ad i is in category i mod C). Inside a category, popularity follows a Zipf
  law over a seeded permutation of the ads, which gives a head and a long tail. Each ad has a brand,
  an advertiser, 3-5 bidword tokens from its category's vocabulary, a status (a few are paused) and
  a creation day (a few appear late, near the end of the log). Its bid (cost per click) is
  log-normal: a price level of its category times its own log-normal factor, so a few ads hold a
  large share of the money, as in real auctions.
- Users have profile features and two or three categories of interest.
- A session is a user typing a query and clicking 1-3 ads of one category: the query's tokens are
  bidwords (and sometimes the brand) of the clicked ad, plus noise. Some clicks convert. The category
  the session is about is logged with each click ("query_category"), so the noise ratio of a
  retrieval can be judged against the query's category rather than guessed from its tokens.
- Sessions are in time order; each user's behaviour sequence is the ads they clicked before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from models.data import schema, sequences

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MERSENNE_PRIME = 2_147_483_647  # > 10M, so it is coprime with every category size we generate.
# Bids: median of the whole market, spread of category price levels and of ads within a category
# (log-normal sigmas; together about 1.1, which puts roughly 10% of all bid value on the top 1% of ads).
_MEDIAN_BID = 0.5
_CATEGORY_BID_SIGMA = 0.5
_AD_BID_SIGMA = 1.0


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a fast, well-mixed 64-bit hash of each element."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and shape of the synthetic logs.

  Attributes:
    num_ads: catalog size (1k to 10M).
    num_users: number of distinct users.
    num_sessions: number of query sessions in the log.
    num_categories: ad categories; each has its own bidword vocabulary and brands.
    brands_per_category: brands in each category.
    tokens_per_category: bidword vocabulary size of each category.
    num_advertisers: advertisers owning the ads.
    num_days: length of the log in days.
    late_ad_fraction: share of ads created in the last fifth of the log.
    paused_fraction: share of ads whose status is "paused".
    popularity_exponent: Zipf exponent of ad popularity within a category.
    test_fraction: the last share of sessions (in time) held out for evaluation.
    seed: everything is a function of this seed.
  """

  num_ads: int = 20_000
  num_users: int = 5_000
  num_sessions: int = 100_000
  num_categories: int = 50
  brands_per_category: int = 20
  tokens_per_category: int = 60
  num_advertisers: int = 2_000
  num_days: int = 30
  late_ad_fraction: float = 0.05
  paused_fraction: float = 0.03
  popularity_exponent: float = 1.1
  test_fraction: float = 0.1
  seed: int = 0

  def __post_init__(self):
    if self.num_users < 1:
      # Users are drawn as floor(num_users * u): 0 made one user of every session and a negative count
      # negative user ids, and either trained in silence.
      raise ValueError(f"num_users must be 1 or more, got {self.num_users}")
    if self.num_ads < self.num_categories:
      raise ValueError(f"num_ads ({self.num_ads}) must be at least num_categories ({self.num_categories})")
    if not 0 < self.test_fraction < 1:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def _zipf_rank(u: np.ndarray, n: np.ndarray, exponent: float) -> np.ndarray:
  """Inverse-CDF sample of a rank in [0, n) with P(rank r) roughly proportional to (r + 1)^-exponent."""
  n = np.asarray(n, dtype=np.float64)
  if abs(exponent - 1.0) < 1e-9:
    ranks = np.exp(u * np.log(n + 1.0)) - 1.0
  else:
    e = 1.0 - exponent
    ranks = ((n + 1.0) ** e - 1.0) * u + 1.0
    ranks = ranks ** (1.0 / e) - 1.0
  return np.minimum(np.floor(ranks), n - 1).astype(np.int64)


class SyntheticSearchAds:
  """The synthetic search-ads log: an `ItemTable` over its catalog plus a session stream.

  Args:
    config: sizes and seed.
    split: "default" (the last `test_fraction` of sessions in time is the test split) or
      "leave_last_out" (each user's last click is the test example).
  """

  def __init__(self, config: SyntheticConfig = SyntheticConfig(), split: str = "default"):
    if split not in ("default", "leave_last_out"):
      raise ValueError(f"split must be 'default' or 'leave_last_out', got {split!r}")
    self.config = config
    self.split = split
    self.num_items = config.num_ads
    self._last_click_key: np.ndarray | None = None

  # ---- Counter-based randomness ---------------------------------------------------------------

  def _bits(self, salt: int, index: np.ndarray) -> np.ndarray:
    key = np.uint64((self.config.seed * 1_000_003 + salt) & 0xFFFFFFFFFFFFFFFF)
    return _mix(np.asarray(index, dtype=np.uint64) * _GOLDEN + _mix(np.array([key]))[0])

  def _uniform(self, salt: int, index: np.ndarray) -> np.ndarray:
    return (self._bits(salt, index) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

  def _choice(self, salt: int, index: np.ndarray, n: int) -> np.ndarray:
    return (self._bits(salt, index) % np.uint64(n)).astype(np.int64)

  def _normal(self, salts: tuple[int, int], index: np.ndarray) -> np.ndarray:
    """Standard normal draws (Box-Muller over two uniforms; 1 - u keeps the logarithm finite)."""
    radius = np.sqrt(-2.0 * np.log(1.0 - self._uniform(salts[0], index)))
    return radius * np.cos(2.0 * np.pi * self._uniform(salts[1], index))

  # ---- The catalog ------------------------------------------------------------------------------

  def category_size(self, category: np.ndarray) -> np.ndarray:
    c, n = self.config.num_categories, self.config.num_ads
    return (n - 1 - np.asarray(category, dtype=np.int64)) // c + 1

  def ad_of_rank(self, category: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Catalog row of the ad with popularity `rank` inside `category`."""
    category = np.asarray(category, dtype=np.int64)
    size = self.category_size(category)
    offset = self._choice(11, category, 1 << 30)
    member = ((_MERSENNE_PRIME % size) * np.asarray(rank, dtype=np.int64) + offset) % size
    return category + self.config.num_categories * member

  def created_day(self, rows: np.ndarray) -> np.ndarray:
    cfg = self.config
    late = self._uniform(21, rows) < cfg.late_ad_fraction
    day = np.floor(cfg.num_days * (0.8 + 0.2 * self._uniform(22, rows))).astype(np.int64)
    return np.where(late, day, 0)

  def is_paused(self, rows: np.ndarray) -> np.ndarray:
    return self._uniform(23, rows) < self.config.paused_fraction

  def bids(self, rows: np.ndarray) -> np.ndarray:
    """float32 [n] bid (cost per click) of catalog rows: log-normal, heavy-tailed, positive.

    The category's price level and the ad's own factor are both log-normal, so categories differ
    in price and a few ads in each hold most of its value.
    """
    rows = np.asarray(rows, dtype=np.int64)
    category = rows % self.config.num_categories
    log_bid = (
      np.log(_MEDIAN_BID)
      + _CATEGORY_BID_SIGMA * self._normal((110, 111), category)
      + _AD_BID_SIGMA * self._normal((112, 113), rows)
    )
    return np.exp(log_bid).astype(np.float32)

  def _ad_token_ids(self, rows: np.ndarray) -> np.ndarray:
    """[n, 5] token ids in the category vocabulary, skewed to the head; -1 beyond each ad's count."""
    cfg = self.config
    count = 3 + self._choice(31, rows, 3)
    token_ids = np.stack(
      [np.floor(cfg.tokens_per_category * self._uniform(40 + j, rows) ** 2).astype(np.int64) for j in range(5)], axis=1
    )
    return np.where(np.arange(5)[np.newaxis, :] < count[:, np.newaxis], token_ids, -1)

  def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Item features of catalog rows (see `sequences.ItemTable`)."""
    cfg = self.config
    rows = np.asarray(rows, dtype=np.int64)
    category = rows % cfg.num_categories
    brand = self._choice(32, rows, cfg.brands_per_category)
    token_ids = self._ad_token_ids(rows)
    tokens = []
    for c, ids in zip(category.tolist(), token_ids.tolist()):
      tokens.append(list(dict.fromkeys(f"t{c}_{t}" for t in ids if t >= 0)))
    return {
      schema.AD_ID: np.asarray([f"ad{r}" for r in rows.tolist()], dtype=object),
      schema.CATEGORY: np.asarray([f"c{c}" for c in category.tolist()], dtype=object),
      schema.BRAND: np.asarray([f"b{c}_{b}" for c, b in zip(category.tolist(), brand.tolist())], dtype=object),
      schema.AD_TOKENS: schema.pad_tokens(tokens, schema.AD_TOKENS_LEN),
      schema.STATUS: np.where(self.is_paused(rows), "paused", "active").astype(object),
    }

  def row_of(self, ad_id: str) -> int:
    """Catalog row of an ad id such as "ad123"."""
    if not ad_id.startswith("ad") or not ad_id[2:].isdigit() or int(ad_id[2:]) >= self.num_items:
      raise KeyError(f"{ad_id!r} is not an ad of this {self.num_items}-ad catalog")
    return int(ad_id[2:])

  # ---- Users ------------------------------------------------------------------------------------

  def user_features(self, users: np.ndarray) -> np.ndarray:
    """Profile tokens [n, USER_FEATURES_LEN]: age bucket, gender, city and device."""
    ages = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
    city = _zipf_rank(self._uniform(53, users), np.full(len(users), 100), 1.0)
    columns = [
      [f"age:{ages[a]}" for a in self._choice(50, users, len(ages)).tolist()],
      [f"gender:{'fm'[g]}" for g in self._choice(51, users, 2).tolist()],
      [f"city:{c}" for c in city.tolist()],
      [f"device:{('ios', 'android', 'pc')[d]}" for d in self._choice(52, users, 3).tolist()],
    ]
    return np.asarray(columns, dtype=object).T[:, : schema.USER_FEATURES_LEN]

  def user_interests(self, users: np.ndarray) -> np.ndarray:
    """[n, 3] categories of interest per user, popular categories more often."""
    cats = np.full(len(users), self.config.num_categories)
    return np.stack([_zipf_rank(self._uniform(60 + j, users), cats, 0.8) for j in range(3)], axis=1)

  # ---- Sessions ---------------------------------------------------------------------------------

  @property
  def num_train_sessions(self) -> int:
    return int(round(self.config.num_sessions * (1.0 - self.config.test_fraction)))

  @property
  def last_train_day(self) -> int:
    """Day of the last training session under the default split."""
    return (self.num_train_sessions - 1) * self.config.num_days // self.config.num_sessions

  def items_added_after_training(self) -> np.ndarray | None:
    """bool [num_ads]: ads created after the last training day (never clicked in training).

    None under "leave_last_out", whose training data spans the whole log.
    """
    if self.split != "default":
      return None
    return self.created_day(np.arange(self.num_items)) > self.last_train_day

  def _chunks(self, chunk_sessions: int) -> Iterator[np.ndarray]:
    for start in range(0, self.config.num_sessions, chunk_sessions):
      yield np.arange(start, min(start + chunk_sessions, self.config.num_sessions), dtype=np.int64)

  def _last_click_keys(self) -> np.ndarray:
    """[num_users] key (session * 4 + slot) of each user's last click, -1 if none; one streaming pass."""
    if self._last_click_key is None:
      last = np.full(self.config.num_users, -1, dtype=np.int64)
      for sessions in self._chunks(8192):
        clicks = self._session_clicks(sessions)
        np.maximum.at(last, clicks["user"], clicks["session"] * 4 + clicks["slot"])
      self._last_click_key = last
    return self._last_click_key

  def _session_clicks(self, sessions: np.ndarray) -> dict[str, np.ndarray]:
    """Samples the clicks of sessions; returns flat per-click arrays in time order."""
    cfg = self.config
    day = sessions * cfg.num_days // cfg.num_sessions
    # Activity is skewed: a few heavy users, many light ones.
    users = np.floor(cfg.num_users * self._uniform(70, sessions) ** 1.5).astype(np.int64)
    interests = self.user_interests(users)
    pick = self._uniform(71, sessions)
    interest = interests[np.arange(len(sessions)), np.searchsorted([0.55, 0.85], pick, side="right")]
    explore = self._uniform(72, sessions) < 0.1
    random_cat = _zipf_rank(self._uniform(73, sessions), np.full(len(sessions), cfg.num_categories), 0.8)
    category = np.where(explore, random_cat, interest)
    num_clicks = 1 + (self._uniform(74, sessions) < 0.4) + (self._uniform(75, sessions) < 0.15)

    size = self.category_size(category)
    click_rows = np.full([len(sessions), 3], -1, dtype=np.int64)
    for slot in range(3):
      for attempt in range(4):  # Resample ads that are paused or not yet created.
        draw_key = sessions * 16 + slot * 4 + attempt
        rank = _zipf_rank(self._uniform(80, draw_key), size, cfg.popularity_exponent)
        rows = self.ad_of_rank(category, rank)
        ok = (self.created_day(rows) <= day) & ~self.is_paused(rows) & (click_rows[:, slot] < 0)
        click_rows[:, slot] = np.where(ok, rows, click_rows[:, slot])
      click_rows[slot >= num_clicks, slot] = -1
    session_of_click, slot_of_click = np.nonzero(click_rows >= 0)
    rows = click_rows[session_of_click, slot_of_click]
    conversion_rate = 0.03 + 0.12 * self._uniform(90, rows)
    converted = self._uniform(91, sessions[session_of_click] * 4 + slot_of_click) < conversion_rate
    return {
      "session": sessions[session_of_click],
      "slot": slot_of_click,
      "user": users[session_of_click],
      "day": day[session_of_click],
      "row": rows,
      "category": category[session_of_click],
      "converted": converted,
      "first_row_of_session": click_rows[session_of_click, np.argmax(click_rows >= 0, axis=1)[session_of_click]],
    }

  def _query_tokens(self, sessions: np.ndarray, first_rows: np.ndarray) -> np.ndarray:
    """Query tokens: 1-2 bidwords of the session's first clicked ad, sometimes its brand and noise."""
    cfg = self.config
    ad_tokens = self.features(first_rows)
    num_from_ad = 1 + (self._uniform(100, sessions) < 0.5)
    with_brand = self._uniform(101, sessions) < 0.2
    with_noise = self._uniform(102, sessions) < 0.3
    noise = self._choice(103, sessions, cfg.tokens_per_category)
    queries = []
    for i, (tokens, category) in enumerate(zip(ad_tokens[schema.AD_TOKENS], first_rows % cfg.num_categories)):
      present = [t for t in tokens if t]
      start = int(self._choice(104, sessions[i : i + 1], len(present))[0])
      query = [present[(start + j) % len(present)] for j in range(min(num_from_ad[i], len(present)))]
      if with_brand[i]:
        query.append(ad_tokens[schema.BRAND][i])
      if with_noise[i]:
        query.append(f"t{category}_{noise[i]}")
      queries.append(list(dict.fromkeys(query)))
    return schema.pad_tokens(queries, schema.QUERY_TOKENS_LEN)

  def examples(self, split: str, chunk_sessions: int = 8192) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of training examples (one per click) of the "train" or "test" split.

    Besides the features every source yields (`sequences.make_examples`), a batch holds "converted"
    (bool [n], the click converted), "day" (int64 [n], the session's day), "bid" (float32 [n], the
    clicked ad's bid, see `bids`) and "query_category" (object [n] such as "c12": the category the
    session's query is about, which every ad clicked in it belongs to).

    Test sessions come after all train sessions in time (under "leave_last_out", the test split is
    each user's last click instead). Behaviour sequences run over the whole log, so a test example
    sees everything its user clicked before it.
    """
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tracker = sequences.HistoryTracker()
    boundary = self.num_train_sessions
    last_keys = self._last_click_keys() if self.split == "leave_last_out" else None
    for sessions in self._chunks(chunk_sessions):
      clicks = self._session_clicks(sessions)
      hist_rows = tracker.observe(clicks["user"], clicks["row"])
      if last_keys is not None:
        is_test = clicks["session"] * 4 + clicks["slot"] == last_keys[clicks["user"]]
      else:
        is_test = clicks["session"] >= boundary
      keep = ~is_test if split == "train" else is_test
      if not keep.any():
        continue
      kept = {name: values[keep] for name, values in clicks.items()}
      batch = sequences.make_examples(
        self,
        user_ids=np.asarray([f"u{u}" for u in kept["user"].tolist()], dtype=object),
        user_features=self.user_features(kept["user"]),
        query_tokens=self._query_tokens(kept["session"], kept["first_row_of_session"]),
        hist_rows=hist_rows[keep],
        item_rows=kept["row"],
      )
      batch[schema.CONVERTED] = kept["converted"]
      batch["day"] = kept["day"]
      batch[schema.BID] = self.bids(kept["row"])
      batch[schema.QUERY_CATEGORY] = np.asarray([f"c{c}" for c in kept["category"].tolist()], dtype=object)
      yield batch
