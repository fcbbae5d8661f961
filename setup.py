"""Build glue for the C extension; all metadata lives in pyproject.toml.

``MESHPROXY_NATIVE_DEBUG=asan`` builds the engine with AddressSanitizer (see
native_tls/test-asan.sh, which runs the native tests under it).
"""

import os

from setuptools import Extension, setup

SOURCES = [
    "native_tls/module.c",
    "native_tls/engine.c",
    "native_tls/context.c",
    "native_tls/h2relay.c",
]
HEADERS = ["native_tls/engine.h", "native_tls/context.h", "native_tls/h2relay.h"]
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wstrict-prototypes"]
WARNINGS += ["-Werror=implicit-function-declaration"]
SANITIZERS = "-fsanitize=address,undefined"

debug = os.environ.get("MESHPROXY_NATIVE_DEBUG") == "asan"
extra_compile = ["-O2", "-pthread", *WARNINGS]
extra_link = ["-pthread"]
if debug:  # native_tls/test-asan.sh
    extra_compile = ["-O1", "-g", "-pthread", SANITIZERS, "-fno-omit-frame-pointer", *WARNINGS]
    extra_compile.append("-fno-sanitize-recover=undefined")
    extra_link = ["-pthread", SANITIZERS]

setup(
    ext_modules=[
        Extension(
            "meshproxy._native_tls",
            sources=SOURCES,
            depends=HEADERS,
            libraries=["ssl", "crypto", "nghttp2"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ]
)
