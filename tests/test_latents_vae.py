"""Latents and the VAE they belong to: `launch.precompute` records its VAE's hash, and a run
whose teacher pipeline (its `vae/`) or `eval.vae` is another VAE stops in one line, since the
networks would learn, or the evaluation decode, another VAE's latents (an SD1.5 teacher on
SDXL-VAE latents: both 4 channels, scaling 0.18215 against 0.13025)."""
import json
import os
import shutil
import types

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from distill import trainer  # noqa: E402
from distill.data.sources import make_source  # noqa: E402
from launch import precompute  # noqa: E402
from tests._tool_utils import save_tiny_vae  # noqa: E402


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
  """(latents dir, its VAE dir, a copy of that VAE with SDXL's scaling factor)."""
  from PIL import Image
  root = tmp_path_factory.mktemp("vae_latents")
  save_tiny_vae(root / "vae")
  other = root / "vae_xl"
  shutil.copytree(root / "vae", other)
  cfg = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))
  rng = np.random.default_rng(0)
  for i in range(4):
    os.makedirs(root / "imgs" / "a", exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        root / "imgs" / "a" / f"{i}.png")
  assert precompute.main(["--input", f"folder:{root / 'imgs'}", "--vae", str(root / "vae"),
                          "--out", str(root / "lat"), "--size", "16"]) == 0
  return str(root / "lat"), str(root / "vae"), str(other)


def _engine(lat, teacher_path, eval_vae="", other_vae=False):
  """What the check reads of an engine: the teacher's path, eval.vae and the streams."""
  source = make_source({"name": "latents", "path": lat, "other_vae": other_vae}, 0)
  config = types.SimpleNamespace(eval={"vae": eval_vae})
  return types.SimpleNamespace(teacher=types.SimpleNamespace(reference={"path": teacher_path}),
                               config=config, streams={"train": source},
                               stream_datasets={"train": "latents"})


def test_latents_of_another_vae_are_refused_in_one_line(latents, tmp_path):
  lat, vae, other = latents
  pipe = tmp_path / "pipe"
  shutil.copytree(other, pipe / "vae")   # the teacher pipeline's own VAE is the other one
  with pytest.raises(ValueError, match=r"^config key 'data.path': latents .* were made with the "
                                       r"VAE .*/vae \(scaling_factor 0.18215\), not the "
                                       r"teacher's VAE .*pipe/vae \(scaling_factor 0.13025\)"):
    trainer._check_latents_vae(_engine(lat, str(pipe)))   # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"not eval.vae .*vae_xl"):
    trainer._check_latents_vae(_engine(lat, "", eval_vae=other))   # pylint: disable=protected-access
  # The same VAE, a teacher without one (a run directory), or data.other_vae: no complaint.
  shutil.rmtree(pipe / "vae")
  shutil.copytree(vae, pipe / "vae")
  for engine in (_engine(lat, str(pipe), eval_vae=vae), _engine(lat, str(tmp_path)),
                 _engine(lat, str(pipe), eval_vae=other, other_vae=True)):
    trainer._check_latents_vae(engine)   # pylint: disable=protected-access
