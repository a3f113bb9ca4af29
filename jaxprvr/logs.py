"""Third-party log output goes to a file of the run, not to the terminal.

During ``python -m jaxprvr.train`` the terminal shows only jaxprvr's own lines (progress bars, the per-epoch and
test lines, a one-line error); what the libraries print through Python's ``logging`` (absl and orbax, e.g.
"Waiting for previous save to complete took 3.2 seconds", JAX's Python loggers) and through ``warnings`` goes to
``<out>/log.txt`` instead, with a time stamp and the logger's name::

    with third_party_output_to(out / "log.txt"):
        ...

Inside the block, every handler of the ``logging`` tree that writes to the terminal (the root logger's, absl's
own) is set aside and a file handler takes its place (on the root logger, and on any logger that does not
propagate to it), and ``logging.captureWarnings`` routes
``warnings.warn`` through the ``py.warnings`` logger to that file; levels are not changed (what used to reach
the terminal is what reaches the file). jaxprvr's own loggers (``jaxprvr.*``: "bad video, using zeros", NaN
queries dropped, ...) keep the terminal: their handlers stay, and the ``jaxprvr`` logger gets the root's terminal
handlers (or, when the root had no handler, ``logging.lastResort``, Python's stderr fallback), so their records
reach the terminal as before and the file too. Leaving the block puts everything back. Output that C++ code writes to
the process's stderr directly (XLA's own ``W0000 ...`` lines) does not pass through Python and is not moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN = "jaxprvr"  # the package's loggers (``jaxprvr.data.video``, ...), whose records stay on the terminal


def _to_terminal(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to the terminal: a stream handler (not a file) on stderr or stdout, including
    absl's ``ABSLHandler``, which wraps one."""
    inner = getattr(handler, "python_handler", handler)  # absl.logging.ABSLHandler
    if isinstance(inner, logging.FileHandler) or not isinstance(inner, logging.StreamHandler):
        return False
    stream = getattr(inner, "stream", None)
    return stream is None or stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) or \
        getattr(stream, "name", None) in ("<stderr>", "<stdout>")


def log_file(folder: str | os.PathLike, stem: str, process_id: int | None = None) -> Path:
    """``<folder>/<stem>.txt``, or ``<folder>/<stem>.<i>.txt`` for process ``i > 0`` of a multi-process run (process
    0, like a single-process run, keeps the plain name)."""
    return Path(folder) / (f"{stem}.{process_id}.txt" if process_id else f"{stem}.txt")


class _FileHandler(logging.FileHandler):
    """Opens (creates its folder and) the file at the first record, and starts it with the header line."""

    def __init__(self, path: Path, header: str | None):
        self._header = header
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(FORMAT))

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        stream = super()._open()
        if self._header:
            stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self._header}\n")
        return stream


@contextlib.contextmanager
def third_party_output_to(path: str | os.PathLike, header: str | None = None):
    """Routes ``logging`` and ``warnings`` output to ``path`` (appended) inside the block; yields the path. The file
    (and its folder) is created at the first message, starting with ``header`` (e.g. the command) after a time
    stamp: a block where nothing was logged leaves nothing behind."""
    path = Path(path)
    handler = _FileHandler(path, header)
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    root, own = logging.getLogger(), logging.getLogger(OWN)
    # what a jaxprvr record reached on the terminal before the block (the root's terminal handlers, else Python's
    # last resort when nothing handled it), re-attached to the jaxprvr logger for the block
    own_terminal = [h for h in root.handlers if _to_terminal(h)]
    if not root.handlers and logging.lastResort is not None:
        own_terminal = [logging.lastResort]
    removed, added = [], [root]
    for lg in loggers:
        if lg.name == OWN or lg.name.startswith(OWN + "."):  # jaxprvr's own: left on the terminal
            continue
        for h in list(lg.handlers):
            if _to_terminal(h):
                lg.removeHandler(h)
                removed.append((lg, h))
                if not lg.propagate and lg not in added:  # its records never reach the root: the file here too
                    added.append(lg)
    for lg in added:
        lg.addHandler(handler)
    own_terminal = [h for h in own_terminal if h not in own.handlers]
    for h in own_terminal:
        own.addHandler(h)
    captured = logging._warnings_showwarning is not None  # someone already captures warnings: leave it on
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        if not captured:
            logging.captureWarnings(False)
        for h in own_terminal:
            own.removeHandler(h)
        for lg in added:
            lg.removeHandler(handler)
        handler.close()
        for lg, h in removed:
            lg.addHandler(h)
