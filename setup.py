"""Build glue for the C extension; all metadata lives in pyproject.toml.

``MESHPROXY_NATIVE_DEBUG=asan`` builds the engine with AddressSanitizer (see
native_tls/test-asan.sh, which runs the native tests under it).
"""

import os

from setuptools import Extension, setup

SOURCES = ["native_tls/module.c", "native_tls/engine.c", "native_tls/context.c"]
HEADERS = ["native_tls/engine.h", "native_tls/context.h"]
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wstrict-prototypes", "-Wno-missing-field-initializers",
            "-Werror=implicit-function-declaration"]  # fmt: skip

debug = os.environ.get("MESHPROXY_NATIVE_DEBUG") == "asan"
extra_compile = ["-O2", "-pthread", *WARNINGS]
extra_link = ["-pthread"]
if debug:
    extra_compile = ["-O1", "-g", "-pthread", "-fsanitize=address,undefined",
                     "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", *WARNINGS]  # fmt: skip
    extra_link = ["-pthread", "-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "meshproxy._native_tls",
            sources=SOURCES,
            depends=HEADERS,
            libraries=["ssl", "crypto"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ]
)
