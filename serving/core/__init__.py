"""Version management: sources, policies, loaders and the server core."""
