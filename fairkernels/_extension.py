"""Loads the compiled extension that registers the C++/CUDA kernels as torch.ops.fairkernels.*.

Order: the prebuilt `fairkernels._C` (pip install --no-build-isolation), else a JIT build of the
bundled csrc/ with torch.utils.cpp_extension.load (cache dir: $FAIRKERNELS_CACHE, default
~/.cache/fairkernels), else None with one warning: the ops then use the reference backend.
FAIRKERNELS_NO_JIT=1 skips the JIT build; FAIRKERNELS_NO_EXTENSION=1 ignores the prebuilt module
(tests of the fallback paths). Once the ops are registered, fairkernels._fake adds their fake
(meta) implementations for torch.compile. A JIT build announces itself with one line on
stderr (it takes minutes; later runs reuse the cached library); status() says which of the
three outcomes happened, for `python -m fairkernels info`.
"""
from __future__ import annotations

import glob
import os
import sys
import warnings

JIT_NAME = "fairkernels_C"
# Measured (README, "Install"): a clean build of csrc/ took 3.0 CPU-minutes, 9 min 47 s wall on a
# 2-core VM shared with other jobs (load average 1 -> 16); idle, about 1.5-2 minutes (from the CPU time).
JIT_MINUTES = "3 to 10"


def _source_dir() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def cache_dir() -> str:
    return os.environ.get("FAIRKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fairkernels"))


def _jit_sources(src: str) -> list:
    return sorted(glob.glob(os.path.join(src, "cpu", "*.cpp"))) + [os.path.join(src, "ops.cpp")]


def jit_library() -> str:
    return os.path.join(cache_dir(), f"{JIT_NAME}.so")


def jit_is_current() -> bool:
    """True when the cached JIT library exists and is newer than every bundled source."""
    src = _source_dir()
    if src is None or not os.path.exists(jit_library()):
        return False
    inputs = glob.glob(os.path.join(src, "cpu", "*")) + [os.path.join(src, "ops.cpp")]
    newest = max(os.path.getmtime(path) for path in inputs)
    return os.path.getmtime(jit_library()) >= newest


def _ninja_on_path() -> None:
    """torch's JIT runs `ninja` from PATH; the pip package puts it next to the interpreter,
    which is not on PATH when a venv's python is run without activating the venv."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _jit_build():
    import torch.utils.cpp_extension as cpp

    src = _source_dir()
    if src is None:
        raise RuntimeError("csrc/ sources not found next to the package")
    cache = cache_dir()
    os.makedirs(cache, exist_ok=True)
    _ninja_on_path()
    if not jit_is_current():
        print(f"fairkernels: compiling the C++/OpenMP kernels into {cache} (once; about {JIT_MINUTES} minutes "
              "on 2 cores, later runs reuse it; pip install --no-build-isolation . compiles them at install "
              "instead, FAIRKERNELS_NO_JIT=1 skips this)", file=sys.stderr, flush=True)
    cpp.load(name=JIT_NAME, sources=_jit_sources(src), build_directory=cache,
             extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi", "-std=c++17"], extra_ldflags=["-fopenmp"],
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


def status() -> dict:
    """How the kernels were (or were not) loaded: {"source": "prebuilt" | "jit" | "none",
    "where": a path or the reason}. Does not load anything itself."""
    return dict(_LOADED.get("status", {"source": "not loaded yet", "where": ""}))


def _load_once() -> bool:
    if os.environ.get("FAIRKERNELS_NO_EXTENSION") != "1":
        try:
            from fairkernels import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)
            _register_fakes()
            _LOADED["status"] = {"source": "prebuilt", "where": _C.__file__}
            return True
        except ImportError as err:
            prebuilt_error = f"{type(err).__name__}: {err}".splitlines()[0]
    else:
        prebuilt_error = "FAIRKERNELS_NO_EXTENSION=1"
    if os.environ.get("FAIRKERNELS_NO_JIT") != "1":
        try:
            _jit_build()
            _register_fakes()
            _LOADED["status"] = {"source": "jit", "where": jit_library()}
            return True
        except Exception as err:  # a missing compiler, headers, ... : fall back, but say so
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
    else:
        reason = "FAIRKERNELS_NO_JIT=1"
    _LOADED["status"] = {"source": "none", "where": f"{reason} (prebuilt: {prebuilt_error})"}
    warnings.warn(f"fairkernels: compiled kernels unavailable ({reason}); the 'cpu' and 'cuda' "
                  "backends are disabled and ops use the pure-PyTorch reference", RuntimeWarning,
                  stacklevel=3)
    return False
