"""What ``meshproxy run`` does to start fast and then serve as a long-lived process."""

from __future__ import annotations

import gc
import subprocess
import sys

from meshproxy.runtime import _main


def test_serving_collects_garbage_again_with_the_start_frozen() -> None:
    gc.disable()
    try:
        _main._collect_from_now()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0  # the start's objects: never scanned again
    finally:
        gc.unfreeze()
        gc.enable()


def test_only_run_starts_without_the_collector() -> None:
    """``python -m meshproxy run`` turns the collector off until it serves; other
    commands (the coordinator is long-lived too) keep it."""
    probe = (
        "import gc, sys, runpy; sys.argv = ['meshproxy', {word!r}, '--help']\n"
        "import meshproxy.cli\n"
        "meshproxy.cli.main = lambda: print(gc.isenabled()) or 0\n"
        "runpy.run_module('meshproxy', run_name='__main__')\n"
    )
    for word, enabled in (("run", "False"), ("coordinator", "True")):
        out = subprocess.run(
            [sys.executable, "-c", probe.format(word=word)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.stdout.strip() == enabled, out.stderr
