"""Aspired-version policies: when an unaspired version may be unloaded."""

import abc
from collections.abc import Iterable


class AspiredVersionPolicy(abc.ABC):
  """Decides which versions that are no longer aspired may unload now."""

  @abc.abstractmethod
  def versions_to_unload(
    self, serving: Iterable[int], aspired: set[int], available: set[int], loading: set[int]
  ) -> set[int]:
    """Returns the versions in `serving` (loaded, unaspired) to unload.

    Args:
      serving: Loaded versions that are no longer aspired.
      aspired: Versions the version policy wants.
      available: Versions currently AVAILABLE.
      loading: Aspired versions currently loading (or waiting to retry).
    """


class AvailabilityPreservingPolicy(AspiredVersionPolicy):
  """Keeps at least one version serving through a swap.

  An unaspired version unloads only once an aspired version is AVAILABLE or
  when nothing aspired is left to wait for and no aspired version exists at
  all (the model was removed). A failed new version therefore leaves the old
  one serving.
  """

  def versions_to_unload(self, serving, aspired, available, loading):
    serving = set(serving)
    if aspired & available:
      return serving
    if not aspired and not loading:
      return serving
    return set()
