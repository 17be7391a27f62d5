"""fgr-loadtest: an open- and closed-loop gRPC load generator for TF Serving-compatible endpoints."""
