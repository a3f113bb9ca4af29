"""What every jaxprvr command line shares: one-line errors, JSON on stdout, exit codes.

Exit status: 0 success (one JSON object on stdout), 2 a user mistake (one ``error: ...`` line on stderr
naming the file or key, what was expected and what was found; no traceback), 130 interrupted.
"""

from __future__ import annotations

import json
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


def run_cli(parser, run: Callable[[Any], dict], argv=None, *, report: Callable[[dict], None] | None = None,
            interrupted: str = "interrupted") -> int:
    """Parses ``argv``, calls ``run(args)`` and prints its result as one JSON line."""
    args = parser.parse_args(argv)
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
