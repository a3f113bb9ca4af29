"""The CLIs' persistent compilation cache (jaxprvr.cli): on by default, ``--compile-cache DIR`` /
``$JAXPRVR_COMPILE_CACHE`` / ``--no-compile-cache``, a cache folder the process already has (the test suite's) is
kept, an unwritable folder is a warning. What touches JAX's process-wide cache settings runs in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxprvr import cli

REPO = Path(__file__).resolve().parent.parent


def _parsers():
    from jaxprvr import evaluate, train
    from parity import check

    return {
        "jaxprvr.train": (train.build_parser(), ["--config", "tvr", "--demo"]),
        "jaxprvr.evaluate": (evaluate.build_parser(), ["--config", "tvr", "--ckpt", "x"]),
        "parity.check": (check.build_parser(), ["--model", "mtm", "--config", "tvr"]),
    }


@pytest.mark.parametrize("prog", ["jaxprvr.train", "jaxprvr.evaluate", "parity.check"])
def test_every_compiling_cli_has_the_cache_on_by_default(prog, monkeypatch, tmp_path):
    parser, required = _parsers()[prog]
    monkeypatch.delenv(cli.COMPILE_CACHE_ENV, raising=False)
    args = parser.parse_args(required)
    assert not args.no_compile_cache
    assert cli.compile_cache_dir(args) == os.path.expanduser(os.path.join("~", ".cache", "jaxprvr", "jit"))
    monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "from-env"))
    assert cli.compile_cache_dir(parser.parse_args(required)) == str(tmp_path / "from-env")
    flag = parser.parse_args([*required, "--compile-cache", str(tmp_path / "from-flag")])
    assert cli.compile_cache_dir(flag) == str(tmp_path / "from-flag")  # the flag beats the environment
    assert cli.compile_cache_dir(parser.parse_args([*required, "--no-compile-cache"])) is None


def test_a_cache_folder_the_process_already_has_is_kept():
    """The test suite (tests/conftest.py) sets its own cache folder and threshold; a CLI's ``main`` called in
    process keeps both."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
              jax.config.jax_enable_compilation_cache)
    assert before[0]  # conftest set it
    parser = cli.add_compile_cache_args(argparse.ArgumentParser())
    assert cli.enable_compile_cache(parser.parse_args([])) == before[0]
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
            jax.config.jax_enable_compilation_cache) == before


def test_an_unwritable_cache_folder_is_a_one_line_warning(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    parser = cli.add_compile_cache_args(argparse.ArgumentParser())
    assert cli.enable_compile_cache(parser.parse_args(["--compile-cache", str(blocker / "jit")])) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compilation cache off: cannot write to ")
    assert str(blocker / "jit") in err[0]
    assert jax.config.jax_compilation_cache_dir == before  # untouched


# A fresh process: parse the CLI flags, enable the cache, compile one small function, report what JAX did.
CHILD = r"""
import argparse, json, sys
import jax.monitoring
hits = []
jax.monitoring.register_event_listener(lambda e, **_: hits.append(e) if e.endswith("cache_hits") else None)
from jaxprvr import cli
args = cli.add_compile_cache_args(argparse.ArgumentParser()).parse_args(sys.argv[1:])
used = cli.enable_compile_cache(args)
import jax, jax.numpy as jnp
y = jax.jit(lambda x: jnp.sin(x) * 2.0 + x.sum())(jnp.arange(7.0)).block_until_ready()
print(json.dumps({"used": used, "dir": jax.config.jax_compilation_cache_dir,
                  "enabled": jax.config.jax_enable_compilation_cache, "hits": len(hits)}))
"""


def _child(*argv, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", cli.COMPILE_CACHE_ENV)}
    env.update({"JAX_PLATFORMS": "cpu", **(env_extra or {})})
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_enabled_cache_writes_entries_and_a_second_launch_reads_them(tmp_path):
    cache = tmp_path / "jit"
    first = _child(env_extra={cli.COMPILE_CACHE_ENV: str(cache)})  # the default: on, folder from the environment
    assert first["used"] == first["dir"] == str(cache) and first["enabled"]
    entries = [p.name for p in cache.iterdir()]
    assert any(n.startswith("jit_") for n in entries), entries  # written, however fast it compiled
    assert first["hits"] == 0
    second = _child("--compile-cache", str(cache))
    assert second["hits"] >= 1


def test_no_compile_cache_leaves_the_cache_dir_unset(tmp_path):
    res = _child("--no-compile-cache", env_extra={cli.COMPILE_CACHE_ENV: str(tmp_path / "jit")})
    assert res["used"] is None and res["dir"] is None and not res["enabled"]
    assert not (tmp_path / "jit").exists()


def test_simulated_cpu_devices_turn_the_cache_off(monkeypatch, capsys):
    """Several simulated CPU devices (XLA_FLAGS): the cache is switched off with a one-line note (JAX 0.10 can
    deadlock running a multi-device CPU executable loaded from it). The process-wide setting is restored."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    assert cli._simulated_cpu_devices() == 8
    before = jax.config.jax_enable_compilation_cache
    try:
        parser = cli.add_compile_cache_args(argparse.ArgumentParser())
        assert cli.enable_compile_cache(parser.parse_args([])) is None
        assert jax.config.jax_enable_compilation_cache is False
        assert "compilation cache off" in capsys.readouterr().err
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert cli._simulated_cpu_devices() == 1
    monkeypatch.delenv("XLA_FLAGS")
    assert cli._simulated_cpu_devices() == 1
