r"""Encode an image dataset with a VAE into a latent dataset (ArrayRecord) that `data.name=latents`
trains from.

    python -m launch.precompute --input folder:/data/imagenet/train --vae /ckpt/sd-vae-ft-ema \
        --out /data/in256_sdvae --size 256 [--flip] [--kind mean_std|sample] [--dtype float16]
    python -m launch.precompute --input jsonl:/data/coco/train.jsonl --vae ... --out ...
    python -m launch.precompute --input tfds:imagenet2012:train --tfds_data_dir /data/tfds ...

Then train with `--config.data.name=latents --config.data.path=/data/in256_sdvae` (plus
`--config.data.text_embeds=DIR` for caption ids). The caption embeddings come from whatever text
encoder the user runs (SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G; SANA: Gemma), row c the caption
with `caption_id` c (distill/data/latents.py):

    DIR/embeds.npy       (C, L, D)  each caption's encoder hidden states     -> text_embeds
    DIR/mask.npy         (C, L)     optional attention mask (1 = token)      -> text_mask
    DIR/pooled.npy       (C, Dp)    optional pooled embedding (SDXL CLIP-G)  -> pooled_text_embeds
    DIR/null.npy         (L, D)     the encoded empty prompt "" (the null prompt of guidance and
                                    condition dropout; or data.null_prompt="zeros" instead)
    DIR/null_mask.npy    (L,)       optional, its mask
    DIR/null_pooled.npy  (Dp,)      its pooled embedding (needed when pooled.npy exists)
    DIR/clip_tokens.npy  (C, 77)    optional CLIP token ids of each caption (the CLIP score)

`--config.data.time_ids=true` adds SDXL's micro-conditioning `time_ids` (orig_h, orig_w,
crop_top, crop_left, size, size) from the `orig_size` / `crop_top_left` each record stores.

What is stored (distill/data/records.py): per example the VAE posterior in the denoiser's scaled
units (`mean`, `std`; or one `sample` drawn with `--seed`), with `--flip` also those of the
horizontally flipped image, plus `label` / `caption_id`, the example's `index`, and the original
image size `orig_size` (h, w) and the crop corner `crop_top_left` (top, left; in the pixels of
the image resized to short side `--size`, as diffusers' SDXL training computes it). Images are
preprocessed as DiT does (`center_crop`, then [-1, 1]).

Sharding and resuming. Examples go to `ceil(N / shard_size)` shard files in order; process p of
P (multi-host: `--distributed`) writes shards p, p + P, ...; each batch is encoded on all local
devices (the batch split over a 1-D mesh). A shard is written to a temporary name and renamed
when complete, so a killed run resumes at the first missing shard and rewrites nothing that is
finished (precompute.json, written before the first shard, holds the settings that decide the
records, the input's listing fingerprint among them: a rerun with others, or on an input whose
files, order, labels, caption ids or file sizes changed, stops with one line instead of
mixing them);
meta.json is written last (by process 0 once every shard exists; with a jsonl input it records
the `caption_ids` range, which the latents source checks against the embeddings at setup).
`--size`, `--batch` and `--shard_size` must be positive; an input with no examples stops before
anything is written. `--vae` is a diffusers-layout AutoencoderKL
directory (config.json + safetensors; no network access).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from distill.data.latents import vae_hash
from launch import cli


def parse(argv):
  p = argparse.ArgumentParser(prog="launch.precompute", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="folder:DIR | jsonl:FILE | tfds:NAME[:SPLIT]")
  p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL directory")
  p.add_argument("--out", required=True)
  p.add_argument("--size", type=int, default=256, help="image side after center crop")
  p.add_argument("--kind", default="mean_std", choices=("mean_std", "sample"))
  p.add_argument("--flip", action="store_true", help="also store the flipped image's latent")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  p.add_argument("--batch", type=int, default=32, help="images per encode call (all devices)")
  p.add_argument("--shard_size", type=int, default=4096)
  p.add_argument("--seed", type=int, default=0, help="posterior draws of --kind sample")
  p.add_argument("--tfds_data_dir", default=None)
  p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
  p.add_argument("--log_level", default="WARNING")
  return p.parse_args(argv)


def make_encoder(vae_module, variables, kind: str, seed: int):
  """A jitted (images uint8 (B, H, W, 3), indices (B,)) -> latent fields, batch over devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))

  def encode(images, indices):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = vae_module.apply(variables, x, method="encode")
    shift, scale = vae_module.apply(variables, method="_latent_stats")
    std = jnp.exp(0.5 * logvar) * scale
    mean = (mean - shift) * scale
    if kind == "mean_std":
      return {"mean": mean, "std": std}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)
    noise = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, m.dtype))(keys, mean)
    return {"sample": mean + std * noise}

  fn = jax.jit(encode, in_shardings=(batch, batch), out_shardings=batch)
  return fn, len(jax.local_devices())


def encode_examples(encoder, num_devices: int, examples: list[dict], flip: bool, dtype: str,
                    indices: list[int]) -> list[dict]:
  """Records of `examples` (their images encoded, and flipped twins when `flip`)."""
  from distill.data.records import CROP_FIELDS  # pylint: disable=g-import-not-at-top
  images = np.stack([e["image"] for e in examples])
  idx = np.asarray(indices, np.int32)
  variants = [("", images, idx)]
  if flip:  # the twin's posterior draw uses a different key (index + N is never a real index)
    variants.append(("_flip", images[:, :, ::-1], idx + np.int32(2**30)))
  records = [dict(index=int(i)) for i in indices]
  for suffix, imgs, ids in variants:
    pad = -len(imgs) % num_devices
    if pad:
      imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, 0)])
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
    out = {k: np.asarray(v)[:len(examples)] for k, v in encoder(imgs, ids).items()}
    for j, rec in enumerate(records):
      for k, v in out.items():
        rec[k + suffix] = v[j].astype(dtype)
  for rec, e in zip(records, examples):
    rec.update({k: int(e[k]) for k in ("label", "caption_id") if k in e})
    rec.update({k: np.asarray(e[k], np.int32) for k in CROP_FIELDS if k in e})
  return records


SETTINGS = "precompute.json"


POSITIVE = ("size", "batch", "shard_size")
# Settings added after outputs were first written: a precompute.json without one resumes (there
# is nothing to compare it with).
LATER_SETTINGS = ("input_fingerprint", "input_content")


def check_flags(args) -> None:
  """--size, --batch and --shard_size must be positive: one line naming the flag otherwise."""
  for flag in POSITIVE:
    value = getattr(args, flag)
    if value < 1:
      raise ValueError(f"--{flag}: expected a positive number, got {value}")


def settings(args, count: int, fingerprint: str, content: str) -> dict:
  """What decides the records an output holds: resuming with other values would mix them
  (`fingerprint`: the input's ordered listing, so a changed input of the same count counts;
  `content`: its files' sizes, so an image replaced under its name counts too)."""
  return {"input": args.input, "count": int(count), "size": args.size, "kind": args.kind,
          "flip": bool(args.flip), "dtype": args.dtype, "shard_size": args.shard_size,
          "seed": args.seed if args.kind == "sample" else None, "vae_hash": vae_hash(args.vae),
          "input_fingerprint": fingerprint, "input_content": content}


def _changed(before: dict, now: dict) -> list[str]:
  """The settings whose values differ (one `before` lacks from LATER_SETTINGS is no change)."""
  return [k for k in sorted(now)
          if before.get(k) != now[k] and not (k in LATER_SETTINGS and k not in before)]


def check_settings(out: str, now: dict, write: bool) -> None:
  """Records `now` in `out`/precompute.json before the first shard; an output written with other
  settings (a resumed or repeated run with another --size, --flip, --vae, ...) raises one line."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, SETTINGS)
  if os.path.isfile(path):
    with open(path) as f:
      before = json.load(f)
    diff = _changed(before, now)
    if diff == ["input_content"]:
      raise ValueError(f"--out {out} holds shards of another version of --input {now['input']} "
                       f"(same listing; image files changed size since: edited or replaced): "
                       f"rerun on the same files to resume, or choose a new --out")
    if diff == ["input_fingerprint"] or diff == ["input_content", "input_fingerprint"]:
      raise ValueError(f"--out {out} holds shards of another --input {now['input']} listing "
                       f"(same count {now['count']}; files, their order, labels or caption ids "
                       f"changed since): rerun on the same input to resume, or choose a new --out")
    if diff:
      shown = "; ".join(f"{k} {before.get(k)!r} there, {now[k]!r} here" for k in diff[:3])
      raise ValueError(f"--out {out} holds shards written with other settings ({shown}): "
                       f"rerun with the same arguments to resume, or choose a new --out")
    return
  if os.path.isdir(out) and any(f.startswith("latents-") for f in os.listdir(out)):
    raise ValueError(f"--out {out} holds shards without {SETTINGS} (written by an older "
                     f"version): choose a new --out")
  os.makedirs(out, exist_ok=True)
  if write:
    with open(path + ".tmp", "w") as f:
      json.dump(now, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def run(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from distill.data import image_inputs, records
  from models import convert
  check_flags(args)
  if args.distributed:
    jax.distributed.initialize()
  source = image_inputs.open_input(args.input, args.size, data_dir=args.tfds_data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"--input {args.input}: no examples")
  vae_module, variables = convert.load_diffusers_dir(args.vae)
  if not hasattr(vae_module, "encode"):
    raise ValueError(f"--vae {args.vae}: {type(vae_module).__name__} has no encoder")
  recipe = settings(args, n, source.fingerprint(), source.content_fingerprint())
  check_settings(args.out, recipe, write=jax.process_index() == 0)
  num_shards = math.ceil(n / args.shard_size)
  names = [records.shard_name(i, num_shards) for i in range(num_shards)]
  mine = [i for i in range(num_shards) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in mine if not os.path.isfile(os.path.join(args.out, names[i]))]
  done = len(mine) - len(todo)
  if done:
    print(f"resuming: {done} of {len(mine)} shards of this process already written")
  encoder, ndev = make_encoder(vae_module, variables, args.kind, args.seed)
  count = sum(min(args.shard_size, n - i * args.shard_size) for i in todo)
  bar = tqdm(total=count, unit="img", desc="precompute",
             disable=jax.process_index() != 0 or os.environ.get("DISTILL_NO_PROGRESS") == "1")
  for i in todo:
    start, stop = i * args.shard_size, min(n, (i + 1) * args.shard_size)

    def shard_records(start=start, stop=stop):
      for b in range(start, stop, args.batch):
        ids = list(range(b, min(stop, b + args.batch)))
        recs = encode_examples(encoder, ndev, [source.get(j) for j in ids], args.flip,
                               args.dtype, ids)
        bar.update(len(ids))
        yield from recs

    records.write_shard(os.path.join(args.out, names[i]), shard_records())
  bar.close()
  if all(os.path.isfile(os.path.join(args.out, s)) for s in names) and jax.process_index() == 0:
    first = records.read_first(os.path.join(args.out, names[0]))
    key = "mean" if args.kind == "mean_std" else "sample"
    shape = list(np.shape(first[key]))
    fields = sorted(first)
    records.write_meta(args.out, {
        "count": n, "shape": shape, "kind": args.kind, "flip": bool(args.flip),
        "num_classes": int(source.num_classes), "fields": fields, "shards": names,
        "dtype": args.dtype, "size": args.size,
        "vae": {"path": os.path.abspath(args.vae), "hash": recipe["vae_hash"]},
        "source": source.describe(),
        **({"caption_ids": source.caption_ids} if source.caption_ids else {})})
    print(f"wrote {n} examples ({num_shards} shards, latent {shape}) to {args.out}")
  return 0


def main(argv) -> int:
  args = parse(argv)
  cli.setup(args)
  try:
    return run(args)
  except (ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
