"""Command-line entry points: `python -m launch.<name>` (README, "Commands")."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os


def _google_pci_device() -> bool:
  """Whether any PCI device of Google's vendor id (TPU chips are some) is visible."""
  for vendor in _glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip().lower() == "0x1ae0":
          return True
    except OSError:
      return True   # unreadable: assume it may be a TPU
  return False


def quiet_libtpu_without_tpu(environ, *, libtpu_installed: bool, google_device: bool) -> None:
  """libtpu (the `tpu` extra, launch.aot's compiler) probes cloud metadata when JAX starts and,
  on a host without a TPU, prints five lines of warnings around every command's output. With no
  Google PCI device visible, TPU_WORKER_HOSTNAMES=localhost and TPU_HOST_BOUNDS=1,1,1 (one host:
  what a host without TPUs is) stop the probe. On TPU VMs, or when TPU_WORKER_HOSTNAMES is set,
  nothing changes; AOT compiles name their topology explicitly (the DiT-XL/2 v5p 4x4x4 compile
  reports the same bytes either way)."""
  if "TPU_WORKER_HOSTNAMES" in environ or not libtpu_installed or google_device:
    return
  environ["TPU_WORKER_HOSTNAMES"] = "localhost"
  environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


quiet_libtpu_without_tpu(_os.environ,
                         libtpu_installed=_importlib_util.find_spec("libtpu") is not None,
                         google_device=_google_pci_device())
