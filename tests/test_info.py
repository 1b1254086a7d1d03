"""`python -m fairkernels info` and the JIT build's announcement (without compiling anything)."""
import os
import subprocess
import sys

import torch

from fairkernels import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_versions_extension_backends_and_threads():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fairkernels", "info"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line[:12].strip(): line[12:] for line in proc.stdout.splitlines() if line[:12].strip()}
    assert rows["torch"].startswith(torch.__version__)
    assert rows["extension"].split(":")[0] in ("prebuilt", "jit", "none", "not built yet")
    assert rows["threads"].startswith("1 ")
    backends = [line for line in proc.stdout.splitlines() if "cpu: auto ->" in line or "cuda:" in line]
    assert len(backends) == 2 and "reference" in backends[0]


def test_info_without_any_extension_says_none_and_why():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FAIRKERNELS_NO_EXTENSION="1", FAIRKERNELS_NO_JIT="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "fairkernels", "info"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "extension   none: FAIRKERNELS_NO_JIT=1" in proc.stdout
    assert "cpu: auto -> reference" in proc.stdout


def test_jit_build_announces_itself_once_and_finds_ninja(tmp_path, monkeypatch, capsys):
    """One stderr line before a compile (what, where, how long); none when the cache is current.
    cpp_extension.load is replaced: this checks the announcement, not the compiler."""
    import torch.utils.cpp_extension as cpp
    calls = []
    monkeypatch.setattr(cpp, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("FAIRKERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin")
    _extension._jit_build()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "compiling the C++/OpenMP kernels" in lines[0] and "minutes" in lines[0]
    assert str(tmp_path) in lines[0] and calls and calls[0]["build_directory"] == str(tmp_path)
    try:
        import ninja
        assert ninja.BIN_DIR in os.environ["PATH"].split(os.pathsep)
    except ImportError:
        pass
    library = tmp_path / f"{_extension.JIT_NAME}.so"
    library.write_bytes(b"")                            # a cached build newer than every source
    assert _extension.jit_is_current()
    _extension._jit_build()
    assert capsys.readouterr().err == "" and len(calls) == 2


def test_build_reports_where_the_kernels_come_from(capsys):
    from fairkernels.__main__ import build
    code = build()
    out, err = capsys.readouterr()
    status = _extension.status()
    if code == 0:
        assert status["source"] in ("prebuilt", "jit") and status["where"] in out
    else:
        assert status["source"] == "none" and "no compiled kernels" in err
