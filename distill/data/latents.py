"""`latents`: a precomputed latent dataset (`launch.precompute` output) as a training source.

    data.name = "latents"
    data.path = "/data/imagenet256_sdvae"       # the precompute output directory
    data.text_embeds = ""                       # or a directory of caption embeddings (below)
    data.flip = True                            # use the stored flipped twins half the time

Which examples a step reads. The stream is the concatenation of seeded permutations of the N
records, epoch e's permutation from `SeedSequence(seed, spawn_key=(2, e))`; the global batch of
step s is stream positions [s B, (s + 1) B). Process p of P reads only rows
[p B / P, (p + 1) B / P) of that batch (its disjoint shard of the records of the step), so the
data position is a pure function of (seed, step): a run resumes exactly from its step, on any
number of processes, with no iterator state to save; every example is seen once per epoch.

What a row holds. With kind "mean_std" the latent is `mean + std * noise` (a fresh posterior
draw per step, as DiT trains), the noise and the flip coin (when `flip` and the records hold
flipped twins) drawn for the whole global batch from the step's generator and sliced, so they do
not depend on the process count either. With kind "sample" the stored latent is used as is.
`label` comes along when the records have it (class-conditional data); `caption_id` selects the
text conditioning from `data.text_embeds`: a directory with `embeds.npy` (C, L, D) and
optionally `mask.npy` (C, L), memory-mapped, so 30k+ captions never load whole. Those become the
batch keys `text_embeds` and `text_mask` (the model's `encoder_hidden_states` and
`encoder_attention_mask`). The embeddings come from whatever text encoder the user runs
(`launch.precompute --help` names the layout): no text encoder runs in the training loop.
"""
from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from distill.data.records import RecordReader, read_meta
from distill.data.sources import Source, batch_rng, process_rows, register_dataset

_EPOCH_STREAM = 2


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
  ss = np.random.SeedSequence(int(seed) & 0xFFFF_FFFF_FFFF_FFFF, spawn_key=(_EPOCH_STREAM, epoch))
  return np.random.Generator(np.random.PCG64(ss)).permutation(count)


def stream_indices(seed: int, count: int, start: int, stop: int) -> np.ndarray:
  """Record indices at stream positions [start, stop) (epochs of seeded permutations)."""
  pos = np.arange(start, stop)
  out = np.empty(len(pos), np.int64)
  for epoch in np.unique(pos // count):
    sel = pos // count == epoch
    out[sel] = epoch_permutation(seed, int(epoch), count)[pos[sel] % count]
  return out


def load_text_embeds(path: str) -> dict[str, np.ndarray]:
  """`embeds` (C, L, D) and optional `mask` (C, L) of a caption-embedding directory (mmap)."""
  file = os.path.join(path, "embeds.npy")
  if not os.path.isfile(file):
    raise ValueError(f"data.text_embeds: {path!r} has no embeds.npy (expected embeds.npy of "
                     "shape (captions, tokens, width) and optional mask.npy (captions, tokens))")
  out = {"embeds": np.load(file, mmap_mode="r")}
  mask = os.path.join(path, "mask.npy")
  if os.path.isfile(mask):
    out["mask"] = np.load(mask, mmap_mode="r")
    if out["mask"].shape != out["embeds"].shape[:2]:
      raise ValueError(f"data.text_embeds: mask.npy has shape {out['mask'].shape}, expected "
                       f"{out['embeds'].shape[:2]} (embeds.npy's first two axes)")
  return out


@register_dataset("latents")
class Latents(Source):
  """Records of a `launch.precompute` directory; see the module docstring."""

  DEFAULTS = {"path": "", "text_embeds": "", "flip": True}

  def __init__(self, seed: int, path: str = "", text_embeds: str = "", flip: bool = True):
    super().__init__(seed)
    if not path:
      raise ValueError("data.path: the latents dataset needs the directory `launch.precompute` "
                       "wrote")
    self.path = path
    self.meta = read_meta(path)
    self.reader = RecordReader(path, self.meta)
    self.shape = tuple(self.meta["shape"])
    self.num_classes = int(self.meta.get("num_classes") or 0)
    self.kind = self.meta["kind"]
    self.flip = bool(flip and self.meta.get("flip"))
    fields = set(self.meta.get("fields", ()))
    self.text = None
    if "caption_id" in fields:
      if not text_embeds:
        raise ValueError(f"data.text_embeds: {path!r} holds caption ids; give the directory of "
                         "their embeddings (embeds.npy)")
      self.text = load_text_embeds(text_embeds)

  def __len__(self) -> int:
    return len(self.reader)

  def _rows(self, indices: np.ndarray, noise: np.ndarray, flips: np.ndarray) -> dict:
    records = self.reader.read(indices)
    xs = []
    for rec, z, f in zip(records, noise, flips):
      suffix = "_flip" if f else ""
      if self.kind == "mean_std":
        xs.append(rec["mean" + suffix] + rec["std" + suffix] * z)
      else:
        xs.append(rec["sample" + suffix])
    out = {"x": np.stack(xs).astype(np.float32)}
    if self.num_classes:
      out["label"] = np.asarray([r["label"] for r in records], np.int32)
    if self.text is not None:
      ids = np.asarray([r["caption_id"] for r in records], np.int64)
      out["text_embeds"] = np.asarray(self.text["embeds"][ids], np.float32)
      if "mask" in self.text:
        out["text_mask"] = np.asarray(self.text["mask"][ids], np.float32)
    return out

  def indices(self, step: int, global_batch: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
    """The record indices this process reads at `step` (its rows of the global batch)."""
    rows = process_rows(global_batch, process_index, process_count)
    return stream_indices(self.seed, len(self), step * global_batch + rows.start,
                          step * global_batch + rows.stop)

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    rows = process_rows(global_batch, process_index, process_count)
    noise, flips = self._noise_and_flips(batch_rng(self.seed, step), global_batch)
    indices = self.indices(step, global_batch, process_index, process_count)
    return self._rows(indices, noise[rows], flips[rows])

  def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """`n` rows at random (for references): record indices, noise and flips from `rng`."""
    indices = rng.integers(0, len(self), size=n)
    return self._rows(indices, *self._noise_and_flips(rng, n))

  def _noise_and_flips(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The posterior noise (kind mean_std) and flip coins of `n` rows, in this order from `rng`."""
    noise = (rng.standard_normal((n,) + self.shape, np.float32) if self.kind == "mean_std"
             else np.zeros((n, 1), np.float32))
    flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
    return noise, flips

  def content_hash(self) -> str:
    """sha256 of meta.json's identifying fields (count, shape, kind, the source and VAE)."""
    keys = ("count", "shape", "kind", "flip", "fields", "source", "vae")
    return hashlib.sha256(repr([self.meta.get(k) for k in keys]).encode()).hexdigest()
