"""Entry points of the console scripts (fgr-train, fgr-serve, ...)."""
