"""MRNet's query features: one ``<out>/<stem>.pt`` per query, computed as the official extractors compute them.

Official code (xian-sh/MRNet @ 53432f5, ``preprocess/``):

* **text** (NLMR), ``text_encode.py`` L76-115 (class ``DistilBert``, ``text_distbert_feat_extract``). For every
  video of an annotation JSON (file order) and every pair ``zip(sentences, audios)``: ``AutoTokenizer(sentence,
  return_tensors="pt")`` (one sentence, no truncation or padding: ``[CLS] ... [SEP]``) ->
  ``DistilBertModel(**inputs).last_hidden_state`` ``(1, L, 768)`` under ``torch.no_grad()`` -> a freshly built
  ``LayerNorm(768, eps=1e-05)`` (weight 1, bias 0: neither trained nor loaded) -> ``AdaptiveAvgPool1d(1)`` over
  the L tokens, ``[CLS]`` and ``[SEP]`` included -> ``.transpose(1, 2).squeeze(1)``: a float32 ``(1, 768)``
  tensor, ``torch.save``-d to ``<out>/<audios[k].split(".")[0]>.pt``. A file that exists is skipped.
* **speech** (SLMR, ActivityNet Speech), ``audio_encode.py`` L8-48 (class ``Wav2vec2Model``,
  ``audio_wav2vec2_feat_extract``). For every file of the audio folder (``os.listdir``): ``librosa.load(file,
  sr=16000)`` (mono, resampled to 16 kHz, float32) -> ``AutoProcessor(samples, sampling_rate=16000,
  return_tensors="pt")`` (wav2vec2's feature extractor: zero-mean unit-variance) ->
  ``Wav2Vec2Model(**inputs).last_hidden_state`` ``(1, T, 768)`` -> the same LayerNorm and mean over the T frames
  -> ``.transpose(1, 2).squeeze(0)``: float32 ``(1, 768)`` -> ``<out>/<file.split(".")[0]>.pt``; existing files
  are skipped.

The models default to the official ``distilbert-base-uncased`` and ``facebook/wav2vec2-base-960h``; any Hub name or
local folder that ``from_pretrained`` reads works (of model type distilbert / wav2vec2). The LayerNorm's width is
the model's ``hidden_size`` (768 for both official models, where the official code writes 768).

Where this differs from the official scripts (docs/data.md, "Extracting query features"):

* speech with ``--ann``: the files named by the annotations' ``audios`` are encoded (exactly the features the
  loader reads), looked up in ``--audio-dir``; without ``--ann``, every file of the folder as officially, in sorted
  order (hidden files left out);
* bad input is a :class:`~jaxprvr.errors.JaxprvrError` before a model is loaded: a missing audio file, an
  annotation without ``sentences`` / ``audios``, lists of different lengths (the official ``zip`` silently drops
  the tail); a sentence longer than the model's positions or an audio shorter than one wav2vec2 frame is an error
  naming the query (officially a crash inside the model);
* each file is saved in a temporary folder inside ``--out`` and renamed into place, so an interrupted run leaves
  no truncated file for a later run to skip (the archive is the same: torch names its folder after the stem).

Command line: ``python -m jaxprvr.preprocess.vmr {text,audio} --help``. torch, transformers and librosa are
imported when needed; without them the error says ``pip install 'jaxprvr[vmr-preprocess]'``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from jaxprvr.cli import run_cli
from jaxprvr.errors import JaxprvrError

TEXT_MODEL = "distilbert-base-uncased"  # text_encode.py L79-80
AUDIO_MODEL = "facebook/wav2vec2-base-960h"  # audio_encode.py L12-13
SAMPLE_RATE = 16000  # audio_encode.py L44-46
NORM_EPS = 1e-05  # the LayerNorm of text_encode.py L82 / audio_encode.py L14
MODEL_TYPES = {"text": "distilbert", "audio": "wav2vec2"}
INSTALL = "pip install 'jaxprvr[vmr-preprocess]'"


def _require(*modules: str) -> list:
    """The named modules, imported now; a missing one is a JaxprvrError naming the extra to install."""
    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            raise JaxprvrError("jaxprvr.preprocess.vmr", "the packages of the vmr-preprocess extra "
                               "(torch, transformers, librosa, soundfile)", f"{name} not importable",
                               hint=INSTALL) from None
    return out


def query_stem(audio: str) -> str:
    """``audio.split(".")[0]``: the feature of the query is ``<stem>.pt`` (``text_encode.py`` L110,
    ``audio_encode.py`` L39; the loader's rule, ``jaxprvr.data.mmn_format.audio_stem``)."""
    return audio.split(".")[0]


@dataclass(frozen=True)
class Query:
    stem: str  # the output is <out>/<stem>.pt
    source: str | Path  # the sentence (text) or the audio file (speech)
    where: str  # for error messages: annotation file, video, list index (or the audio file)


# ---------------------------------------------------------------------------------------------- annotations


def _videos(path: str | os.PathLike, fields: Sequence[str]):
    """``(where, entry)`` for each video of an annotation JSON, in file order, with ``fields`` checked: present,
    lists of one length, and ``audios[k]`` a file name with a non-empty stem."""
    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "an annotation file ({split}_audio_new.json)", "no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxprvrError(path, "a JSON object {vid: {...}}", f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise JaxprvrError(path, "a JSON object {vid: {...}}", f"a JSON {type(data).__name__}")
    for vid, entry in data.items():
        where = f"{path} [{vid!r}]"
        if not isinstance(entry, dict):
            raise JaxprvrError(where, f"an object with {' and '.join(fields)}", f"a JSON {type(entry).__name__}")
        for field in fields:
            if field not in entry:
                raise JaxprvrError(where, f"a {field!r} list (the *_audio_new.json files; the plain MMN JSONs "
                                   "lack 'audios')", f"keys {sorted(entry)}")
            if not isinstance(entry[field], list):
                raise JaxprvrError(where, f"a {field!r} list", f"a JSON {type(entry[field]).__name__}")
        lengths = {f: len(entry[f]) for f in fields}
        if len(set(lengths.values())) > 1:
            raise JaxprvrError(where, "lists of one length (one entry per query)",
                               ", ".join(f"{f} {n}" for f, n in lengths.items()))
        for k, audio in enumerate(entry["audios"]):
            if not isinstance(audio, str) or not query_stem(audio) or "/" in audio or os.sep in audio:
                raise JaxprvrError(where, f"audios[{k}] = a file name (no folder) with a stem before its first '.'",
                                   repr(audio)[:80])
        yield where, entry


def text_queries(ann_files: Sequence[str | os.PathLike]) -> list[Query]:
    """The sentences of the annotation files in the official order: files in the given order, videos in file
    order, ``zip(sentences, audios)`` (``text_encode.py`` L104-110)."""
    queries = []
    for ann in ann_files:
        for where, entry in _videos(ann, ("sentences", "audios")):
            for k, (sentence, audio) in enumerate(zip(entry["sentences"], entry["audios"])):
                if not isinstance(sentence, str):
                    raise JaxprvrError(where, f"sentences[{k}] = a string", repr(sentence)[:80])
                queries.append(Query(query_stem(audio), sentence, f"{where} sentences[{k}]"))
    return queries


def audio_queries(audio_dir: str | os.PathLike, ann_files: Sequence[str | os.PathLike] | None = None) -> list[Query]:
    """The spoken queries: with ``ann_files``, ``<audio_dir>/<audios[k]>`` for every query of the annotations
    (annotation order); without, every file of ``audio_dir`` (the official ``os.listdir`` loop,
    ``audio_encode.py`` L37-39; sorted here, hidden files left out)."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise JaxprvrError(audio_dir, "the folder of the spoken queries (--audio-dir)", "no such folder")
    if ann_files is None:
        return [Query(query_stem(name), audio_dir / name, str(audio_dir / name))
                for name in sorted(os.listdir(audio_dir))
                if not name.startswith(".") and (audio_dir / name).is_file()]
    queries = []
    for ann in ann_files:
        for where, entry in _videos(ann, ("audios",)):
            for k, audio in enumerate(entry["audios"]):
                queries.append(Query(query_stem(audio), audio_dir / audio, f"{where} audios[{k}]"))
    return queries


def plan(queries: Sequence[Query], out: str | os.PathLike) -> tuple[list[Query], int, int]:
    """``(to_write, skipped_existing, duplicates)``: a query whose ``<out>/<stem>.pt`` exists is skipped (the
    official ``os.path.exists`` test); of several queries with one stem the first is written, as officially (the
    later ones find its file)."""
    out = Path(out)
    seen: set[str] = set()
    todo, skipped, duplicates = [], 0, 0
    for q in queries:
        if q.stem in seen:
            duplicates += 1
            continue
        seen.add(q.stem)
        if (out / f"{q.stem}.pt").exists():
            skipped += 1
        else:
            todo.append(q)
    return todo, skipped, duplicates


# ---------------------------------------------------------------------------------------------- encoders


def _device(torch, name: str):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise JaxprvrError("--device", "a torch device (cpu, cuda, cuda:0)", repr(name)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JaxprvrError("--device", "a CUDA device torch can use", "torch.cuda.is_available() False")
    return device


def _from_pretrained(transformers, model: str, kind: str):
    """``(preprocessor, model)`` of the official classes (AutoTokenizer + DistilBertModel, AutoProcessor +
    Wav2Vec2Model), after checking the folder / name holds a model of that type (another type would be
    silently re-initialised at random)."""
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise JaxprvrError(model, "a Hugging Face model name or a local folder saved with save_pretrained",
                           str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from None
    if config.model_type != MODEL_TYPES[kind]:
        raise JaxprvrError(model, f"a {MODEL_TYPES[kind]} model (the official {kind} encoder)",
                           f"model_type {config.model_type!r}")
    if kind == "text":
        pre_cls, model_cls = transformers.AutoTokenizer, transformers.DistilBertModel  # text_encode.py L79-80
    else:
        pre_cls, model_cls = transformers.AutoProcessor, transformers.Wav2Vec2Model  # audio_encode.py L12-13
    try:
        try:
            pre = pre_cls.from_pretrained(model)
        except (OSError, ValueError, TypeError, KeyError):
            if kind == "text":
                raise
            # A wav2vec2 folder without a CTC tokenizer (a pretraining-only checkpoint): transformers 5's
            # AutoProcessor fails where 4.x returned the feature extractor. The processor's audio call *is* the
            # feature extractor's, so that is what is loaded.
            pre = transformers.AutoFeatureExtractor.from_pretrained(model)
        net = model_cls.from_pretrained(model)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise JaxprvrError(model, f"a {MODEL_TYPES[kind]} model with its "
                           f"{'tokenizer' if kind == 'text' else 'feature extractor'}",
                           str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__) from None
    return pre, net


class _Encoder:
    """The official wrapper module: a pretrained model, then ``LayerNorm(hidden, eps=1e-05)`` as freshly built
    (weight 1, bias 0) and ``AdaptiveAvgPool1d(1)`` over the sequence, all under ``torch.no_grad()``."""

    kind = ""
    squeeze_dim = 0

    def __init__(self, model: str, device: str = "cpu"):
        torch, transformers = _require("torch", "transformers")
        self.torch = torch
        self.device = _device(torch, device)
        self.name = model
        self.preprocessor, net = _from_pretrained(transformers, model, self.kind)
        # float32 as the official (transformers 4.x loaded weights as float32); eval() is what from_pretrained
        # leaves the model in, restated.
        self.model = net.float().eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.norm = torch.nn.LayerNorm(self.dim, eps=NORM_EPS, elementwise_affine=True).to(self.device)
        self.avgpool = torch.nn.AdaptiveAvgPool1d(output_size=1)

    def _pool(self, inputs):
        with self.torch.no_grad():
            x = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            x = x.last_hidden_state
            x = self.norm(x)
            x = self.avgpool(x.transpose(1, 2))
            x = x.transpose(1, 2).squeeze(self.squeeze_dim)  # (1, 1, D) -> (1, D)
        return x.cpu()


class TextEncoder(_Encoder):
    """``DistilBert`` of ``text_encode.py`` L76-94: one sentence -> float32 ``(1, hidden)``, ``squeeze(1)``."""

    kind = "text"
    squeeze_dim = 1  # text_encode.py L92

    def __init__(self, model: str = TEXT_MODEL, device: str = "cpu"):
        super().__init__(model, device)
        self.max_tokens = int(self.model.config.max_position_embeddings)

    def __call__(self, sentence: str, where: str = "sentence"):
        inputs = self.preprocessor(sentence, return_tensors="pt")  # text_encode.py L86
        n = int(inputs["input_ids"].shape[1])
        if n > self.max_tokens:
            raise JaxprvrError(where, f"a sentence of at most {self.max_tokens} tokens (the model's positions; the "
                               "official extractor does not truncate)", f"{n} tokens")
        return self._pool(inputs)


class AudioEncoder(_Encoder):
    """``Wav2vec2Model`` of ``audio_encode.py`` L8-26: 16 kHz samples -> float32 ``(1, hidden)``, ``squeeze(0)``."""

    kind = "audio"
    squeeze_dim = 0  # audio_encode.py L24

    def __init__(self, model: str = AUDIO_MODEL, device: str = "cpu"):
        super().__init__(model, device)
        cfg = self.model.config
        self._convs = list(zip(cfg.conv_kernel, cfg.conv_stride))

    def frames(self, n_samples: int) -> int:
        """The number of wav2vec2 frames of ``n_samples`` samples (its strided convolutions, no padding)."""
        n = int(n_samples)
        for kernel, stride in self._convs:
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return n

    def __call__(self, samples, sr: int = SAMPLE_RATE, where: str = "audio"):
        if self.frames(len(samples)) < 1:
            raise JaxprvrError(where, f"an audio long enough for one wav2vec2 frame ({self.min_samples()} samples "
                               f"at {sr} Hz)", f"{len(samples)} samples")
        inputs = self.preprocessor(samples, sampling_rate=sr, return_tensors="pt")  # audio_encode.py L18
        return self._pool(inputs)

    def min_samples(self) -> int:
        n = 1
        for kernel, stride in reversed(self._convs):
            n = (n - 1) * stride + kernel
        return n


def load_audio(path: str | os.PathLike):
    """``librosa.load(path, sr=16000)`` (``audio_encode.py`` L44): mono float32 samples at 16 kHz."""
    (librosa,) = _require("librosa")
    try:
        samples, _ = librosa.load(path, sr=SAMPLE_RATE)
    except Exception as e:  # soundfile / audioread / decoder errors of every kind
        raise JaxprvrError(path, "an audio file librosa can decode", f"{type(e).__name__}: {e}") from None
    return samples


# ---------------------------------------------------------------------------------------------- extraction


def _write(todo: Sequence[Query], out: Path, encode: Callable, desc: str, progress: bool) -> dict:
    """Encodes and saves every query of ``todo`` (a tqdm bar on stderr); returns the shape / dtype written."""
    from tqdm import tqdm

    (torch,) = _require("torch")
    kinds: Counter = Counter()
    tmp = Path(tempfile.mkdtemp(prefix=".vmr-preprocess-", dir=out))
    try:
        for q in tqdm(todo, desc=desc, unit="query", file=sys.stderr, dynamic_ncols=True, disable=not progress):
            x = encode(q)
            torch.save(x, tmp / f"{q.stem}.pt")  # text_encode.py L115, audio_encode.py L48
            os.replace(tmp / f"{q.stem}.pt", out / f"{q.stem}.pt")
            kinds[(tuple(x.shape), str(x.dtype).removeprefix("torch."))] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shapes": [dict(shape=list(s), dtype=d, count=n) for (s, d), n in kinds.items()]}


def _out_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JaxprvrError(out, "an output folder (--out)", "a file")
    return out


def _summary(mode, model, out, queries, todo, skipped, duplicates, device, start, written) -> dict:
    return dict(mode=mode, model=str(model), out=str(out), device=str(device), queries=len(queries),
                written=len(todo), skipped_existing=skipped, duplicates=duplicates, **written,
                seconds=round(time.perf_counter() - start, 2))


def encode_text(ann_files: Sequence[str | os.PathLike], out: str | os.PathLike, model: str = TEXT_MODEL,
                device: str = "cpu", progress: bool = True) -> dict:
    """``text_distbert_feat_extract`` (``text_encode.py`` L97-115) over ``ann_files``: writes
    ``<out>/<stem>.pt`` for every query not yet written; returns the summary (counts, shapes, seconds)."""
    start = time.perf_counter()
    out = _out_dir(out)
    queries = text_queries(ann_files)
    todo, skipped, duplicates = plan(queries, out)
    written = {"shapes": []}
    if todo:
        encoder = TextEncoder(model, device)
        out.mkdir(parents=True, exist_ok=True)
        written = _write(todo, out, lambda q: encoder(q.source, q.where), "text", progress)
    return dict(_summary("text", model, out, queries, todo, skipped, duplicates, device, start, written),
                annotations=[str(a) for a in ann_files])


def encode_audio(audio_dir: str | os.PathLike, out: str | os.PathLike,
                 ann_files: Sequence[str | os.PathLike] | None = None, model: str = AUDIO_MODEL,
                 device: str = "cpu", progress: bool = True) -> dict:
    """``audio_wav2vec2_feat_extract`` (``audio_encode.py`` L30-48): the files of ``audio_dir`` (all of them, or
    those the annotations name) -> ``<out>/<stem>.pt``; every audio file to encode must exist before a model is
    loaded. Returns the summary."""
    start = time.perf_counter()
    out = _out_dir(out)
    queries = audio_queries(audio_dir, ann_files)
    todo, skipped, duplicates = plan(queries, out)
    for q in todo:
        if not Path(q.source).is_file():
            raise JaxprvrError(q.source, f"the audio of {q.where} (--audio-dir)", "no such file")
    written = {"shapes": []}
    if todo:
        _require("librosa")
        encoder = AudioEncoder(model, device)
        out.mkdir(parents=True, exist_ok=True)
        written = _write(todo, out, lambda q: encoder(load_audio(q.source), SAMPLE_RATE, str(q.source)), "audio",
                         progress)
    summary = _summary("audio", model, out, queries, todo, skipped, duplicates, device, start, written)
    summary.update(audio_dir=str(audio_dir), annotations=None if ann_files is None else [str(a) for a in ann_files])
    return summary


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxprvr.preprocess.vmr",
        description="Extract MRNet's query features as the official preprocess/ scripts do: one <stem>.pt "
                    "(float32, (1, 768) with the official models) per query, <stem> = audios[k] up to its first "
                    "'.'. Files that exist are skipped. Needs " + INSTALL + ".")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{text,audio}")
    text = sub.add_parser("text", help="DistilBERT sentence features (preprocess/text_encode.py)",
                          description="DistilBERT features of the annotations' sentences (text_encode.py L76-115): "
                                      "last hidden state -> LayerNorm (as built: weight 1, bias 0) -> mean over "
                                      "tokens.")
    text.add_argument("--ann", nargs="+", required=True, metavar="FILE.json",
                      help="annotation files {vid: {sentences, audios, ...}} (the *_audio_new.json files)")
    text.add_argument("--model", default=TEXT_MODEL, help=f"model name or local folder (default {TEXT_MODEL})")
    audio = sub.add_parser("audio", help="wav2vec2 spoken-query features (preprocess/audio_encode.py)",
                           description="wav2vec2 features of spoken queries (audio_encode.py L8-48): librosa at "
                                       "16 kHz -> feature extractor -> last hidden state -> LayerNorm (as built: "
                                       "weight 1, bias 0) -> mean over frames.")
    audio.add_argument("--audio-dir", required=True, help="the folder of the audio files")
    audio.add_argument("--ann", nargs="+", default=None, metavar="FILE.json",
                       help="encode the files these annotations name in 'audios' (default: every file of "
                            "--audio-dir, as the official script)")
    audio.add_argument("--model", default=AUDIO_MODEL, help=f"model name or local folder (default {AUDIO_MODEL})")
    for p in (text, audio):
        p.add_argument("--out", required=True, help="the query feature folder to fill (created if needed)")
        p.add_argument("--device", default="cpu", help="torch device (default cpu, as the official scripts)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv=None) -> int:
    def run(args) -> dict:
        if args.mode == "text":
            return encode_text(args.ann, args.out, args.model, args.device, progress=not args.no_progress)
        return encode_audio(args.audio_dir, args.out, args.ann, args.model, args.device,
                            progress=not args.no_progress)

    return run_cli(build_parser(), run, argv)


__all__ = ["TextEncoder", "AudioEncoder", "encode_text", "encode_audio", "text_queries", "audio_queries", "plan",
           "load_audio", "query_stem", "Query", "main", "TEXT_MODEL", "AUDIO_MODEL", "SAMPLE_RATE", "INSTALL"]

if __name__ == "__main__":
    sys.exit(main())
