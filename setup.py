"""Builds the compiled data plane, multitun._fastpath (its parts are in
multitun/fastpath/), its test hooks, multitun._testing, and the man page.

MULTITUN_LIBCRYPTO=PREFIX links a static libcrypto from PREFIX (made by
packaging/libcrypto.sh) instead of the system's shared one; the wheels are
built so.

MULTITUN_DEBUG=1 builds with line tracing and an annotated HTML report of the
Cython code (for profiling and coverage of the data plane); the default build is
optimised and has neither.

The man page, multitun(8), and the bash completion are generated from the
CLI's parser (argparse-manpage, shtab) when the package is built, and installed
with it into share/man/man8 and share/bash-completion/completions.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

debug = os.environ.get("MULTITUN_DEBUG") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
MAN_PAGE = os.path.join("build", "man", "multitun.8")
COMPLETION = os.path.join("build", "completion", "multitun")


class build_py_with_man_page(build_py):
    def run(self):
        super().run()
        import shtab
        from argparse_manpage.manpage import Manpage

        sys.path.insert(0, HERE)  # the package being built, not an installed one
        try:
            from multitun._version import __version__
            from multitun.cli import build_parser
        finally:
            sys.path.remove(HERE)
        page = Manpage(build_parser(), _data={
            "project_name": "multitun", "version": __version__, "manual_section": 8,
            "description": "multi-path duplicating tunnel: every packet over every path",
            "manual_title": "System Manager's Manual",
        })
        for path, text in ((MAN_PAGE, str(page)),
                           (COMPLETION, shtab.complete(build_parser(), shell="bash"))):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


def libcrypto() -> dict:
    """How the extensions link libcrypto: the system's shared one, or with
    MULTITUN_LIBCRYPTO a static one, whose release sets the speed of sealed
    mode (packaging/libcrypto.sh). The static copy's symbols stay private to
    each extension (ld(1), --exclude-libs), so neither binds to the libcrypto
    the Python process loads for hashlib and ssl, nor that one to it."""
    prefix = os.environ.get("MULTITUN_LIBCRYPTO")
    if not prefix:
        return {"libraries": ["crypto"]}
    archive = os.path.join(prefix, "lib", "libcrypto.a")
    if not os.path.isfile(archive):
        sys.exit(f"MULTITUN_LIBCRYPTO={prefix}: no {archive} (packaging/libcrypto.sh makes it)")
    # glibc before 2.34 keeps dlopen() and threads in libraries of their own.
    return {"include_dirs": [os.path.join(prefix, "include")], "extra_objects": [archive],
            "libraries": ["dl", "pthread"], "extra_link_args": ["-Wl,--exclude-libs,ALL"]}


# The data plane, and its stateless parts callable for tests (multitun._testing).
# The AEADs for sealed packets (AES-256-GCM, ChaCha20-Poly1305) come from OpenSSL's libcrypto.
extensions = [
    Extension(
        name, [source],
        **libcrypto(),
        extra_compile_args=["-O2"] + (["-g", "-O0"] if debug else []),
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if debug else [],
    )
    for name, source in (("multitun._fastpath", "multitun/_fastpath.pyx"),
                         ("multitun._testing", "multitun/_testing.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=debug,
        compiler_directives={"linetrace": debug, "embedsignature": True},
    ),
    cmdclass={"build_py": build_py_with_man_page},
    data_files=[("share/man/man8", [MAN_PAGE]),
                ("share/bash-completion/completions", [COMPLETION])],
)
