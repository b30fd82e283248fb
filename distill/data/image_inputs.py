"""Image datasets that `launch.precompute` encodes, by name, and DiT's image preprocessing.

    --input folder:/data/imagenet/train     class sub-folders (sorted names -> labels 0..K-1), or
                                            a flat folder of images (no labels), not both
    --input jsonl:/data/coco/captions.jsonl one JSON object per line: {"image": path (relative to
                                            the file's folder or absolute), "caption_id": int}
    --input tfds:imagenet2012[:split]       a prepared tfds dataset read with `tfds.data_source`
                                            (ArrayRecord, no TensorFlow); `--tfds_data_dir` names
                                            the user's data dir (no download ever)

Each input has `len()`, `get(i) -> {"image": uint8 (H, W, 3), "orig_size": int32 (2,),
"crop_top_left": int32 (2,), "label"?: int, "caption_id"?: int}`, `num_classes`, `describe()`
(recorded in meta.json), `fingerprint()` (a sha256 of the ordered example listing: relative
paths with their labels or caption ids, the tfds name, version and split; no image is read; a
precompute resume compares it), `content_fingerprint()` (a sha256 of the image files' sizes in
order, one stat each, so an image replaced under the same name counts; a tfds dataset's version
stands for its content) and `caption_ids` ({"min", "max"} of a jsonl's ids, else None).
Names starting with "." (`.ipynb_checkpoints`, `._x.png`) are never images or classes. A jsonl
input checks that every image file exists before anything is encoded.

`center_crop` is the ADM / DiT preprocessing: halve with a box filter while the short side is at
least twice the target, resize bicubically so the short side equals it, then crop the centre.

SDXL's micro-conditioning of that crop (`center_crop_coords`), as diffusers'
`train_text_to_image_sdxl.py` computes it: `orig_size` = (height, width) of the original image
in its own pixels; `crop_top_left` = (top, left) of the crop in the pixels of the resized image
(short side = the target size, the frame the crop is taken from), i.e. in target-size pixels.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from distill import runlog
from distill.registry import Registry

IMAGE_INPUTS: Registry = Registry("image input")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


def center_crop_coords(image, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """ADM's `center_crop_arr` of a PIL image and the crop's SDXL micro-conditioning:
  `(uint8 (size, size, 3), {"orig_size": (h, w), "crop_top_left": (top, left)})`, both int32
  (the original image's size; the crop's corner in the resized image, see the module docstring)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert("RGB")
  orig_size = np.asarray([image.height, image.width], np.int32)
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  crop = np.ascontiguousarray(arr[top:top + size, left:left + size])
  return crop, {"orig_size": orig_size, "crop_top_left": np.asarray([top, left], np.int32)}


def center_crop(image, size: int) -> np.ndarray:
  """ADM's `center_crop_arr`: a PIL image -> uint8 (size, size, 3)."""
  return center_crop_coords(image, size)[0]


def _cropped(image, size: int) -> dict[str, Any]:
  """An input's example fields of one PIL image: `image` and its crop coordinates."""
  crop, coords = center_crop_coords(image, size)
  return {"image": crop, **coords}


def _open(path: str):
  """The image at `path`; a missing or unreadable file raises one ValueError line naming it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      return im
  except OSError as e:   # FileNotFoundError, PIL.UnidentifiedImageError, a truncated file
    raise ValueError(f"image {path}: cannot be read ({type(e).__name__}: "
                     f"{getattr(e, 'strerror', None) or e})") from None


def _is_image(name: str) -> bool:
  return not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
  """Hidden entries (`.ipynb_checkpoints`, macOS `._x.png`) are no class and no image."""
  return name.startswith(".")


def listing_hash(rows) -> str:
  """sha256 of an ordered listing of (relative path or name, label / caption id) rows."""
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps(row).encode())
    h.update(b"\n")
  return h.hexdigest()


def sizes_hash(paths) -> str:
  """sha256 of the byte sizes of `paths` in order (a stat each, no file read)."""
  return listing_hash(os.path.getsize(p) for p in paths)


def caption_id(value) -> int:
  """`value` as a caption id: a JSON integer >= 0 (not 1.7, "3" or true), else a ValueError."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"caption_id must be an integer >= 0, got {value!r}")
  return value


@IMAGE_INPUTS.register("folder")
class ImageFolder:
  """Class sub-folders (labels by sorted folder name) or a flat folder of images."""

  def __init__(self, root: str, size: int, **unused):
    if not os.path.isdir(root):
      raise ValueError(f"--input folder:{root}: not a directory")
    self.root, self.size = root, size
    names = sorted(os.listdir(root))
    subdirs = [d for d in names if not _hidden(d) and os.path.isdir(os.path.join(root, d))]
    top = [f for f in names if _is_image(f) and os.path.isfile(os.path.join(root, f))]
    if subdirs and top:
      raise ValueError(f"--input folder:{root}: {len(top)} images at the top level beside class "
                       f"folders ({', '.join(top[:3])}{', ...' if len(top) > 3 else ''}): move "
                       f"them into a class folder or the folders away")
    if subdirs:
      self.classes = subdirs
      self.items = [(os.path.join(root, d, f), c) for c, d in enumerate(subdirs)
                    for f in sorted(os.listdir(os.path.join(root, d))) if _is_image(f)]
    else:
      self.classes = []
      self.items = [(os.path.join(root, f), None) for f in top]
    if not self.items:
      raise ValueError(f"--input folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    self.num_classes = len(self.classes)
    self.caption_ids = None

  def __len__(self) -> int:
    return len(self.items)

  def get(self, i: int) -> dict[str, Any]:
    path, label = self.items[i]
    out = _cropped(_open(path), self.size)
    if label is not None:
      out["label"] = int(label)
    return out

  def describe(self) -> dict[str, Any]:
    return {"input": "folder", "root": os.path.abspath(self.root), "classes": self.classes}

  def fingerprint(self) -> str:
    return listing_hash((os.path.relpath(p, self.root), c) for p, c in self.items)

  def content_fingerprint(self) -> str:
    return sizes_hash(p for p, _ in self.items)


@IMAGE_INPUTS.register("jsonl")
class CaptionJsonl:
  """Images with caption ids from a JSONL file (the ids index the text-embedding arrays)."""

  def __init__(self, path: str, size: int, **unused):
    if not os.path.isfile(path):
      raise ValueError(f"--input jsonl:{path}: no such file")
    self.path, self.size = path, size
    base = os.path.dirname(os.path.abspath(path))
    self.items, self.names, lines = [], [], []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
          cid = caption_id(obj["caption_id"])
          self.items.append((os.path.join(base, obj["image"]), cid))
          self.names.append(obj["image"])
          lines.append(n)
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"--input jsonl:{path} line {n}: expected {{\"image\": path, "
                           f"\"caption_id\": int}}, got {line.strip()[:80]!r} ({e})") from None
    if not self.items:
      raise ValueError(f"--input jsonl:{path}: no examples (expected one JSON object per line)")
    missing = [(n, p) for n, (p, _) in zip(lines, self.items) if not os.path.isfile(p)]
    if missing:
      raise ValueError(f"--input jsonl:{path} line {missing[0][0]}: image {missing[0][1]}: no "
                       f"such file ({len(missing)} of {len(self.items)} images missing)")
    self.num_classes = 0
    ids = [c for _, c in self.items]
    self.caption_ids = {"min": min(ids), "max": max(ids)}

  def __len__(self) -> int:
    return len(self.items)

  def get(self, i: int) -> dict[str, Any]:
    path, caption_id = self.items[i]
    return {**_cropped(_open(path), self.size), "caption_id": caption_id}

  def describe(self) -> dict[str, Any]:
    return {"input": "jsonl", "path": os.path.abspath(self.path)}

  def fingerprint(self) -> str:
    return listing_hash((name, c) for name, (_, c) in zip(self.names, self.items))

  def content_fingerprint(self) -> str:
    return sizes_hash(p for p, _ in self.items)


@IMAGE_INPUTS.register("tfds")
class TfdsImages:
  """A prepared tfds dataset (`image`, optional `label`) via `tfds.data_source` (random access)."""

  def __init__(self, name: str, size: int, data_dir: str | None = None, **unused):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, _, split = name.partition(":")
    self.name, self.split, self.size, self.data_dir = name, split or "train", size, data_dir
    builder = _tfds_builder(name, data_dir)
    try:
      self.source = tfds.data_source(name, split=self.split, data_dir=data_dir, try_gcs=False,
                                     download=False)
    except Exception as e:  # pylint: disable=broad-except  # tfds' not-prepared / format errors
      raise ValueError(_tfds_error(builder, f"{name}:{self.split}", data_dir, e)) from None
    self.version = str(builder.info.version)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.caption_ids = None

  def __len__(self) -> int:
    return len(self.source)

  def get(self, i: int) -> dict[str, Any]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    ex = self.source[i]
    arr = np.asarray(ex["image"])
    if arr.ndim == 3 and arr.shape[-1] == 1:  # greyscale
      arr = arr[..., 0]
    out = _cropped(Image.fromarray(arr), self.size)
    if self.num_classes:
      out["label"] = int(ex["label"])
    return out

  def describe(self) -> dict[str, Any]:
    return {"input": "tfds", "name": self.name, "split": self.split,
            "data_dir": self.data_dir}

  def fingerprint(self) -> str:
    return listing_hash([self.name, self.version, self.split, len(self.source)])

  def content_fingerprint(self) -> str:
    return self.fingerprint()   # a prepared version's records do not change


def _tfds_where(data_dir: str | None) -> str:
  """Where tfds looked, for a message: --tfds_data_dir, or tfds' default without it."""
  if data_dir:
    return f"--tfds_data_dir {data_dir}"
  return "tfds' default data dir (no --tfds_data_dir)"


def _tfds_builder(name: str, data_dir: str | None):
  """The tfds builder of `name`; an unknown name raises one ValueError line (not tfds' list of
  every dataset) naming --input and --tfds_data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError and kin
    raise ValueError(f"--input tfds:{name}: no such tfds dataset ({type(e).__name__}; "
                     f"{_tfds_where(data_dir)})") from None


def _tfds_error(builder, spec: str, data_dir: str | None, e: BaseException) -> str:
  """One line for a dataset `tfds.data_source` cannot open: not prepared in the data dir, or
  tfds' own reason (another file format, an unknown split) cut to its first line."""
  if not builder.is_prepared():
    return (f"--input tfds:{spec}: not prepared in {_tfds_where(data_dir)} (expected "
            f"{builder.data_dir} in array_record format; this tool never downloads)")
  return (f"--input tfds:{spec}: cannot be read from {_tfds_where(data_dir)} "
          f"({type(e).__name__}: {runlog.first_line(str(e), 200)})")


def open_input(spec: str, size: int, **kwargs):
  """`kind:argument` (see the module docstring) -> an image input."""
  kind, sep, arg = spec.partition(":")
  if not sep or not arg:
    raise ValueError(f"--input: expected kind:argument with kind one of "
                     f"{', '.join(IMAGE_INPUTS.names())}, got {spec!r}")
  return IMAGE_INPUTS.get(kind)(arg, size=size, **kwargs)
