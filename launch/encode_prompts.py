"""Encode captions with a teacher's text encoders into the prompt-embedding directory that
`data.text_embeds` reads (distill/data/latents.py): the text side of text-to-image distillation,
so no text encoder runs in the training loop.

    # SD1.5 / SD2.x: CLIPTextModel, last_hidden_state (C, 77, 768 | 1024)
    python -m launch.encode_prompts --kind sd15 --pipeline /ckpt/stable-diffusion-v1-5 \
        --captions /data/coco/captions.jsonl --out /data/coco_sd15_text [--dtype float16]
    # SDXL: both CLIP encoders' penultimate layers (C, 77, 2048) + pooled (C, 1280)
    python -m launch.encode_prompts --kind sdxl --pipeline /ckpt/sdxl-base-1.0 \
        --captions /data/coco/captions.jsonl --out /data/coco_sdxl_text --device cuda
    # SANA / SANA-Sprint: Gemma-2 last_hidden_state (C, 300, 2304) + mask (C, 300)
    python -m launch.encode_prompts --kind sana --pipeline /ckpt/Sana_1600M_1024px_diffusers \
        --captions prompts.txt --out /data/sana_text --precision bfloat16 \
        [--complex_human_instruction] [--clip_tokenizer /ckpt/clip-vit-large-patch14]

Then train with `--config.data.text_embeds=OUT` (caption ids of `launch.precompute --input
jsonl:...` index its rows).

Weights are local (no download): `--pipeline` is a diffusers pipeline folder (its `tokenizer`,
`text_encoder`, and for SDXL `tokenizer_2`, `text_encoder_2` sub-folders); `--tokenizer`,
`--text_encoder`, `--tokenizer_2`, `--text_encoder_2` name (or override) single folders.

Encoding is diffusers' `encode_prompt` of each family, without prompt weighting or clip_skip:
  sd15   CLIPTokenizer, padding "max_length" to `model_max_length` (77), truncation;
         CLIPTextModel's last_hidden_state (the attention mask passed only when the encoder's
         config sets `use_attention_mask`, as StableDiffusionPipeline). No mask is stored.
  sdxl   each of (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) as above with
         output_hidden_states; hidden_states[-2] of both concatenated on the last axis; pooled is
         the first 2-D output ([0]), i.e. text_encoder_2's projected `text_embeds`
         (StableDiffusionXLPipeline).
  sana   the caption lower-cased and stripped, the tokenizer padding right to
         `--max_sequence_length` (300) with its special tokens (Gemma's <bos>), truncation; the
         encoder's last_hidden_state and the attention mask (SanaPipeline). With
         `--complex_human_instruction` (the pipeline's default instruction, OFF here) the
         instruction is prepended, the length grows by its token count - 2, and token 0 plus the
         last `max_sequence_length - 1` tokens are kept. The null prompt never has it.

Captions (`--captions`). JSON lines (a `.jsonl` file, any case, or any file whose first
non-blank line is a JSON object with a "caption" or "caption_id" key): one JSON object per line
with `"caption_id": int` (>= 0) and `"caption": str` (other keys, e.g. `"image"`, are ignored, so
the file `launch.precompute --input jsonl:FILE` reads, with a caption added to each line, serves
both); blank lines are skipped; row `caption_id` of the output is that caption, so the ids must
cover 0..C-1 (an id may repeat with the same text). Any other file: one caption per line,
caption id = line number - 1 (a blank line is the empty caption).

Output directory `--out` (written in `--batch` chunks into memory-mapped .npy files, so C need
not fit in RAM; C = captions, L = tokens, D = width):
  embeds.npy       (C, L, D) `--dtype` (float32, or float16)
  mask.npy         (C, L) int32, sana only (1 = token, 0 = padding)
  pooled.npy       (C, Dp) `--dtype`, sdxl only
  null.npy         (L, D) the encoding of the empty prompt "" (null_mask.npy (L,) for sana,
                   null_pooled.npy (Dp,) for sdxl). SDXL pipelines with
                   `force_zeros_for_empty_prompt` (meta.json records it) use zeros instead.
  clip_tokens.npy  (C, 77) int32 CLIP token ids of each caption (for the CLIP score): the
                   first tokenizer's for sd15 / sdxl, `--clip_tokenizer DIR`'s when given (sana:
                   only then)
  captions.json    the caption strings in id order
  meta.json        kind, count, shapes, dtypes, the encoder folders, truncated-caption count
The run writes `OUT.partial` and renames it to OUT when complete: a failed or killed run leaves
no OUT (a new run removes a stale OUT.partial), and an existing OUT is replaced only with
`--overwrite`, and only when it is empty or a previous output of this tool (its meta.json
names one of the kinds): any other directory (latents, a pipeline) is refused, left untouched.
`--precision` is the torch dtype the encoders run in (diffusers pipelines often run them in
float16 / bfloat16; float32 is exact); `--device` cpu | cuda[:i] (default: cuda when
available).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from distill.data.image_inputs import caption_id
from launch import cli

KINDS = ("sd15", "sdxl", "sana")
CLIP_LENGTH = 77
ROLES = {"sd15": ("tokenizer", "text_encoder"),
         "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
         "sana": ("tokenizer", "text_encoder")}


def parse(argv):
  p = argparse.ArgumentParser(prog="launch.encode_prompts")
  p.add_argument("--kind", required=True, choices=KINDS, help="sd15 (also SD2.x) | sdxl | sana")
  p.add_argument("--captions", required=True, help="captions .jsonl or a text file")
  p.add_argument("--out", required=True, help="the output directory")
  p.add_argument("--pipeline", default=None, help="a diffusers pipeline folder")
  for role in ROLES["sdxl"]:
    p.add_argument(f"--{role}", default=None, help=f"folder (default PIPELINE/{role})")
  p.add_argument("--clip_tokenizer", default=None, help="CLIP tokenizer for clip_tokens.npy")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
  p.add_argument("--precision", default="float32", choices=("float32", "float16", "bfloat16"),
                 help="torch dtype of the encoders")
  p.add_argument("--device", default=None, help="cpu | cuda[:i] (default cuda if available)")
  p.add_argument("--batch", type=int, default=64, help="captions per encoder call")
  p.add_argument("--max_sequence_length", type=int, default=300, help="sana tokens")
  p.add_argument("--complex_human_instruction", action="store_true",
                 help="sana: prepend SanaPipeline's default complex human instruction")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--log_level", default="WARNING")
  return p.parse_args(argv)


# -- captions ------------------------------------------------------------------------------
def read_captions(path: str) -> list[str]:
  """Captions in id order from JSON lines (`is_jsonl`) or a one-per-line text file."""
  if not os.path.isfile(path):
    raise ValueError(f"--captions {path}: no such file")
  captions = _jsonl_captions(path) if is_jsonl(path) else _line_captions(path)
  if not captions:
    raise ValueError(f"--captions {path}: no captions")
  return captions


JSONL_KEYS = ("caption", "caption_id")


def is_jsonl(path: str) -> bool:
  """Whether `path` holds JSON lines: named `.jsonl` (any case), or its first non-blank line is a
  JSON object with a caption key (the precompute file under another name)."""
  if path.lower().endswith(".jsonl"):
    return True
  with open(path, encoding="utf-8", errors="replace") as f:
    first = next((line for line in f if line.strip()), "")
  try:
    obj = json.loads(first)
  except ValueError:
    return False
  return isinstance(obj, dict) and any(k in obj for k in JSONL_KEYS)


def _line_captions(path: str) -> list[str]:
  """Lines split at "\n" only (a caption may hold other line separators, e.g. U+2028)."""
  with open(path, encoding="utf-8", newline="\n") as f:
    return [line.rstrip("\n").rstrip("\r") for line in f]


def _jsonl_captions(path: str) -> list[str]:
  by_id: dict[int, str] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        cid, text = caption_id(obj["caption_id"]), obj["caption"]
        if not isinstance(text, str):
          raise ValueError(f"caption must be a string, got {text!r}")
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--captions {path} line {n}: expected {{\"caption_id\": int, "
                         f"\"caption\": str}}, got {line.strip()[:80]!r} ({e})") from None
      if by_id.setdefault(cid, text) != text:
        raise ValueError(f"--captions {path} line {n}: caption_id {cid} has two texts, "
                         f"{by_id[cid][:40]!r} and {text[:40]!r}")
  missing = next((i for i in range(len(by_id)) if i not in by_id), None)
  if missing is not None:
    raise ValueError(f"--captions {path}: caption ids must be 0..{len(by_id) - 1}, id "
                     f"{missing} is missing (largest {max(by_id)})")
  return [by_id[i] for i in range(len(by_id))]


# -- encoders ------------------------------------------------------------------------------
def encoder_dirs(args) -> dict[str, str]:
  """role -> folder of each tokenizer / text encoder `--kind` needs (checked to exist)."""
  out = {}
  for role in ROLES[args.kind]:
    path = getattr(args, role) or (os.path.join(args.pipeline, role) if args.pipeline else None)
    if path is None:
      raise ValueError(f"--{role}: --kind {args.kind} needs it; give --pipeline DIR (with "
                       f"DIR/{role}) or --{role} DIR")
    if not os.path.isdir(path):
      raise ValueError(f"--{role}: {path!r} is not a directory (expected a transformers "
                       f"{'tokenizer' if role.startswith('tokenizer') else 'model'} folder)")
    out[role] = path
  for role in ROLES[args.kind][1::2]:   # the encoders: their config says which family they are
    _check_family(args.kind, role, out[role])
  return out


CLIP_TYPE = "clip_text_model"   # CLIPTextModel's and CLIPTextModelWithProjection's model_type


def _check_family(kind: str, role: str, path: str) -> None:
  """A CLIP encoder for sd15 / sdxl, a non-CLIP (Gemma-2) one for sana, from its config.json."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    raise ValueError(f"--{role}: {config} is missing (expected a transformers model folder)")
  with open(config) as f:
    found = json.load(f).get("model_type")
  if (found == CLIP_TYPE) == (kind == "sana"):
    expected = "a Gemma-2" if kind == "sana" else f"a CLIP ({CLIP_TYPE!r})"
    other = "sd15 or sdxl" if found == CLIP_TYPE else "sana"
    raise ValueError(f"--{role}: --kind {kind} encodes with {expected} text encoder, {config} "
                     f"has model_type {found!r} (--kind {other}?)")


def load(kind: str, dirs: dict[str, str], precision: str, device: str) -> dict:
  """The tokenizers and encoders (eval mode, on `device`, in `precision`) of `kind`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers as tf  # pylint: disable=g-import-not-at-top
  dtype = getattr(torch, precision)
  if kind == "sana":
    tok_cls, enc_cls = {"tokenizer": tf.AutoTokenizer}, {"text_encoder": tf.AutoModel}
  else:
    tok_cls = {"tokenizer": tf.CLIPTokenizer, "tokenizer_2": tf.CLIPTokenizer}
    enc_cls = {"text_encoder": tf.CLIPTextModel,
               "text_encoder_2": tf.CLIPTextModelWithProjection}
  out = {}
  for role, path in dirs.items():
    if role in tok_cls:
      out[role] = tok_cls[role].from_pretrained(path)
    else:
      out[role] = enc_cls[role].from_pretrained(path, dtype=dtype).to(device).eval()
  return out


def tokenize(tok, texts: list[str], length: int, **kwargs) -> tuple[dict, int]:
  """Padded / truncated to `length` as the pipelines do, and how many texts were longer."""
  ids = tok(texts, padding="max_length", max_length=length, truncation=True,
            return_tensors="pt", **kwargs)
  longer = tok(texts, padding=False, max_length=length + 1, truncation=True, **kwargs)
  return ids, sum(len(x) > length for x in longer["input_ids"])


def clip_ids(tok, texts: list[str]) -> np.ndarray:
  """(B, 77) int32 CLIP token ids (CLIPTokenizer, max_length padding, truncation)."""
  ids = tok(texts, padding="max_length", max_length=CLIP_LENGTH, truncation=True)["input_ids"]
  return np.asarray(ids, np.int32)


def _np(t) -> np.ndarray:
  return t.float().cpu().numpy()


def encode_sd15(m: dict, texts: list[str]) -> tuple[dict, int]:
  """StableDiffusionPipeline.encode_prompt: last_hidden_state (B, 77, D)."""
  tok, enc = m["tokenizer"], m["text_encoder"]
  ids, longer = tokenize(tok, texts, tok.model_max_length)
  mask = None
  if getattr(enc.config, "use_attention_mask", False):
    mask = ids.attention_mask.to(enc.device)
  out = enc(ids.input_ids.to(enc.device), attention_mask=mask)
  return {"embeds": _np(out[0])}, longer


def encode_sdxl(m: dict, texts: list[str]) -> tuple[dict, int]:
  """StableDiffusionXLPipeline.encode_prompt: both encoders' hidden_states[-2] concatenated
  (B, 77, D1 + D2), pooled = the first 2-D output (text_encoder_2's text_embeds)."""
  embeds, pooled, longer = [], None, 0
  for tok, enc in ((m["tokenizer"], m["text_encoder"]), (m["tokenizer_2"], m["text_encoder_2"])):
    ids, n = tokenize(tok, texts, tok.model_max_length)
    longer = max(longer, n)
    out = enc(ids.input_ids.to(enc.device), output_hidden_states=True)
    if pooled is None and out[0].ndim == 2:
      pooled = out[0]
    embeds.append(out.hidden_states[-2])
  if pooled is None:
    raise ValueError("--text_encoder_2: no 2-D output (expected CLIPTextModelWithProjection)")
  import torch  # pylint: disable=g-import-not-at-top
  return {"embeds": _np(torch.cat(embeds, -1)), "pooled": _np(pooled)}, longer


def sana_instruction() -> str:
  """SanaPipeline.__call__'s default complex human instruction, joined by newlines."""
  import inspect  # pylint: disable=g-import-not-at-top
  from diffusers import SanaPipeline  # pylint: disable=g-import-not-at-top
  lines = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"]
  return "\n".join(lines.default)


def encode_sana(m: dict, texts: list[str], max_length: int,
                instruction: str | None = None) -> tuple[dict, int]:
  """SanaPipeline.encode_prompt (clean_caption False): (B, max_length, D) and the mask."""
  tok, enc = m["tokenizer"], m["text_encoder"]
  tok.padding_side = "right"
  texts = [t.lower().strip() for t in texts]
  length = max_length
  if instruction:
    texts = [instruction + t for t in texts]
    length = len(tok.encode(instruction)) + max_length - 2
  ids, longer = tokenize(tok, texts, length, add_special_tokens=True)
  mask = ids.attention_mask.to(enc.device)
  embeds = enc(ids.input_ids.to(enc.device), attention_mask=mask)[0]
  keep = [0] + list(range(-max_length + 1, 0))  # identity without the instruction
  return {"embeds": _np(embeds[:, keep]), "mask": mask[:, keep].cpu().numpy()}, longer


def make_encode(kind: str, m: dict, args):
  """(texts, null) -> ({embeds, mask?, pooled?} numpy rows, truncated count)."""
  if kind == "sd15":
    return lambda texts, null=False: encode_sd15(m, texts)
  if kind == "sdxl":
    return lambda texts, null=False: encode_sdxl(m, texts)
  instruction = sana_instruction() if args.complex_human_instruction else None
  return lambda texts, null=False: encode_sana(m, texts, args.max_sequence_length,
                                               None if null else instruction)


# -- output --------------------------------------------------------------------------------
def start_output(out: str, overwrite: bool) -> str:
  """The temporary directory to write (OUT.partial, fresh); refuses an existing OUT, and with
  `overwrite` one that is not a previous output of this tool."""
  out = os.path.normpath(out)
  empty = os.path.isdir(out) and not os.listdir(out)
  if os.path.exists(out) and not empty:
    if not overwrite:
      raise ValueError(f"--out {out}: already exists; pass --overwrite to replace it")
    kind = output_kind(out)
    if kind not in KINDS:
      raise ValueError(f"--out {out}: not a launch.encode_prompts output ({kind}); --overwrite "
                       f"replaces only those, so it is left untouched: choose another --out")
  tmp = out + ".partial"
  if os.path.exists(tmp):
    print(f"removing {tmp} (left by an unfinished run)", file=sys.stderr)
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  return tmp


def output_kind(out: str) -> str:
  """The `kind` a previous output's meta.json records, else why `out` is none (for the line)."""
  meta = os.path.join(out, "meta.json")
  if not os.path.isdir(out):
    return "not a directory"
  try:
    with open(meta) as f:
      kind = json.load(f).get("kind")
  except (OSError, ValueError, AttributeError):
    return f"no meta.json with a kind of {', '.join(KINDS)}"
  if kind in KINDS:
    return kind
  return f"its meta.json has kind {kind!r}, not one of {', '.join(KINDS)}"


def finish_output(tmp: str, out: str) -> None:
  """Moves the complete `tmp` to `out` (an existing `out` is replaced)."""
  out = os.path.normpath(out)
  if not os.path.exists(out):
    os.rename(tmp, out)
    return
  old = out + ".old"
  if os.path.exists(old):
    shutil.rmtree(old)
  os.rename(out, old)
  os.rename(tmp, out)
  if os.path.isdir(old):
    shutil.rmtree(old)
  else:
    os.remove(old)


def write_all(encode, captions: list[str], tmp: str, args, clip_tok) -> dict:
  """Encodes the null prompt and every caption into `tmp`; returns the meta fields."""
  from distill import runlog  # pylint: disable=g-import-not-at-top
  null, _ = encode([""], null=True)  # captions have its shapes (sana: the kept tokens)
  for key, v in null.items():
    np.save(os.path.join(tmp, f"null{'' if key == 'embeds' else '_' + key}.npy"),
            v[0].astype(np.int32 if key == "mask" else args.dtype))
  c = len(captions)
  arrays = {k: np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), mode="w+",
                                         dtype=np.int32 if k == "mask" else args.dtype,
                                         shape=(c,) + v.shape[1:]) for k, v in null.items()}
  if clip_tok is not None:
    arrays["clip_tokens"] = np.lib.format.open_memmap(
        os.path.join(tmp, "clip_tokens.npy"), mode="w+", dtype=np.int32, shape=(c, CLIP_LENGTH))
  truncated = 0
  bar = runlog.progress_bar(c, "encode_prompts")
  for start in range(0, c, args.batch):
    texts = captions[start:start + args.batch]
    rows, longer = encode(texts)
    truncated += longer
    for k, v in rows.items():
      arrays[k][start:start + len(texts)] = v
    if clip_tok is not None:
      arrays["clip_tokens"][start:start + len(texts)] = clip_ids(clip_tok, texts)
    bar.update(len(texts))
  bar.close()
  shapes = {k: list(a.shape) for k, a in arrays.items()}
  for a in arrays.values():
    a.flush()
  with open(os.path.join(tmp, "captions.json"), "w", encoding="utf-8") as f:
    json.dump(captions, f, ensure_ascii=False)
  return {"shapes": shapes, "truncated": truncated}


def pipeline_flags(pipeline: str | None) -> dict:
  """`force_zeros_for_empty_prompt` of the pipeline's model_index.json, when it has one."""
  path = os.path.join(pipeline, "model_index.json") if pipeline else ""
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    index = json.load(f)
  return {k: index[k] for k in ("force_zeros_for_empty_prompt",) if k in index}


def run(args) -> int:
  if args.batch < 1:
    raise ValueError(f"--batch: expected a positive number, got {args.batch}")
  captions = read_captions(args.captions)
  dirs = encoder_dirs(args)
  if args.clip_tokenizer and not os.path.isdir(args.clip_tokenizer):
    raise ValueError(f"--clip_tokenizer: {args.clip_tokenizer!r} is not a directory")
  tmp = start_output(args.out, args.overwrite)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from distill import runlog  # pylint: disable=g-import-not-at-top
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load(args.kind, dirs, args.precision, device)
    clip_tok = models.get("tokenizer") if args.kind != "sana" else None
    if args.clip_tokenizer:
      from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
      clip_tok = CLIPTokenizer.from_pretrained(args.clip_tokenizer)
    with torch.inference_mode():
      info = write_all(make_encode(args.kind, models, args), captions, tmp, args, clip_tok)
    runlog.write_json(os.path.join(tmp, "meta.json"), {
        "kind": args.kind, "count": len(captions), "dtype": args.dtype,
        "precision": args.precision, "encoders": {k: os.path.abspath(v) for k, v in dirs.items()},
        "clip_tokenizer": os.path.abspath(args.clip_tokenizer) if args.clip_tokenizer else None,
        "captions": os.path.abspath(args.captions), **info, **pipeline_flags(args.pipeline),
        **({"max_sequence_length": args.max_sequence_length,
            "complex_human_instruction": bool(args.complex_human_instruction)}
           if args.kind == "sana" else {})})
    finish_output(tmp, args.out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shape = info["shapes"]["embeds"]
  note = f" ({info['truncated']} truncated to the encoder's length)" if info["truncated"] else ""
  print(f"wrote {len(captions)} prompt embeddings {shape} to {args.out}{note}")
  return 0


def main(argv) -> int:
  args = parse(argv)
  cli.setup(args)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jax only draws the progress bar here
  try:
    return run(args)
  except (ValueError, KeyError, OSError) as e:
    return cli.fail(e)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
