"""Command-line entry points: `python -m launch.<name>` (README, "Commands")."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os


def _tpu_possible() -> bool:
  """Whether this host may have TPU chips: TPU env vars or device files, a Google PCI device
  (TPU chips are some; so is GCE's network card), or no PCI listing to tell (containers)."""
  if any(k in _os.environ for k in ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID")):
    return True
  if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):
    return True
  vendors = _glob.glob("/sys/bus/pci/devices/*/vendor")
  if not vendors:
    return True
  for vendor in vendors:
    try:
      with open(vendor) as f:
        if f.read().strip().lower() == "0x1ae0":
          return True
    except OSError:
      return True
  return False


def quiet_libtpu_without_tpu(environ, *, libtpu_installed: bool, tpu_possible: bool) -> None:
  """libtpu (the `tpu` extra, launch.aot's compiler) probes cloud metadata when JAX starts and,
  on a host without a TPU, prints five lines of warnings around every command's output. Where a
  TPU is impossible (`_tpu_possible`), TPU_WORKER_HOSTNAMES=localhost and TPU_HOST_BOUNDS=1,1,1
  (one host: what a host without TPUs is) stop the probe. On TPU VMs, wherever it cannot tell,
  or when TPU_WORKER_HOSTNAMES is set, nothing changes. AOT compiles name their topology
  explicitly (the DiT-XL/2 v5p 4x4x4 compile reports the same bytes either way)."""
  if "TPU_WORKER_HOSTNAMES" in environ or not libtpu_installed or tpu_possible:
    return
  environ["TPU_WORKER_HOSTNAMES"] = "localhost"
  environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


quiet_libtpu_without_tpu(_os.environ,
                         libtpu_installed=_importlib_util.find_spec("libtpu") is not None,
                         tpu_possible=_tpu_possible())
