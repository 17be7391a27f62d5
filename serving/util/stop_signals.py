"""SIGTERM/SIGINT as a stop the main thread sees, whichever thread the kernel gives them to.

The kernel delivers a process-directed signal to any thread that does not
block it, and TensorFlow, gRPC and the native front end start many. CPython
then only flags the signal for the main thread, which runs the Python handler
when it next executes bytecode: blocked in `threading.Event.wait`, it would
sleep through the signal until the wait's timeout (or forever). CPython's C
handler also writes to the `signal.set_wakeup_fd` descriptor, from whichever
thread it ran on, so a main thread blocked reading that pipe always wakes.
"""

import os
import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Catches SIGTERM and SIGINT while entered; `wait()` returns once one came.

  Use from the main thread (Python's rule for signal handlers):

    with StopSignals(on_stop=server.request_stop) as signals:
      server.start()
      if not signals.received:
        signals.wait()

  Args:
    on_stop: Called with the signal number, on the main thread, for each
      signal: it may end work the main thread is waiting on (a start-up).
  """

  def __init__(self, on_stop: Callable[[int], None] | None = None):
    self._on_stop = on_stop
    self._received = threading.Event()
    self._read_fd = self._write_fd = -1
    self._previous_wakeup_fd = -1

  @property
  def received(self) -> bool:
    return self._received.is_set()

  def __enter__(self) -> "StopSignals":
    self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(self._write_fd, False)  # set_wakeup_fd's rule: a signal must never block.
    self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
      signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, unused_frame) -> None:
    self._received.set()
    if self._on_stop is not None:
      self._on_stop(signum)

  def wait(self) -> None:
    """Blocks until a stop signal's handler has run."""
    while not self._received.is_set():
      # Returns once any signal has landed, on any thread; the loop's next
      # step runs its Python handler here, on the main thread.
      os.read(self._read_fd, 64)

  def __exit__(self, *unused_exc_info) -> None:
    """Stops listening on the pipe; the handlers stay, so a signal during
    the shutdown that follows is still caught, not fatal."""
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    os.close(self._read_fd)
    os.close(self._write_fd)


def ignore() -> None:
  """Drained: a repeated SIGTERM/SIGINT must not turn exit 0 into -15.

  Python restores the default action of signals with Python handlers while
  the interpreter shuts down, so a second signal then would kill the process.
  """
  for signum in STOP_SIGNALS:
    signal.signal(signum, signal.SIG_IGN)
