"""Run the Triton kernel tests on CPU in Triton's interpreter.

``TRITON_INTERPRET=1`` has to be in the environment before triton is imported: ``triton.language``'s own helpers
are decorated at import time, and ``triton.jit`` reads the variable when decorating. It is set here, at conftest
import; pytest collects ``tests/kernels`` before the ``tests/test_*.py`` modules (which pull in triton through
diffusers). Where triton was nevertheless imported earlier without the interpreter (e.g. a test file named
before this directory on the command line), its modules are dropped from ``sys.modules`` so that
:mod:`wadi_core.kernels.lorad_triton`, imported only by these tests, gets a fresh interpreter-mode triton.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        del sys.modules[_name]
