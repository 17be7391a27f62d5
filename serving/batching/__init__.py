"""Server-side batching: merge concurrent requests into one session run."""
