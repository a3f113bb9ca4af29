"""The vmr-preprocess extra (jaxprvr.preprocess.vmr): MRNet's query features against a literal transcription of the
official extraction loops (xian-sh/MRNet @ 53432f5, preprocess/text_encode.py L76-115, preprocess/audio_encode.py
L8-48), on tiny random DistilBERT / wav2vec2 models saved locally (no network); the files read by torch.load, by
the torch-free reader and by the MMN loader; skipping, duplicates, and the one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
librosa = pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")

from jaxprvr.config import load_config  # noqa: E402
from jaxprvr.data import mmn_format  # noqa: E402
from jaxprvr.data.torch_pt import read_pt_tensor, write_pt_tensor  # noqa: E402
from jaxprvr.errors import JaxprvrError  # noqa: E402
from jaxprvr.preprocess import vmr  # noqa: E402

# audioread (librosa's fallback decoder) imports modules Python 3.13 removes.
pytestmark = pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")

DIM = 32  # the tiny models' hidden size (768 for the official ones)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "man", "woman", "person", "dog", "is", "are",
         "runs", "turn", "light", "on", "off", "door", "opens", "into", "room", "walks", "##s", "##ing", ".", ","]


# ---------------------------------------------------------------------------------------------- tiny models, data


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random 1-layer DistilBERT (dim 32) with a WordPiece tokenizer of VOCAB, as a from_pretrained folder."""
    d = tmp_path_factory.mktemp("distilbert")
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(VOCAB), dim=DIM, n_layers=1, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=24)
    transformers.DistilBertModel(cfg).save_pretrained(d)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DistilBertTokenizer",
                                                         "do_lower_case": True}))
    return d


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    """A random 1-layer wav2vec2 (hidden 32, two strided convolutions) with a Wav2Vec2Processor (feature extractor
    as wav2vec2-base-960h's: normalise, no attention mask; a CTC tokenizer), as a from_pretrained folder."""
    d = tmp_path_factory.mktemp("wav2vec2")
    torch.manual_seed(1)
    cfg = transformers.Wav2Vec2Config(vocab_size=8, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(cfg).save_pretrained(d)
    (d / "ctc_vocab.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5,
                                                  "B": 6, "C": 7}))
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                               do_normalize=True, return_attention_mask=False)
    tok = transformers.Wav2Vec2CTCTokenizer(str(d / "ctc_vocab.json"))
    transformers.Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def audio_model_fe_only(audio_model, tmp_path_factory):
    """The same wav2vec2 without a tokenizer (like a pretraining-only checkpoint): only the feature extractor."""
    d = tmp_path_factory.mktemp("wav2vec2_fe_only")
    transformers.Wav2Vec2Model.from_pretrained(audio_model).save_pretrained(d)
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                          return_attention_mask=False).save_pretrained(d)
    return d


SENTENCES = {
    "v_alpha": ["A man runs into the room.", " The woman opens the door, the dog walks on.",
                "person turning the lights off."],
    "v_beta": ["A dog is running.", "the Persons are walking into the room ."],
}
# One wav at 16 kHz, one at 22.05 kHz (resampled), one stereo (mixed down), one FLAC at 8 kHz.
AUDIO = {"alpha_test_1.wav": (16000, 1, 0.50), "alpha_test_2.wav": (22050, 1, 0.40),
         "alpha_test_3.wav": (16000, 2, 0.30), "beta_test_1.flac": (8000, 1, 0.45), "beta_test_2.wav": (16000, 1, 0.2)}


def _annotation(path: Path, audios=None) -> Path:
    """An MMN-format {split}_audio_new.json (ActivityNet layout) whose audios name the files of AUDIO."""
    names = iter(audios or AUDIO)
    annos = {}
    for i, (vid, sents) in enumerate(SENTENCES.items()):
        ts = [[1.0 + 3 * k + i, 6.0 + 4 * k] for k in range(len(sents))]
        annos[vid] = dict(duration=30.0 + i, timestamps=ts, sentences=sents, audios=[next(names) for _ in sents])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(annos, indent=2))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vmr_data")
    ann = _annotation(root / "ann" / "test_audio_new.json")
    wavs = root / "wavs"
    wavs.mkdir()
    rng = np.random.default_rng(0)
    for name, (sr, channels, seconds) in AUDIO.items():
        n = int(sr * seconds)
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
        sf.write(wavs / name, x.astype(np.float32), sr)
    return root, ann, wavs


# ---------------------------------------------------------------------------------------------- the official loops


def official_text(text_path, text_dir, model_dir, dim):
    """text_encode.py L76-115 transcribed call for call (the model names -> the tiny folder, 768 -> its width)."""

    class DistilBert(torch.nn.Module):
        def __init__(self):
            super(DistilBert, self).__init__()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
            self.model = transformers.DistilBertModel.from_pretrained(model_dir)
            self.norm = torch.nn.LayerNorm(dim, eps=1e-05, elementwise_affine=True)
            self.avgpool = torch.nn.AdaptiveAvgPool1d(output_size=1)

        def forward(self, data):
            inputs = self.tokenizer(data, return_tensors="pt")
            with torch.no_grad():
                x = self.model(**inputs)
                x = x.last_hidden_state
                x = self.norm(x)
                x = self.avgpool(x.transpose(1, 2))
                x = x.transpose(1, 2).squeeze(1)
                return x

    text_model = DistilBert()
    if not os.path.exists(text_dir):
        os.mkdir(text_dir)
    data = json.load(open(text_path, "r", encoding="utf-8"))
    for value in data.values():
        sent = value["sentences"]
        aid_name = value["audios"]
        for s, a in zip(sent, aid_name):
            save_path = os.path.join(text_dir, a.split(".")[0] + ".pt")
            if os.path.exists(save_path):
                continue
            outputs = text_model(s)
            torch.save(outputs, save_path)
    return text_model


def official_audio(audios_path, aid_dir, model_dir, dim):
    """audio_encode.py L8-48 transcribed call for call (the model name -> the tiny folder, 768 -> its width)."""

    class Wav2vec2Model(torch.nn.Module):
        def __init__(self):
            super(Wav2vec2Model, self).__init__()
            self.model = transformers.Wav2Vec2Model.from_pretrained(model_dir)
            self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
            self.norm = torch.nn.LayerNorm(dim, eps=1e-05, elementwise_affine=True)
            self.avgpool = torch.nn.AdaptiveAvgPool1d(output_size=1)

        def forward(self, data, sr):
            inputs = self.processor(data, sampling_rate=sr, return_tensors="pt")
            with torch.no_grad():
                x = self.model(**inputs)
                x = x.last_hidden_state
                x = self.norm(x)
                x = self.avgpool(x.transpose(1, 2))
                x = x.transpose(1, 2).squeeze(0)
                return x

    audio_model = Wav2vec2Model()
    if not os.path.exists(aid_dir):
        os.mkdir(aid_dir)
    file_list = os.listdir(audios_path)
    for file in file_list:
        save_path = os.path.join(aid_dir, file.split(".")[0] + ".pt")
        if os.path.exists(save_path):
            continue
        audio_data, _ = librosa.load(os.path.join(audios_path, file), sr=16000)
        outputs = audio_model(audio_data, sr=16000)
        torch.save(outputs, save_path)
    return audio_model


def _cli(capsys, *argv):
    """Runs the command line in-process: (exit code, the JSON summary or None, stderr)."""
    rc = vmr.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err, lines


def _assert_same_files(ref_dir: Path, out_dir: Path, shape):
    names = sorted(p.name for p in ref_dir.iterdir())
    assert names == sorted(p.name for p in out_dir.iterdir())  # same names, no temporary folder left behind
    for name in names:
        ref = torch.load(ref_dir / name, weights_only=True)
        got = torch.load(out_dir / name, weights_only=True)
        assert tuple(got.shape) == shape and got.dtype == torch.float32 and not got.requires_grad
        assert got.stride() == ref.stride()  # the same view of the same storage is saved
        assert torch.equal(got, ref), name  # bit for bit
        np.testing.assert_array_equal(read_pt_tensor(out_dir / name), ref.numpy())
    return names


# ---------------------------------------------------------------------------------------------- equality


def test_text_equals_the_official_loop(tmp_path, capsys, data, text_model):
    _, ann, _ = data
    ref = official_text(str(ann), str(tmp_path / "ref"), str(text_model), DIM)
    # The test sentences are tokenized into known words (the tokenizer matters), CLS and SEP around them.
    ids = ref.tokenizer(SENTENCES["v_alpha"][1])["input_ids"]
    assert ids[0] == VOCAB.index("[CLS]") and ids[-1] == VOCAB.index("[SEP]") and VOCAB.index("[UNK]") not in ids
    rc, summary, err, lines = _cli(capsys, "text", "--ann", ann, "--out", tmp_path / "out", "--model", text_model)
    assert rc == 0 and len(lines) == 1  # stdout: the JSON summary only
    assert "text: 100%" in err  # the tqdm bar, on stderr
    n = sum(map(len, SENTENCES.values()))
    assert summary["queries"] == summary["written"] == n and summary["skipped_existing"] == 0
    assert summary["shapes"] == [dict(shape=[1, DIM], dtype="float32", count=n)]
    names = _assert_same_files(tmp_path / "ref", tmp_path / "out", (1, DIM))
    assert names == sorted(a.split(".")[0] + ".pt" for a in AUDIO)


def test_audio_equals_the_official_loop(tmp_path, capsys, data, audio_model, audio_model_fe_only):
    _, ann, wavs = data
    official_audio(str(wavs), str(tmp_path / "ref"), str(audio_model), DIM)
    # The official loop: every file of the folder.
    rc, summary, _, _ = _cli(capsys, "audio", "--audio-dir", wavs, "--out", tmp_path / "all", "--model", audio_model,
                             "--no-progress")
    assert rc == 0 and summary["written"] == len(AUDIO) and summary["annotations"] is None
    _assert_same_files(tmp_path / "ref", tmp_path / "all", (1, DIM))
    # The files an annotation names.
    rc, summary, _, _ = _cli(capsys, "audio", "--audio-dir", wavs, "--ann", ann, "--out", tmp_path / "ann",
                             "--model", audio_model, "--no-progress")
    assert rc == 0 and summary["written"] == len(AUDIO)
    _assert_same_files(tmp_path / "ref", tmp_path / "ann", (1, DIM))
    # A folder with a feature extractor and no tokenizer gives the same features (the processor's audio call is the
    # feature extractor's).
    rc, summary, _, _ = _cli(capsys, "audio", "--audio-dir", wavs, "--out", tmp_path / "fe", "--model",
                             audio_model_fe_only, "--no-progress")
    assert rc == 0 and summary["written"] == len(AUDIO)
    _assert_same_files(tmp_path / "ref", tmp_path / "fe", (1, DIM))
    # The loading is the official one: 22.05 kHz resampled to 16 kHz, stereo mixed down.
    x = vmr.load_audio(wavs / "alpha_test_2.wav")
    assert x.dtype == np.float32 and x.shape == (round(0.40 * 16000),)
    assert vmr.load_audio(wavs / "alpha_test_3.wav").shape == (round(0.30 * 16000),)


def test_loader_reads_the_written_features(tmp_path, capsys, data, text_model, audio_model):
    """The written folders are query features for MMNDataset (text and speech), for the annotation that names them."""
    _, ann, wavs = data
    text_out, speech_out, video = tmp_path / "text_distbert_feat", tmp_path / "audio_wav2vec2_feat", tmp_path / "c3d"
    assert _cli(capsys, "text", "--ann", ann, "--out", text_out, "--model", text_model, "--no-progress")[0] == 0
    assert _cli(capsys, "audio", "--audio-dir", wavs, "--ann", ann, "--out", speech_out, "--model", audio_model,
                "--no-progress")[0] == 0
    video.mkdir()
    annos = json.loads(ann.read_text())
    for i, vid in enumerate(annos):
        with h5py.File(video / f"{vid}.h5", "w") as f:
            f.create_dataset("feature", data=np.random.default_rng(i).standard_normal((12, 8)))
    common = ["model.input_size=8", f"model.text_dim={DIM}", "model.num_pre_clips=8", "model.num_clips=4",
              f"data.ann_dir={ann.parent}", f"data.video_feat={video}", f"data.query_feat_dir={text_out}"]
    for cfg, folder in [(load_config("activitynet", overrides=common), text_out),
                        (load_config("activitynet", overrides=common + ["data.query_modality=speech",
                                                                        f"data.speech_feat_dir={speech_out}"]),
                         speech_out)]:
        ds = mmn_format.MMNDataset(None, cfg, "test")  # checks every query file exists
        assert ds.query_dir == folder and ds.video_ids == list(annos)
        for i, vid in enumerate(annos):
            rec = ds.record(i)
            assert sorted(rec.query_ids) == sorted(vmr.query_stem(a) for a in annos[vid]["audios"])
            for row, qid in zip(rec.queries, rec.query_ids):
                np.testing.assert_array_equal(row, torch.load(folder / f"{qid}.pt", weights_only=True)[0].numpy())


# ---------------------------------------------------------------------------------------------- skipping


def test_skips_what_is_written(tmp_path, capsys, data, text_model):
    _, ann, _ = data
    out = tmp_path / "out"
    assert _cli(capsys, "text", "--ann", ann, "--out", out, "--model", text_model, "--no-progress")[0] == 0
    first = {p.name: torch.load(p, weights_only=True) for p in out.iterdir()}
    sentinel = np.full((1, DIM), 7.0, np.float32)
    write_pt_tensor(out / "alpha_test_1.pt", sentinel)  # an existing file is not rewritten ...
    (out / "beta_test_2.pt").unlink()  # ... a missing one is
    # The same annotation twice: its stems repeat (the first occurrence is written, as officially).
    rc, summary, _, _ = _cli(capsys, "text", "--ann", ann, ann, "--out", out, "--model", text_model, "--no-progress")
    n = len(first)
    assert rc == 0 and (summary["queries"], summary["written"], summary["skipped_existing"],
                        summary["duplicates"]) == (2 * n, 1, n - 1, n)
    np.testing.assert_array_equal(read_pt_tensor(out / "alpha_test_1.pt"), sentinel)
    assert torch.equal(torch.load(out / "beta_test_2.pt", weights_only=True), first["beta_test_2.pt"])
    # Nothing to do: no model is loaded (a model path that does not exist is never read).
    rc, summary, _, _ = _cli(capsys, "text", "--ann", ann, "--out", out, "--model", tmp_path / "no-model")
    assert rc == 0 and summary["written"] == 0 and summary["skipped_existing"] == n


# ---------------------------------------------------------------------------------------------- errors


def test_missing_audio_file_is_named(tmp_path, capsys, data, audio_model):
    _, _, wavs = data
    ann = _annotation(tmp_path / "test_audio_new.json", audios=[*list(AUDIO)[:4], "beta_test_9.wav"])
    with pytest.raises(JaxprvrError, match=r"beta_test_9\.wav: expected the audio of .*v_beta.*audios\[1\].*no such "
                                           r"file"):
        vmr.encode_audio(wavs, tmp_path / "out", [ann], model=str(audio_model))
    rc, _, err, _ = _cli(capsys, "audio", "--audio-dir", wavs, "--ann", ann, "--out", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "beta_test_9.wav" in err
    assert not (tmp_path / "out").exists()  # checked before anything is loaded or written


@pytest.mark.parametrize("edit,match", [
    (lambda a: a["v_beta"].pop("sentences"), r"v_beta.*'sentences' list.*keys \['audios', 'duration'"),
    (lambda a: a["v_alpha"]["audios"].pop(), r"v_alpha.*lists of one length.*sentences 3, audios 2"),
    (lambda a: a["v_alpha"]["audios"].__setitem__(0, ".wav"), r"audios\[0\] = a file name"),
    (lambda a: a["v_alpha"]["sentences"].__setitem__(2, None), r"sentences\[2\] = a string"),
], ids=["no-sentences", "lengths", "empty-stem", "not-a-string"])
def test_bad_annotations_are_named(tmp_path, data, edit, match):
    annos = json.loads(data[1].read_text())
    edit(annos)
    ann = tmp_path / "test_audio_new.json"
    ann.write_text(json.dumps(annos))
    with pytest.raises(JaxprvrError, match=match):
        vmr.encode_text([ann], tmp_path / "out", model=str(tmp_path / "never-loaded"))


# librosa falls back to audioread on the undecodable file and warns (as it does for the official script).
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_other_bad_inputs(tmp_path, data, text_model, audio_model):
    _, ann, _ = data
    with pytest.raises(JaxprvrError, match=r"nope\.json: expected an annotation file.*no such file"):
        vmr.encode_text([tmp_path / "nope.json"], tmp_path / "out")
    with pytest.raises(JaxprvrError, match=r"expected a distilbert model.*model_type 'wav2vec2'"):
        vmr.encode_text([ann], tmp_path / "out", model=str(audio_model))
    with pytest.raises(JaxprvrError, match=r"expected a Hugging Face model name or a local folder"):
        vmr.encode_text([ann], tmp_path / "out", model=str(tmp_path / "no-model"))
    long = _annotation(tmp_path / "long.json")
    annos = json.loads(long.read_text())
    annos["v_beta"]["sentences"][0] = " ".join(["the dog"] * 20)  # 42 tokens > 24 positions
    long.write_text(json.dumps(annos))
    with pytest.raises(JaxprvrError, match=r"v_beta.*sentences\[0\]: expected a sentence of at most 24 tokens.*42"):
        vmr.encode_text([long], tmp_path / "out", model=str(text_model))
    short = tmp_path / "short"
    short.mkdir()
    sf.write(short / "tiny.wav", np.zeros(20, np.float32), 16000)  # fewer samples than one frame (25)
    with pytest.raises(JaxprvrError, match=r"tiny\.wav: expected an audio long enough for one wav2vec2 frame \(25 "
                                           r"samples.*found 20 samples"):
        vmr.encode_audio(short, tmp_path / "out2", model=str(audio_model))
    (short / "tiny.wav").write_bytes(b"not audio")
    with pytest.raises(JaxprvrError, match=r"tiny\.wav: expected an audio file librosa can decode"):
        vmr.encode_audio(short, tmp_path / "out3", model=str(audio_model))


def test_missing_extra_is_named(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(JaxprvrError, match=r"transformers not importable.*pip install 'jaxprvr\[vmr-preprocess\]'"):
        vmr.encode_text([data[1]], tmp_path / "out")


def test_import_and_help_without_the_extra(tmp_path, data):
    """The module imports and its command line answers --help (and a one-line error) without torch & co."""
    block = ("import sys\nfor m in ('torch', 'transformers', 'librosa', 'soundfile'): sys.modules[m] = None\n"
             "from jaxprvr.preprocess import vmr\nsys.exit(vmr.main(sys.argv[1:]))\n")
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    run = [sys.executable, "-c", block]
    helped = subprocess.run(run + ["text", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0 and "--ann FILE.json" in helped.stdout
    failed = subprocess.run(run + ["text", "--ann", str(data[1]), "--out", str(tmp_path / "o")], capture_output=True,
                            text=True, env=env, timeout=60)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        "error: jaxprvr.preprocess.vmr: expected the packages of the vmr-preprocess extra (torch, transformers, "
        "librosa, soundfile), found torch not importable (pip install 'jaxprvr[vmr-preprocess]')"]
