"""What a loaded SavedModel can do: predict, classify, regress, metadata."""
