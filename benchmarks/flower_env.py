"""A Python with both Flower 1.42 and this checkout of fedadapt: for the Flower interop test, example, benchmark.

Users install both in one environment (`pip install "fedadapt[sim,flower]"`). The tests and benchmarks
keep Flower and Ray out of the project venv, and run Flower from its own:

* Flower's own venv, benchmarks/.venv-flower (torch + flwr[simulation]), made on first use by
  overhead_vs_flower.ensure_flower_venv (the same venv the other Flower benchmarks use);
* a one-line .pth hook in it that, only in a process whose environment has FEDADAPT_OVERLAY, appends
  the listed directories to sys.path AFTER Flower's site-packages. With this checkout and the project
  venv's site-packages listed, Flower's own packages win and what fedadapt needs that Flower lacks
  (transformers, peft, safetensors, scikit-learn, ...) comes from the project venv. Processes without the
  variable (the other benchmarks) see the venv unchanged. fedadapt.flower never imports fedadapt.proto.

    from flower_env import flower_python
    py, env = flower_python()        # subprocess.run([py, ...], env=env)
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OVERLAY_VAR = "FEDADAPT_OVERLAY"
_HOOK_NAME = "fedadapt_overlay.pth"
# no comprehension: site.py execs .pth lines with separate globals and locals, which hides names from it
_HOOK = (f"import os, site; list(map(site.addsitedir, filter(None, os.environ.get({OVERLAY_VAR!r}, '')"
         ".split(os.pathsep))))\n")


def _project_site_packages() -> list[str]:
    """Site-packages of the venv running this (the project venv, with fedadapt's dependencies)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _install_hook(py: Path) -> None:
    """Write the .pth hook into the Flower venv's site-packages (idempotent)."""
    import subprocess

    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    hook = Path(purelib) / _HOOK_NAME
    if not hook.exists() or hook.read_text() != _HOOK:
        hook.write_text(_HOOK)


def flower_python() -> tuple[Path, dict[str, str]]:
    """(python of the Flower venv, an environment in which it also imports this checkout of fedadapt)."""
    sys.path.insert(0, str(BENCH_DIR))
    from overhead_vs_flower import ensure_flower_venv

    py = ensure_flower_venv()
    _install_hook(py)
    env = dict(os.environ)
    env[OVERLAY_VAR] = os.pathsep.join([str(REPO_ROOT), *_project_site_packages()])
    # offline and quiet: no update check, no telemetry, no `uv sync` of the app's dependencies per run
    env.update(FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.pop("PYTHONPATH", None)  # would put the project venv's packages ahead of Flower's
    return py, env


if __name__ == "__main__":
    # eval "$(.venv/bin/python benchmarks/flower_env.py)": this shell's `flwr` and `python` are Flower's venv,
    # with this checkout of fedadapt importable (examples/flower/README.md)
    import shlex

    py, env = flower_python()
    keys = [OVERLAY_VAR, "FLWR_DISABLE_UPDATE_CHECK", "FLWR_TELEMETRY_ENABLED",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]
    for k in keys:
        print(f"export {k}={shlex.quote(env[k])}")
    print(f"export PATH={shlex.quote(str(py.parent))}:\"$PATH\"; unset PYTHONPATH")
