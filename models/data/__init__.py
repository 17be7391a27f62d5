"""Training data: built-in synthetic search-ads logs, MovieLens-100K and a generic log format."""
