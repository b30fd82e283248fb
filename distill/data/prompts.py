"""`prompts`: prompt embeddings without images, for the data-free objectives.

    data.name = "prompts"
    data.text_embeds = "/data/prompts_sd15"     # launch.encode_prompts output (below)
    data.shape = (64, 64, 4)                    # the student's sample shape (SD1.5 at 512 px)
    data.null_prompt = "file"                   # DIR/null.npy, or "zeros" (DMD2-SDXL)
    data.time_ids = 0                           # SDXL: the image size in pixels (> 0 adds ids)

VSD / SwiftBrush, SiD-LSG, DMD2 without its GAN term and AGD on teacher trajectories never look
at a real image: they need prompts to condition the teacher and the student, and the shape of a
sample. This source serves exactly that: `text_embeds` (and `text_mask`, `pooled_text_embeds`
when the directory has them) of the captions in `data.text_embeds` (the layout of
distill/data/latents.py's caption directories: embeds.npy, optional mask.npy / pooled.npy,
null.npy ...), every caption once per epoch in a seeded order, process p of P reading only its
rows of each global batch (the data position is the step, as with `latents`), plus `x`: zeros of
`data.shape`, which carry the batch's shape and nothing else. An objective that reads real
images (`Objective.real_data`: sCM, consistency, LCM, progressive, LADD, DMD2 and SiD with their
GAN terms ...) is refused when the engine is built, with one line.

`data.time_ids = S` adds SDXL's micro-conditioning (S, S, 0, 0, S, S): an uncropped S x S image.
There are no reference images: evaluate such a run against a latent data set with
`launch.evaluate --workdir W --config.data.name=latents --config.data.path=...` (the run's
eval.at_end and eval.every_steps must be off; the config check says so). `conditions(n, seed)`
gives n prompts drawn from `reference_rng(seed)` (sample grids, `launch.sample`).
"""
from __future__ import annotations

import numpy as np

from distill.data.latents import (NULL_PROMPTS, load_text_embeds, null_prompt_inputs,
                                  stream_indices, text_fingerprint, text_rows)
from distill.data.sources import Source, process_rows, reference_rng, register_dataset


@register_dataset("prompts")
class Prompts(Source):
  """Caption embeddings only; see the module docstring."""

  DEFAULTS = {"text_embeds": "", "shape": (), "null_prompt": "file", "time_ids": 0}
  real_data = False

  def __init__(self, seed: int, text_embeds: str = "", shape=(), null_prompt: str = "file",
               time_ids: int = 0):
    super().__init__(seed)
    if not text_embeds:
      raise ValueError("data.text_embeds: the prompts dataset needs a directory of caption "
                       "embeddings (embeds.npy, written by launch.encode_prompts)")
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) < 1:
      raise ValueError(f"data.shape: the prompts dataset needs the shape of one sample, e.g. "
                       f"(64, 64, 4) for SD1.5 latents at 512 px, got {shape}")
    if null_prompt not in NULL_PROMPTS:
      raise ValueError(f"data.null_prompt: expected \"file\" (the text_embeds directory's "
                       f"null.npy) or \"zeros\", got {null_prompt!r}")
    if int(time_ids) < 0:
      raise ValueError(f"data.time_ids: expected an image size in pixels (or 0), got {time_ids}")
    self.path = text_embeds
    self.text = load_text_embeds(text_embeds, null_prompt)
    self.shape = shape
    self.num_classes = 0
    self.size = int(time_ids)

  def __len__(self) -> int:
    return len(self.text["embeds"])

  def _rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    out = {"x": np.zeros((len(ids),) + self.shape, np.float32)}
    out.update(text_rows(self.text, ids))
    if self.size:
      s = float(self.size)
      out["time_ids"] = np.tile(np.asarray([s, s, 0.0, 0.0, s, s], np.float32), (len(ids), 1))
    return out

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = process_rows(global_batch, process_index, process_count)
    start = step * global_batch
    return self._rows(stream_indices(self.seed, len(self), start + rows.start,
                                     start + rows.stop))

  def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    del rng, n
    raise ValueError("data.name 'prompts' holds no images: evaluate against a latent data set "
                     "(launch.evaluate --config.data.name=latents --config.data.path=DIR)")

  def conditions(self, n: int, seed: int) -> dict[str, np.ndarray]:
    ids = reference_rng(seed).integers(0, len(self), size=n)
    out = self._rows(ids)
    del out["x"]
    if "clip_tokens" in self.text:
      out["clip_tokens"] = np.asarray(self.text["clip_tokens"][ids], np.int32)
    return out

  def null_inputs(self) -> dict[str, np.ndarray]:
    return null_prompt_inputs(self.text)

  def content_hash(self) -> str:
    return text_fingerprint(self.text)
