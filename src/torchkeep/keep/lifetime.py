"""A CheckpointManager's lifetime around the training loop: as a context manager it flushes the
pending save on exit (raising its error, or logging it at ERROR when another error is already
on its way) and on SIGTERM/SIGINT before the previous handler runs."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("torchkeep.keep.manager")


class FlushOnExit:
    """Mixin for a class with ``wait()``, ``close()`` and a ``_handlers`` dict."""

    _handlers: dict[int, Any]

    def wait(self) -> None:  # pragma: no cover - provided by the manager
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - provided by the manager
        raise NotImplementedError

    def __enter__(self) -> "FlushOnExit":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._handlers[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # pragma: no cover - not allowed here
                    pass
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, prev in self._handlers.items():
            try:
                signal.signal(sig, prev)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self._handlers.clear()
        try:
            self.close()
        except BaseException:
            if exc_type is None:
                raise
            log.error("the pending checkpoint save failed while handling another error",
                      exc_info=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Flush the pending save, then do what the previous handler would have done."""
        try:
            self.wait()
        except BaseException:
            log.error("the pending checkpoint save failed", exc_info=True)
        prev = self._handlers.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


__all__ = ["FlushOnExit"]
