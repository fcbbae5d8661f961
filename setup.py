"""Build glue for the C extension; all metadata lives in pyproject.toml."""

import os

from setuptools import Extension, setup

debug = os.environ.get("MESHPROXY_NATIVE_DEBUG") == "asan"
extra_compile = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
extra_link: list[str] = []
if debug:
    extra_compile = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wall"]
    extra_link = ["-fsanitize=address"]

setup(
    ext_modules=[
        Extension(
            "meshproxy._native_tls",
            sources=["native_tls/module.c"],
            libraries=["ssl", "crypto"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ]
)
