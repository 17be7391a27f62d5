"""Configuration protos and their text-format readers."""
