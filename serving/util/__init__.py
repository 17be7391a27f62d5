"""Helpers shared by the front ends."""
