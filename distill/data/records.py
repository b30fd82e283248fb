"""Precomputed datasets on disk: ArrayRecord shards of msgpack records plus `meta.json`.

    <dir>/meta.json                          {"format": "distill-latents/1", "count": N,
                                              "shape": [h, w, c], "kind": "mean_std" | "sample",
                                              "num_classes": K, "flip": bool, "fields": [...],
                                              "size": image side, "dtype": ...,
                                              "shards": ["latents-00000-of-00004.array_record",
                                                         ...], "vae": {...}, "source": {...},
                                              "caption_ids": {"min": a, "max": b} (captioned
                                              records; older outputs lack it)}
    <dir>/latents-00000-of-00004.array_record   one record per example, in example order

A record is `flax.serialization.msgpack_serialize` of a dict of numpy arrays and ints:
`mean` and `std` (kind "mean_std", the VAE posterior already in the denoiser's scaled units, so
a training latent is `mean + std * noise`) or `sample` (kind "sample"), their horizontally
flipped twins `mean_flip`/`std_flip`/`sample_flip` when `flip`, `label` (class index) and/or
`caption_id` (row of the text-embedding arrays), `index` (the example's position in its
source), and SDXL's crop conditioning `orig_size` (int32 (2,): the original image's height and
width) and `crop_top_left` (int32 (2,): the crop's top and left in the pixels of the image
resized to short side `meta["size"]`; distill/data/image_inputs.py). Records written before those
two fields existed lack them (readers fall back to an uncropped `size` x `size` image). Records
are read by position through grain's `ArrayRecordDataSource` (random access, each process opens
only what it reads).

Shards are written to `<name>.partial` and renamed when complete, so a killed precompute leaves
only whole shards behind and resumes at the first missing one; `meta.json` is written last.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import serialization

FORMAT = "distill-latents/1"
META = "meta.json"
CROP_FIELDS = ("orig_size", "crop_top_left")  # SDXL micro-conditioning of the crop (optional)


def shard_name(i: int, n: int) -> str:
  return f"latents-{i:05d}-of-{n:05d}.array_record"


def encode_record(record: Mapping[str, Any]) -> bytes:
  return serialization.msgpack_serialize({k: (np.asarray(v) if not isinstance(v, int) else v)
                                          for k, v in record.items()})


def decode_record(data: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(data)


def write_shard(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes records to `path` atomically (via `path.partial`); returns how many."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  tmp = path + ".partial"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  n = 0
  try:
    for rec in records:
      writer.write(encode_record(rec))
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


def write_meta(root: str, meta: Mapping[str, Any]) -> None:
  tmp = os.path.join(root, META + ".partial")
  with open(tmp, "w") as f:
    json.dump(dict(meta, format=FORMAT), f, indent=1)
  os.replace(tmp, os.path.join(root, META))


def read_meta(root: str) -> dict[str, Any]:
  """`meta.json` of a precomputed directory; one clear line if it is missing or foreign."""
  path = os.path.join(root, META)
  if not os.path.isfile(path):
    raise ValueError(f"data.path: {root!r} has no {META} (not a finished `launch.precompute` "
                     "output; run it again to complete it)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"data.path: {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
  missing = [s for s in meta["shards"] if not os.path.isfile(os.path.join(root, s))]
  if missing:
    raise ValueError(f"data.path: {root!r} lacks shard {missing[0]} listed in {META}")
  return meta


def read_first(shard: str) -> dict[str, Any]:
  """The first record of one shard file."""
  import grain.python as grain  # pylint: disable=g-import-not-at-top
  return decode_record(grain.ArrayRecordDataSource([shard])[0])


class RecordReader:
  """Random access to the records of a precomputed directory (grain ArrayRecordDataSource)."""

  def __init__(self, root: str, meta: Mapping[str, Any] | None = None):
    import grain.python as grain  # pylint: disable=g-import-not-at-top
    self.meta = dict(meta) if meta is not None else read_meta(root)
    self._source = grain.ArrayRecordDataSource(
        [os.path.join(root, s) for s in self.meta["shards"]])
    if len(self._source) != self.meta["count"]:
      raise ValueError(f"data.path: {root!r} holds {len(self._source)} records, "
                       f"{META} says {self.meta['count']}")

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [decode_record(b) for b in self._source.__getitems__([int(i) for i in indices])]
