#!/usr/bin/env python
"""Execute a repro notebook with papermill in the "ovseg" Jupyter kernel (scripts/setup_env.sh
registers it), injecting `params_file` and `out_dir`.

Usage: scripts/run_notebook.py NB.ipynb OUT_DIR [-p NAME VALUE]...   (via scripts/run_notebook.sh)

Two kernel settings keep a healthy run free of WARNING/ERROR lines, each for its cause:
- ipykernel >= 7 warns "Kernel is running over TCP without encryption" unless the kernel
  manager provisions CurveZMQ keys. `transport_encryption = "auto"` makes jupyter_client do so
  for kernels whose spec declares `supported_encryption: ["curve"]` (ipykernel's does): the
  kernel's sockets are then encrypted and the warning is gone because its cause is.
- jupyter_client's shutdown sends SIGINT before the shutdown request. After the last cell the
  kernel is idle, so the interrupt has nothing to stop; when it lands while ipykernel is still
  flushing a message or advancing its event loop it logs "ERROR | KeyboardInterrupt caught in
  kernel" although nothing failed. `QuietShutdownKernelManager` skips that one interrupt and
  asks politely; jupyter_client still sends SIGTERM, then SIGKILL, to a kernel that does not
  exit within `shutdown_wait_time`, and interrupts on a cell timeout are unchanged.
"""
import argparse, os, sys
from pathlib import Path

import yaml
from jupyter_client import AsyncKernelManager
from traitlets.config import Config

KERNEL = os.environ.get("OVSEG_KERNEL", "ovseg")
# setup_env.sh registers the kernel inside this environment (--sys-prefix): look there first, so a
# kernel of the same name registered by another checkout or user-wide never shadows it.
_OWN = str(Path(sys.prefix) / "share" / "jupyter")
if _OWN not in os.environ.get("JUPYTER_PATH", "").split(os.pathsep):
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (_OWN, os.environ.get("JUPYTER_PATH", "")) if p)

class QuietShutdownKernelManager(AsyncKernelManager):
    "An AsyncKernelManager that does not SIGINT an idle kernel it is shutting down."
    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down: return
        await super()._async_interrupt_kernel()
    interrupt_kernel = _async_interrupt_kernel

def kernel_config() -> Config:
    c = Config()
    c.KernelManager.transport_encryption = "auto"
    return c

def same_python(exe: str) -> bool:
    "Is `exe` (a kernel spec's argv[0]) this interpreter? Paths are compared unresolved: a venv's python is a link."
    return exe in ("python", "python3") or os.path.abspath(exe) == os.path.abspath(sys.executable)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook"); p.add_argument("out_dir")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="extra papermill parameter; VALUE is read as YAML (numbers, booleans, strings)")
    p.add_argument("-k", "--kernel", default=KERNEL, help=f"Jupyter kernel name (default {KERNEL})")
    a = p.parse_args(argv)
    import papermill as pm
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try: spec = KernelSpecManager().get_kernel_spec(a.kernel)
    except NoSuchKernel:
        sys.exit(f"run_notebook: no Jupyter kernel named {a.kernel!r}; run scripts/setup_env.sh (or `make env`), "
                 f"which registers it, or set OVSEG_KERNEL to another kernel name")
    if a.kernel == "ovseg" and not same_python(spec.argv[0]):
        sys.exit(f"run_notebook: the Jupyter kernel 'ovseg' runs {spec.argv[0]}, not this environment's "
                 f"{sys.executable} (registered from another checkout?). Re-register it: {sys.executable} -m "
                 f"ipykernel install --sys-prefix --name ovseg --display-name ovseg")
    out = Path(a.out_dir); out.mkdir(parents=True, exist_ok=True)
    # A DVC stage regenerates everything it writes: training runs inside it replace earlier runs
    # (ovseg.train.fit otherwise refuses to overwrite another run's checkpoint).
    os.environ.setdefault("OVSEG_OVERWRITE", "1")
    params = {"params_file": "params.yaml", "out_dir": str(a.out_dir)}
    params.update({k: yaml.safe_load(v) for k, v in a.parameter})
    print(f"run_notebook: {a.notebook} -> {out / Path(a.notebook).name} (kernel {a.kernel})", flush=True)
    pm.execute_notebook(a.notebook, str(out / Path(a.notebook).name), parameters=params, kernel_name=a.kernel,
                        cwd=".", progress_bar=False, kernel_manager_class=QuietShutdownKernelManager,
                        config=kernel_config())
    return 0

if __name__ == "__main__":
    sys.exit(main())
