"""Builds the one compiled module, multitun._fastpath.

MULTITUN_DEBUG=1 builds with line tracing and an annotated HTML report of the
Cython code (for profiling and coverage of the data plane); the default build is
optimised and has neither.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("MULTITUN_DEBUG") == "1"

extension = Extension(
    "multitun._fastpath",
    ["multitun/_fastpath.pyx"],
    extra_compile_args=["-O2"] + (["-g", "-O0"] if debug else []),
    define_macros=[("CYTHON_TRACE_NOGIL", "1")] if debug else [],
)

setup(
    ext_modules=cythonize(
        [extension],
        language_level=3,
        annotate=debug,
        compiler_directives={"linetrace": debug, "embedsignature": True},
    ),
)
