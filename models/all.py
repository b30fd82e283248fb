"""Imports every built-in model module so each registers itself in `models.registry`."""
import importlib

for _name in ("models.mlp", "models.dit", "models.vae", "models.heads", "models.unet", "models.sana",
              "models.dcae"):
  try:
    importlib.import_module(_name)
  except ModuleNotFoundError as e:  # a family not present in this checkout
    if e.name != _name:
      raise
