"""`python -m fairkernels info`: what this installation can run (version, torch, triton, the
compiled extension and where it came from, the backends of each device, threads).
`python -m fairkernels build` compiles the C++ kernels now instead of at the first op call.
Any other arguments go to the CLI (`python -m fairkernels train ...` = `fairkernels train ...`).
"""
from __future__ import annotations

import importlib.util
import os
import sys

OP = "fcmi"        # the op whose backends `info` lists; every fused op family has the same ones


def _extension_line(loadable: bool) -> str:
    from fairkernels import _extension
    if not loadable:
        return (f"not built yet: the first kernel call JIT-compiles it into {_extension.cache_dir()} "
                f"(about {_extension.JIT_MINUTES} minutes on 2 cores); `python -m fairkernels build` does it now")
    _extension.load()
    status = _extension.status()
    return f"{status['source']}: {status['where']}"


def _extension_loadable() -> bool:
    """True when loading the extension is quick (a prebuilt module or a current JIT cache), so
    `info` never starts a minutes-long compile by itself."""
    from fairkernels import _extension
    prebuilt = os.environ.get("FAIRKERNELS_NO_EXTENSION") != "1" and \
        importlib.util.find_spec("fairkernels._C") is not None
    cached = os.environ.get("FAIRKERNELS_NO_JIT") != "1" and _extension.jit_is_current()
    return prebuilt or cached or os.environ.get("FAIRKERNELS_NO_JIT") == "1"


def _backend_lines(torch, loadable: bool) -> list:
    from fairkernels import _backend
    from fairkernels._device import cuda_unavailable_reason
    lines = []
    for device_name in ("cpu", "cuda"):
        if device_name == "cuda" and cuda_unavailable_reason() is not None:
            lines.append(f"cuda: unavailable ({cuda_unavailable_reason()})")
            continue
        device = torch.device(device_name)
        ready, missing = [], []
        for backend in _backend.BACKENDS[1:]:
            if backend == "cpu" and not loadable:
                missing.append("cpu (extension not built yet)")
                continue
            reason = _backend.unavailable_reason(backend, device, torch.float32, OP)
            (ready if reason is None else missing).append(backend if reason is None else f"{backend} ({reason})")
        auto = "cpu" if device_name == "cpu" and not loadable else \
            _backend.choose("auto", device, torch.float32, OP)
        lines.append(f"{device_name}: auto -> {auto}; available: {', '.join(ready)}"
                     + (f"; unavailable: {'; '.join(missing)}" if missing else ""))
    return lines


def info() -> str:
    import torch

    import fairkernels
    from fairkernels._device import cuda_unavailable_reason
    loadable = _extension_loadable()
    cuda = cuda_unavailable_reason()
    if cuda is None:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        torch_line = f"{torch.__version__} (CUDA {torch.version.cuda}; {names})"
    else:
        torch_line = f"{torch.__version__} (CUDA unavailable: {cuda})"
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_line = triton.__version__ + (" (TRITON_INTERPRET=1: kernels run in the CPU interpreter)"
                                            if os.environ.get("TRITON_INTERPRET") == "1" else "")
    else:
        triton_line = "not installed (GPU ops use the reference)"
    rows = [("fairkernels", f"{fairkernels.__version__} ({os.path.dirname(fairkernels.__file__)})"),
            ("python", sys.version.split()[0]), ("torch", torch_line), ("triton", triton_line),
            ("extension", _extension_line(loadable)),
            ("threads", f"{torch.get_num_threads()} (torch intra-op; OMP_NUM_THREADS="
                        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} CPUs)")]
    backends = _backend_lines(torch, loadable)
    rows += [("backends", backends[0])] + [("", line) for line in backends[1:]]
    return "\n".join(f"{name:<12}{value}" for name, value in rows)


def build() -> int:
    from fairkernels import _extension
    if not _extension.load():
        print(f"fairkernels: no compiled kernels: {_extension.status()['where']}", file=sys.stderr)
        return 1
    status = _extension.status()
    print(f"fairkernels: compiled kernels ready ({status['source']}: {status['where']})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["info"]:
        print(info())
        return 0
    if argv == ["build"]:
        return build()
    from fairkernels import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
