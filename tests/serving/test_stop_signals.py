"""StopSignals: a stop signal ends the main thread's wait wherever the kernel delivered it."""

import signal
import threading
import time

import pytest

from serving.util import stop_signals


@pytest.fixture
def restore_handlers():
  """StopSignals leaves its handlers installed (for the shutdown after it): put pytest's back."""
  saved = {signum: signal.getsignal(signum) for signum in stop_signals.STOP_SIGNALS}
  yield
  for signum, handler in saved.items():
    signal.signal(signum, handler)


@pytest.mark.usefixtures("restore_handlers")
def test_a_signal_on_another_thread_ends_the_wait():
  stops = []
  main_thread = threading.main_thread().ident

  def sender():
    time.sleep(0.2)  # Lets the main thread block in wait(); it returns either way.
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # Lands on this thread.

  def rescue():
    # Without the wakeup pipe only a signal on the main thread would end the
    # wait: send one late, so a regression fails instead of hanging.
    if not stopped.wait(30):
      signal.pthread_kill(main_thread, signal.SIGINT)

  stopped = threading.Event()
  wakeup_fd_before = signal.set_wakeup_fd(-1)
  signal.set_wakeup_fd(wakeup_fd_before)
  with stop_signals.StopSignals(on_stop=stops.append) as signals:
    assert not signals.received
    threads = [threading.Thread(target=sender), threading.Thread(target=rescue)]
    for thread in threads:
      thread.start()
    signals.wait()
    stopped.set()
    for thread in threads:
      thread.join()
  assert signals.received
  assert stops[0] == signal.SIGTERM, "the wait ended only through the rescue SIGINT on the main thread"
  assert signal.set_wakeup_fd(wakeup_fd_before) == wakeup_fd_before  # Exiting gave the wakeup fd back.


@pytest.mark.usefixtures("restore_handlers")
def test_handlers_outlive_the_block_and_ignore_ends_them():
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  with stop_signals.StopSignals():
    pass
  assert callable(signal.getsignal(signal.SIGTERM))
  stop_signals.ignore()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
  assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
