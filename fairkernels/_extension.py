"""Loads the compiled extension that registers the C++/CUDA kernels as torch.ops.fairkernels.*.

Order: the prebuilt `fairkernels._C` (pip install --no-build-isolation), else a JIT build of the
bundled csrc/ with torch.utils.cpp_extension.load (cache dir: $FAIRKERNELS_CACHE, default
~/.cache/fairkernels), else None with one warning: the ops then use the reference backend.
FAIRKERNELS_NO_JIT=1 skips the JIT build; FAIRKERNELS_NO_EXTENSION=1 ignores the prebuilt module
(tests of the fallback paths). Once the ops are registered, fairkernels._fake adds their fake
(meta) implementations for torch.compile.
"""
from __future__ import annotations

import glob
import os
import warnings


def _source_dir() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def _jit_build():
    import torch.utils.cpp_extension as cpp

    src = _source_dir()
    if src is None:
        raise RuntimeError("csrc/ sources not found next to the package")
    cache = os.environ.get("FAIRKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fairkernels"))
    os.makedirs(cache, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(src, "cpu", "*.cpp"))) + [os.path.join(src, "ops.cpp")]
    cpp.load(name="fairkernels_C", sources=sources, build_directory=cache,
             extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-std=c++17"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)


def _register_fakes() -> None:
    from fairkernels import _fake  # noqa: F401  (meta kernels so torch.compile can trace the ops)


# The outcome of the first load(); a plain dict (not functools.lru_cache) so that torch.compile
# traces load() as a constant lookup without a warning.
_LOADED: dict = {}


def load() -> bool:
    """True when torch.ops.fairkernels kernels are registered; warns once when they are not."""
    if "ok" not in _LOADED:
        _LOADED["ok"] = _load_once()
    return _LOADED["ok"]


def _load_once() -> bool:
    if os.environ.get("FAIRKERNELS_NO_EXTENSION") != "1":
        try:
            from fairkernels import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)
            _register_fakes()
            return True
        except ImportError:
            pass
    if os.environ.get("FAIRKERNELS_NO_JIT") != "1":
        try:
            _jit_build()
            _register_fakes()
            return True
        except Exception as err:  # a missing compiler, headers, ... : fall back, but say so
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
        else:
            reason = ""
    else:
        reason = "FAIRKERNELS_NO_JIT=1"
    warnings.warn(f"fairkernels: compiled kernels unavailable ({reason}); the 'cpu' and 'cuda' "
                  "backends are disabled and ops use the pure-PyTorch reference", RuntimeWarning,
                  stacklevel=3)
    return False
