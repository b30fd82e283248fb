"""`latents`: a precomputed latent dataset (`launch.precompute` output) as a training source.

    data.name = "latents"
    data.path = "/data/imagenet256_sdvae"       # the precompute output directory
    data.text_embeds = ""                       # or a directory of caption embeddings (below)
    data.null_prompt = "file"                   # DIR/null.npy, or "zeros" (DMD2-SDXL)
    data.time_ids = False                       # SDXL's size/crop ids per row
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
text conditioning from `data.text_embeds`, a directory written by whatever text encoder the user
runs (SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G; SANA: Gemma; no text encoder runs in training), row c
of each per-caption array the caption with id c:

    DIR/embeds.npy       (C, L, D)  encoder hidden states          -> batch key text_embeds
    DIR/mask.npy         (C, L)     optional attention mask         -> text_mask
    DIR/pooled.npy       (C, Dp)    optional pooled embedding       -> pooled_text_embeds
                                    (SDXL: CLIP-G's projected embedding)
    DIR/null.npy         (L, D)     the encoded empty prompt "" (`null_inputs()`: the null
                                    prompt of classifier-free guidance and condition dropout)
    DIR/null_mask.npy    (L,)       optional, its mask
    DIR/null_pooled.npy  (Dp,)      its pooled embedding (required when pooled.npy exists)
    DIR/clip_tokens.npy  (C, 77)    optional CLIP token ids of each caption (`conditions()`
                                    returns them as `clip_tokens` for the CLIP score)

The per-caption arrays are memory-mapped, so 30k+ captions never load whole; every shape is
checked against embeds.npy when the source is built, and so is the largest caption id the
records use (meta.json's `caption_ids`; outputs written before precompute recorded it are
checked per batch). `text_embeds` / `text_mask` are the model's
`encoder_hidden_states` / `encoder_attention_mask`, `pooled_text_embeds` and `time_ids` SDXL's
`added_cond` (distill/context.py). `data.null_prompt = "zeros"` ignores the null files and
serves no null prompt (`null_inputs()` is empty): the framework then uses all-zero prompt and
pooled embeddings, DMD2-SDXL's null prompt.

`data.time_ids = True` adds SDXL's micro-conditioning `time_ids` (B, 6) float32 = (orig_h,
orig_w, crop_top, crop_left, size, size) in pixels: the original image's size and the centre
crop's corner in the image resized to short side `size` (diffusers' train_text_to_image_sdxl.py;
records store them as `orig_size` / `crop_top_left`, distill/data/image_inputs.py), the target
`size` the precompute resolution (meta.json's "size"). Records written before those fields
existed give (size, size, 0, 0, size, size). A flipped twin keeps the crop coordinates of its
image, as diffusers does (it flips the resized image before the centre crop and takes the crop
corner of the flipped image, the same corner).

`conditions(n, seed)` (evaluation prompts) takes the records that `reference(n, seed)` draws, in
the same order (row i of `reference(n, seed)` is the image of prompt i), and returns their rows
of the keys above plus `clip_tokens` when clip_tokens.npy exists; empty without caption ids
(class-conditional data: the evaluation draws labels itself).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional

import numpy as np

from distill.data.records import CROP_FIELDS, RecordReader, read_meta
from distill.data.sources import (REFERENCE_CHUNK, Source, batch_rng, process_rows,
                                  reference_rng, register_dataset)

_EPOCH_STREAM = 2
_CONDITION_CHUNK = 1024  # records read at a time by `conditions`
_PROMPT_FIELDS = ("caption_id",) + CROP_FIELDS


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


NULL_PROMPTS = ("file", "zeros")


def _npy(path: str, name: str, mmap: bool = True):
  """`path/name` loaded (memory-mapped when `mmap`), or None when it does not exist."""
  file = os.path.join(path, name)
  return np.load(file, mmap_mode="r" if mmap else None) if os.path.isfile(file) else None


def _check_shape(name: str, arr: np.ndarray, want: tuple, what: str,
                 key: str = "data.text_embeds") -> None:
  """One line naming the file when `arr`'s shape is not `want` (ints must match; a str names an
  axis of any size)."""
  if arr.ndim == len(want) and all(isinstance(w, str) or a == w for a, w in zip(arr.shape, want)):
    return
  shown = "(" + ", ".join(map(str, want)) + ("," if len(want) == 1 else "") + ")"
  raise ValueError(f"{key}: {name} has shape {arr.shape}, expected {shown} ({what})")


def text_fingerprint(text: dict[str, np.ndarray]) -> str:
  """sha256 of every prompt array's dtype and shape and of its first and last 64 rows (the
  arrays are memory-mapped and may hold gigabytes)."""
  h = hashlib.sha256(b"prompts")
  for name in sorted(text):
    arr = text[name]
    h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
    for part in (arr[:64], arr[-64:]):
      h.update(np.ascontiguousarray(part).tobytes())
  return h.hexdigest()


def vae_hash(path: str) -> str:
  """sha256 of a diffusers VAE directory's config and weights (what launch.precompute records
  as meta.json's "vae" hash)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    if name.endswith((".json", ".safetensors")):
      with open(os.path.join(path, name), "rb") as f:
        h.update(name.encode())
        h.update(f.read())
  return h.hexdigest()


def _json_or_empty(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def load_text_embeds(path: str, null_prompt: str = "file",
                     key: str = "data.text_embeds") -> dict[str, np.ndarray]:
  """The arrays of a caption-embedding directory (module docstring) by short name: `embeds`,
  and when present `mask`, `pooled`, `clip_tokens` (memory-mapped) and, with `null_prompt`
  "file", `null`, `null_mask`, `null_pooled`. Every shape is checked against embeds.npy; errors
  name `key` (the config key or flag that gave `path`)."""
  embeds = _npy(path, "embeds.npy")
  if embeds is None:
    raise ValueError(f"{key}: {path!r} has no embeds.npy (expected embeds.npy of "
                     "shape (captions, tokens, width) and optional mask.npy (captions, tokens))")
  _check_shape("embeds.npy", embeds, ("captions", "tokens", "width"), "one row per caption", key)
  c, l, d = embeds.shape
  out = {"embeds": embeds}
  per_caption = (("mask", (c, l), "embeds.npy's captions, tokens"),
                 ("pooled", (c, "pooled_width"), "embeds.npy's captions"),
                 ("clip_tokens", (c, 77), "embeds.npy's captions, CLIP's 77 token ids"))
  for name, want, what in per_caption:
    arr = _npy(path, name + ".npy")
    if arr is not None:
      _check_shape(name + ".npy", arr, want, what, key)
      out[name] = arr
  if null_prompt != "file":
    return out
  null = _npy(path, "null.npy", mmap=False)
  if null is None:
    raise ValueError(f"{key}: {path!r} has no null.npy (the encoded empty prompt, "
                     f"shape ({l}, {d})); set data.null_prompt = \"zeros\" for the all-zero null "
                     "prompt of DMD2-SDXL")
  _check_shape("null.npy", null, (l, d), "embeds.npy's tokens, width", key)
  out["null"] = null
  null_mask = _npy(path, "null_mask.npy", mmap=False)
  if null_mask is not None:
    _check_shape("null_mask.npy", null_mask, (l,), "embeds.npy's tokens", key)
    out["null_mask"] = null_mask
  null_pooled = _npy(path, "null_pooled.npy", mmap=False)
  if "pooled" in out:
    if null_pooled is None:
      raise ValueError(f"{key}: {path!r} has pooled.npy but no null_pooled.npy (the "
                       f"empty prompt's pooled embedding, shape ({out['pooled'].shape[1]},))")
    _check_shape("null_pooled.npy", null_pooled, (out["pooled"].shape[1],),
                 "pooled.npy's width", key)
    out["null_pooled"] = null_pooled
  return out


def check_caption_ids(meta: dict, path: str, count: int, text_embeds: str) -> None:
  """The largest caption id the records use (meta.json's `caption_ids`, written by precompute;
  older outputs lack it and are checked per batch by `text_rows`) must be a row of embeds.npy."""
  largest = (meta.get("caption_ids") or {}).get("max")
  if largest is not None and largest >= count:
    raise ValueError(f"data.text_embeds: {text_embeds}/embeds.npy has {count} captions, "
                     f"data.path {path}'s records use caption ids up to {largest} (embeddings "
                     f"of another caption file?)")


def text_rows(text: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
  """Batch keys `text_embeds` / `text_mask` / `pooled_text_embeds` of caption rows `ids`."""
  count = len(text["embeds"])
  bad = ids[(ids < 0) | (ids >= count)]
  if len(bad):
    raise ValueError(f"data.text_embeds: caption id {int(bad[0])} is outside embeds.npy's "
                     f"{count} captions")
  names = (("embeds", "text_embeds"), ("mask", "text_mask"), ("pooled", "pooled_text_embeds"))
  return {key: np.asarray(text[name][ids], np.float32) for name, key in names if name in text}


def null_prompt_inputs(text) -> dict[str, np.ndarray]:
  """The encoded empty prompt of a caption directory's null.npy (and null_mask.npy /
  null_pooled.npy) as batch keys without the batch axis, float32; empty with
  `data.null_prompt = "zeros"` or without text (`Source.null_inputs`)."""
  if text is None or "null" not in text:
    return {}
  names = (("null", "text_embeds"), ("null_mask", "text_mask"),
           ("null_pooled", "pooled_text_embeds"))
  return {key: np.asarray(text[name], np.float32) for name, key in names if name in text}


def time_ids_of(records: list[dict], size: int) -> np.ndarray:
  """SDXL's (B, 6) float32 (orig_h, orig_w, crop_top, crop_left, size, size) of `records`
  (records without the crop fields: an uncropped size x size image)."""
  rows = [[*rec.get("orig_size", (size, size)), *rec.get("crop_top_left", (0, 0)), size, size]
          for rec in records]
  return np.asarray(rows, np.float32).reshape(len(records), 6)


@register_dataset("latents")
class Latents(Source):
  """Records of a `launch.precompute` directory; see the module docstring."""

  DEFAULTS = {"path": "", "text_embeds": "", "null_prompt": "file", "time_ids": False,
              "flip": True, "other_vae": False}

  def __init__(self, seed: int, path: str = "", text_embeds: str = "", null_prompt: str = "file",
               time_ids: bool = False, flip: bool = True, other_vae: bool = False):
    super().__init__(seed)
    # True: latents of a VAE other than the teacher pipeline's own are meant (the trainer
    # refuses them otherwise: `vae_mismatch`).
    self.other_vae = bool(other_vae)
    if not path:
      raise ValueError("data.path: the latents dataset needs the directory `launch.precompute` "
                       "wrote")
    if null_prompt not in NULL_PROMPTS:
      raise ValueError(f"data.null_prompt: expected \"file\" (the text_embeds directory's "
                       f"null.npy) or \"zeros\", got {null_prompt!r}")
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
      self.text = load_text_embeds(text_embeds, null_prompt)
      check_caption_ids(self.meta, path, len(self.text["embeds"]), text_embeds)
    self.size = 0  # the time_ids' target size; 0: no time_ids
    if time_ids:
      if self.text is None:
        raise ValueError(f"data.time_ids: {path!r} holds no caption ids; SDXL's size/crop ids "
                         "go with text prompts (data.text_embeds)")
      if not self.meta.get("size"):
        raise ValueError(f"data.time_ids: {path}/meta.json has no \"size\" (the precompute "
                         "resolution, time_ids' target size); rerun launch.precompute")
      self.size = int(self.meta["size"])

  def __len__(self) -> int:
    return len(self.reader)

  def vae_mismatch(self, vae_dir: str, what: str) -> Optional[str]:
    """Why latents of this directory do not fit the VAE at `vae_dir` (`what` names it: the
    teacher's, eval.vae), or None: precompute records its VAE's hash (meta.json "vae"); a
    directory without the record, or a VAE directory that is not there, is not compared."""
    made = self.meta.get("vae") or {}
    if not made.get("hash") or not os.path.isfile(os.path.join(vae_dir, "config.json")):
      return None
    if vae_hash(vae_dir) == made["hash"]:
      return None
    scale = lambda d: (_json_or_empty(os.path.join(d, "config.json")).get("scaling_factor")
                       if d and os.path.isdir(d) else None)
    return (f"latents {self.path} were made with the VAE {made.get('path')} (scaling_factor "
            f"{scale(made.get('path'))}), not {what} {vae_dir} (scaling_factor "
            f"{scale(vae_dir)}): the networks would learn, or decode, another VAE's latents")

  def _conditioning(self, records: list[dict]) -> dict[str, np.ndarray]:
    """The prompt keys of `records`' rows (text embeddings of their captions, time_ids)."""
    if self.text is None:
      return {}
    out = text_rows(self.text, np.asarray([r["caption_id"] for r in records], np.int64))
    if self.size:
      out["time_ids"] = time_ids_of(records, self.size)
    return out

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
    out.update(self._conditioning(records))
    return out

  def null_inputs(self) -> dict[str, np.ndarray]:
    return null_prompt_inputs(self.text)

  def reference_indices(self, n: int, seed: int) -> np.ndarray:
    """The record indices of `reference(n, seed)`'s rows, in order (`draw`'s first draw from
    each chunk's generator, without reading the records)."""
    chunks, left, i = [], n, 0
    while left > 0:
      take = min(left, REFERENCE_CHUNK)
      chunks.append(reference_rng(seed, i).integers(0, len(self), size=REFERENCE_CHUNK)[:take])
      left, i = left - take, i + 1
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

  def conditions(self, n: int, seed: int) -> dict[str, np.ndarray]:
    """The prompts of the records `reference(n, seed)` draws, in its order (module docstring),
    plus `clip_tokens` (n, 77) int32 when clip_tokens.npy exists; {} without captions."""
    if self.text is None:
      return {}
    indices = self.reference_indices(n, seed)
    kept = []  # each record's prompt fields only, read a bounded number of records at a time
    for start in range(0, n, _CONDITION_CHUNK):
      kept += [{k: r[k] for k in _PROMPT_FIELDS if k in r}
               for r in self.reader.read(indices[start:start + _CONDITION_CHUNK])]
    out = self._conditioning(kept)
    if "clip_tokens" in self.text:
      ids = np.asarray([r["caption_id"] for r in kept], np.int64)
      out["clip_tokens"] = np.asarray(self.text["clip_tokens"][ids], np.int32)
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
    """`n` rows at random (for references): record indices, noise and flips from `rng` (the
    indices first: `reference_indices` replays that draw)."""
    indices = rng.integers(0, len(self), size=n)
    return self._rows(indices, *self._noise_and_flips(rng, n))

  def _noise_and_flips(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The posterior noise (kind mean_std) and flip coins of `n` rows, in this order from `rng`."""
    noise = (rng.standard_normal((n,) + self.shape, np.float32) if self.kind == "mean_std"
             else np.zeros((n, 1), np.float32))
    flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
    return noise, flips

  def content_hash(self) -> str:
    """sha256 of meta.json's identifying fields (count, shape, kind, the source and VAE), and
    of the prompt embeddings' fingerprint when the records hold caption ids."""
    keys = ("count", "shape", "kind", "flip", "fields", "source", "vae")
    records = hashlib.sha256(repr([self.meta.get(k) for k in keys]).encode()).hexdigest()
    if self.text is None:
      return records
    return hashlib.sha256(f"{records}:{text_fingerprint(self.text)}".encode()).hexdigest()
