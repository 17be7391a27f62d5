"""The model server process: flags, gRPC and REST front ends."""
