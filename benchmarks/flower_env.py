"""Flower 1.42's own venv, for the Flower benchmarks, the Flower interop test and its example, and the
environments Flower's processes run in. The one place that creates or locates the venv.

Users install both in one environment (`pip install "fedadapt[sim,flower]"`). The tests and benchmarks
keep Flower and Ray out of the project venv, and run Flower from its own:

* Flower's own venv, benchmarks/.venv-flower (torch + flwr[simulation] + psutil), made on first use by
  ensure_flower_venv(); flower_bin(name) is one of its programs;
* flower_process_env(flwr_home, ...): the environment of a benchmark's Flower command (the venv's bin first
  on PATH, a given FLWR_HOME, offline and quiet);
* flower_python(): the venv's python and an environment in which it also imports this checkout of
  fedadapt, through a one-line .pth hook in the venv that, only in a process whose environment has
  FEDADAPT_OVERLAY, appends the listed directories to sys.path AFTER Flower's site-packages. With this
  checkout and the project venv's site-packages listed, Flower's own packages win and what fedadapt needs
  that Flower lacks (transformers, peft, safetensors, scikit-learn, ...) comes from the project venv.
  Processes without the variable (the other benchmarks) see the venv unchanged. fedadapt.flower never
  imports fedadapt.proto.

    from flower_env import flower_python
    py, env = flower_python()        # subprocess.run([py, ...], env=env)
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from harness import BENCH_DIR, REPO, log

FLOWER_VENV = BENCH_DIR / ".venv-flower"
FLOWER_READY = FLOWER_VENV / ".bench-ready"  # written once the install has finished
TORCH_PIN = "torch==2.13.0"
FLWR_PIN = "flwr[simulation]==1.42.0"
# offline and quiet: no update check, no telemetry, no `uv sync` of the app's dependencies per run
OFFLINE = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
OVERLAY_VAR = "FEDADAPT_OVERLAY"
_HOOK_NAME = "fedadapt_overlay.pth"
# no comprehension: site.py execs .pth lines with separate globals and locals, which hides names from it
_HOOK = (f"import os, site; list(map(site.addsitedir, filter(None, os.environ.get({OVERLAY_VAR!r}, '')"
         ".split(os.pathsep))))\n")


def flower_bin(name: str) -> Path:
    """A program of the Flower venv (python, flwr, flower-superlink, ...)."""
    return FLOWER_VENV / "bin" / name


def ensure_flower_venv() -> Path:
    """Create benchmarks/.venv-flower on first use; return its python."""
    py = flower_bin("python")
    if FLOWER_READY.exists() and py.exists():
        return py
    log(f"[setup] creating Flower virtualenv at {FLOWER_VENV} (first use; ~1-3 min)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(FLOWER_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    # torch FIRST and pinned: resolves to the local CPU wheel (pip find-links); a bare
    # `torch` (or letting another package pull it in) would fetch the CUDA build.
    log(f"[setup] pip install {TORCH_PIN}")
    subprocess.run([*pip, TORCH_PIN], check=True)
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    log(f"[setup] torch in Flower venv: {out}")
    if not out.endswith("None"):
        log("[setup] WARNING: the installed torch is a CUDA build (expected +cpu)")
    log(f"[setup] pip install {FLWR_PIN} psutil")
    subprocess.run([*pip, FLWR_PIN, "psutil", TORCH_PIN], check=True)  # keep torch pinned
    FLOWER_READY.write_text("ok\n")
    return py


def flower_process_env(flwr_home: Path | str, **extra: str) -> dict[str, str]:
    """This process's environment made the Flower venv's: its bin first on PATH, VIRTUAL_ENV set, no
    PYTHONPATH or PYTHONHOME (they would put the project venv's packages first), FLWR_HOME=flwr_home, offline
    (OFFLINE), no colours; then ``extra`` (a run's tag, RAY_TMPDIR, ...)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({
        "PATH": f"{FLOWER_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(FLOWER_VENV),
        "FLWR_HOME": str(flwr_home),
        **OFFLINE,
        "NO_COLOR": "1",
        "TERM": "dumb",
        **extra,
    })
    return env


def flwr_ls(env: dict[str, str], connection: str) -> dict:
    """`flwr ls CONNECTION --format json` (the runs and their status), or {"success": False, ...} with why."""
    try:
        r = subprocess.run([str(flower_bin("flwr")), "ls", connection, "--format", "json"], env=env,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {"success": False, "error": "flwr ls timed out"}
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"success": False, "raw_stdout": r.stdout[-2000:], "raw_stderr": r.stderr[-2000:]}


def _project_site_packages() -> list[str]:
    """Site-packages of the venv running this (the project venv, with fedadapt's dependencies)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _install_hook(py: Path) -> None:
    """Write the .pth hook into the Flower venv's site-packages (idempotent)."""
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    hook = Path(purelib) / _HOOK_NAME
    if not hook.exists() or hook.read_text() != _HOOK:
        hook.write_text(_HOOK)


def flower_python() -> tuple[Path, dict[str, str]]:
    """(python of the Flower venv, an environment in which it also imports this checkout of fedadapt)."""
    py = ensure_flower_venv()
    _install_hook(py)
    env = dict(os.environ)
    env[OVERLAY_VAR] = os.pathsep.join([str(REPO), *_project_site_packages()])
    env.update(OFFLINE)
    env.pop("PYTHONPATH", None)  # would put the project venv's packages ahead of Flower's
    return py, env


if __name__ == "__main__":
    # eval "$(.venv/bin/python benchmarks/flower_env.py)": this shell's `flwr` and `python` are Flower's venv,
    # with this checkout of fedadapt importable (examples/flower/README.md)
    import shlex

    py, env = flower_python()
    for k in [OVERLAY_VAR, *OFFLINE]:
        print(f"export {k}={shlex.quote(env[k])}")
    print(f"export PATH={shlex.quote(str(py.parent))}:\"$PATH\"; unset PYTHONPATH")
