"""Helpers of the data-tool tests (launch.precompute, launch.encode_prompts, latents)."""
from __future__ import annotations


def save_tiny_vae(path, sample_size: int = 16) -> str:
  """A seeded tiny diffusers AutoencoderKL (4 latent channels, 2 levels) saved at `path`."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=sample_size)
  vae.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def one_error_line(capsys, main, *args) -> str:
  """The one stderr line of a launch tool's `main(argv)` that exits 2."""
  capsys.readouterr()
  assert main([str(a) for a in args]) == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]
