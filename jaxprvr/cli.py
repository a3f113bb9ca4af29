"""What every jaxprvr command line shares: one-line errors, JSON on stdout, exit codes.

Exit status: 0 success (one JSON object on stdout), 2 a user mistake (one ``error: ...`` line on stderr
naming the file or key, what was expected and what was found; no traceback), 130 interrupted.

The commands that compile (train, evaluate, parity.check) keep JAX's persistent compilation cache on by default
(:func:`add_compile_cache_args`, :func:`enable_compile_cache`): a second launch of the same config loads its
executables from disk instead of compiling them again.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import numpy as np

from jaxprvr.errors import JaxprvrError


def jsonable(x: Any) -> Any:
    """Plain-JSON view of results holding numpy/jax scalars and arrays."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return x


def run_cli(parser, run: Callable[[Any], dict], argv=None, *, args=None,
            report: Callable[[dict], None] | None = None, interrupted: str = "interrupted") -> int:
    """Parses ``argv`` (unless given the parsed ``args``), calls ``run(args)`` and prints its result as one JSON
    line."""
    args = parser.parse_args(argv) if args is None else args
    try:
        result = run(args)
    except JaxprvrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    if report is not None:
        report(result)
    print(json.dumps(jsonable(result)))
    return 0


# ---------------------------------------------------------------------------------------------- compile cache
COMPILE_CACHE_ENV = "JAXPRVR_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = os.path.join("~", ".cache", "jaxprvr", "jit")
# Every executable is written, however fast it compiled: on CPU the many small eager-op kernels (each ~30-60 ms to
# compile) add up to a good part of a launch's compile time, and reading one back costs a few ms.
MIN_COMPILE_SECS = 0.0


def add_compile_cache_args(parser):
    """``--compile-cache DIR`` / ``--no-compile-cache`` (see :func:`enable_compile_cache`)."""
    g = parser.add_argument_group("compilation cache")
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX persistent compilation cache folder (default: ${COMPILE_CACHE_ENV}, else "
                        f"{DEFAULT_COMPILE_CACHE}); a second launch of the same config loads its compiled "
                        "executables from there")
    g.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, write no cache")
    return parser


def compile_cache_dir(args) -> str | None:
    """The cache folder :func:`enable_compile_cache` uses: ``--compile-cache``, else ``$JAXPRVR_COMPILE_CACHE``,
    else ``~/.cache/jaxprvr/jit``; ``None`` with ``--no-compile-cache``."""
    if getattr(args, "no_compile_cache", False):
        return None
    d = getattr(args, "compile_cache", None) or os.environ.get(COMPILE_CACHE_ENV) or DEFAULT_COMPILE_CACHE
    return os.path.abspath(os.path.expanduser(d))


def _simulated_cpu_devices() -> int:
    """The device count forced by ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (1 when unset)."""
    import re

    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def enable_compile_cache(args) -> str | None:
    """Turns JAX's persistent compilation cache on (call before anything compiles); returns the folder, or
    ``None`` when off. A cache folder this process already has (``JAX_COMPILATION_CACHE_DIR``, or one set by a
    program that calls the CLI's ``main``, as the test suite does) is kept with its settings unless
    ``--compile-cache`` names another. A folder that cannot be written turns the cache off with a one-line
    warning on stderr."""
    import jax

    if getattr(args, "no_compile_cache", False):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if _simulated_cpu_devices() > 1:
        # JAX 0.10 can deadlock in the first step of a multi-device CPU executable loaded from the cache
        # (seen with 2 simulated devices and with 2 processes); compile afresh instead.
        print("note: compilation cache off with several simulated CPU devices (xla_force_host_platform_device_count)",
              file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and not getattr(args, "compile_cache", None):
        return current
    d = compile_cache_dir(args)
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        print(f"warning: compilation cache off: cannot write to {d} ({e.strerror or e}); pass --compile-cache DIR "
              "or --no-compile-cache", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return d
