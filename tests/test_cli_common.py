"""The CLI's shared trust and file helpers (``cli/_common.py``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from meshproxy.cli._common import add_coordinator_options, file_name, trusted_root, user_identity
from meshproxy.errors import ConfigError, UsageError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_coordinator_options(p)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    return p.parse_args(["--coordinator", "127.0.0.1:9", *argv])


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_names_that_are_not_one_file_name_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"secret name {name!r} cannot be a file name")):
        file_name(name, "secret name")
    assert file_name("db.key", "secret name") == "db.key"


def test_policy_and_root_exclude_each_other(tmp_path: Path) -> None:
    for flag in ("--policy", "--collateral"):
        args = parse("--root", str(tmp_path / "root.pem"), flag, str(tmp_path / "f"))
        with pytest.raises(UsageError, match="--policy and --collateral check the coordinator"):
            trusted_root(args)


def test_policy_files_are_read_before_any_connection(tmp_path: Path) -> None:
    # Port 9 is never contacted: the missing policy fails first, named.
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        trusted_root(parse("--policy", str(tmp_path / "nope.yaml")))
    with pytest.raises(UsageError, match="cannot read"):
        trusted_root(parse("--collateral", str(tmp_path / "nope.json")))


def test_unreadable_root_and_cert_name_their_flag(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^--root .*missing.pem: No such file"):
        trusted_root(parse("--root", str(tmp_path / "missing.pem")))
    args = parse("--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    with pytest.raises(UsageError, match=r"^--cert .*c.pem: No such file"):
        user_identity(args)
