"""Clients of a TF Serving-compatible server: fgr-query (one request) and fgr-loadtest (sustained load).

They speak only TF Serving's public gRPC API, so they work against fgr-serve and stock TF Serving alike,
and they stand apart from the server: they import nothing from serving/, nothing in serving/ imports
them, and their plotting and progress dependencies come with the `clients` extra, not with fgr-serve.
"""
