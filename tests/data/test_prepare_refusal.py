"""A rerun of fgr-prepare with other flags is refused naming what differs, not the whole recorded spec."""

import pytest

from models.data import prepare


def _spec(records_per_shard: int = 100_000, split: str = "default") -> dict:
  source = {"name": "logs", "data_dir": "/logs", "synthetic": {}, "split": split, "held_out_item_fraction": 0.0}
  inputs = {"items.jsonl": {"bytes": 10, "sha256": "ab"}}
  return {"source": source, "inputs": inputs, "records_per_shard": records_per_shard, "version": 1}


def test_a_rerun_with_other_flags_names_the_flag(tmp_path):
  """It said "other data ({...the whole spec...})" when only --records_per_shard differed."""
  output_dir = str(tmp_path / "prepared")
  prepare._claim(output_dir, _spec())
  with pytest.raises(ValueError) as refused:
    prepare._claim(output_dir, _spec(records_per_shard=1000))
  assert "preparation of other flags (records_per_shard: 100000 then, 1000 now)" in str(refused.value)
  assert "sha256" not in str(refused.value)
  with pytest.raises(ValueError, match=r"other data \(split: 'default' then, 'time' now\)"):
    prepare._claim(output_dir, _spec(split="time"))
  prepare._claim(output_dir, _spec())  # The same spec continues.
