"""Part-of-speech weights and word tokenisation for MESM's text side (lntzm/MESM @ 8501bdea).

The official tokenizers tag every query with NLTK while the dataset is built (``dataset/tokenizer.py``):

* CLIP (``CLIPTokenizer.encode``, L127-144): ``nltk.pos_tag`` on the **BPE pieces** of the query, each with its
  ``</w>`` removed (not on words).
* GloVe (``NLTKTokenizer.encode``, L322-332; ``NLTKTokenizerWithFeature.encode``, L340-353):
  ``nltk.pos_tag(nltk.tokenize.word_tokenize(sentence))`` on the case-preserved tokens; the tokens are lowercased
  only afterwards.
* The weight (L140-144, L329-332, L349-352) is 2 when the tag **contains** ``NN``, ``VB``, ``JJ`` or ``RB`` (a
  substring test, so ``WRB`` -- when/where/how/why -- also gets 2, and so do ``NNP``, ``VBZ``, ``RBR``, ...), else 1.

The weights are read only by FW-MESM's masked-word sampling during training (``model.py L307-315, L361-384``);
they never change evaluation outputs. NLTK's ``word_tokenize`` however decides the GloVe **token sequence**:
it is a Punkt sentence split followed by NLTK's Treebank word tokenizer, whose regex splits only a sentence-
*final* period, so a query with an internal sentence end ("person opens door. then walks in.") tokenises
differently without Punkt.

Taggers (``pos_tagger``):

* ``"nltk"``: NLTK's averaged-perceptron model, called as the official code calls it (``nltk.pos_tag``); or an
  injected tagger object with NLTK's ``tag(tokens) -> [(token, tag)]`` method (what ``nltk.pos_tag`` itself calls,
  ``nltk/tag/__init__.py _pos_tag``), e.g. a ``PerceptronTagger`` loaded from another copy of the model
  (:func:`perceptron_tagger_from_pickle` reads a ``(weights, tagdict, classes)`` pickle safely).
* ``"rule"``: a deterministic closed-class rule tagger (:func:`rule_tags`), a **documented deviation** for
  training without NLTK data: function words get their Penn tag (DT, IN, CC, PRP, TO, MD, WDT/WP, EX, POS,
  CD, ...) and weight 1, when/where/how/why get WRB (weight 2 by the substring rule), "not"/"n't"/"'t" get RB,
  numbers CD (1), punctuation ``.`` (1), and every other token NN (2).
* ``"none"``: no tagger; every weight is 1. Exact for evaluation only (weights are unused there).

Sentence split for GloVe (``sentence_split``): ``"punkt"`` (NLTK's ``word_tokenize``, needs the Punkt data, or an
injected sentence tokenizer with ``tokenize(text) -> [sentences]``), ``"identity"`` (the whole query is one
sentence: ``word_tokenize(text, preserve_line=True)``; refused for a query with an internal sentence end, see
:func:`has_internal_sentence_end`), ``"auto"`` (Punkt when its data is installed, else identity).

A missing NLTK resource raises one :class:`~jaxprvr.errors.JaxprvrError` naming the resource and the download
command for nltk 3.8 (``averaged_perceptron_tagger``, ``punkt``) and nltk >= 3.9
(``averaged_perceptron_tagger_eng``, ``punkt_tab``).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from jaxprvr.errors import JaxprvrError

POS_TAGGERS = ("nltk", "rule", "none")
SENTENCE_SPLITS = ("auto", "punkt", "identity")
WEIGHT_TAG_PARTS = ("NN", "VB", "JJ", "RB")

_WHERE = "jaxprvr.text.pos"

# nltk release -> (tagger resource, punkt resource)
_RESOURCES = {
    "tagger": ("averaged_perceptron_tagger", "averaged_perceptron_tagger_eng"),
    "punkt": ("punkt", "punkt_tab"),
}


def pos_weight(tag: str) -> int:
    """The official weight of a POS tag: 2 if it contains NN, VB, JJ or RB (substring test), else 1."""
    return 2 if any(part in tag for part in WEIGHT_TAG_PARTS) else 1


# ----------------------------------------------------------------------------------------------------- nltk access

def require_nltk():
    """The ``nltk`` module, or a JaxprvrError with the install command."""
    try:
        import nltk
    except ImportError:
        raise JaxprvrError(_WHERE, "the 'nltk' package (pip install nltk)", "it is not installed",
                           "needed for MESM's NLTK word tokenizer and POS tagger; pos_tagger='rule' or 'none' "
                           "avoids the tagger, not the tokenizer of the GloVe path") from None
    return nltk


def _nltk_version(nltk) -> tuple[int, ...]:
    out = []
    for part in str(getattr(nltk, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def nltk_resource_error(kind: str, nltk=None, detail: str | None = None) -> JaxprvrError:
    """One error for a missing NLTK resource (``kind`` = "tagger" | "punkt"), naming the resource of the
    installed nltk release and the download command of both releases."""
    old, new = _RESOURCES[kind]
    version = "unknown"
    name = f"{new} (nltk >= 3.9) / {old} (nltk 3.8)"
    if nltk is not None:
        version = str(getattr(nltk, "__version__", "unknown"))
        name = new if _nltk_version(nltk) >= (3, 9) else old
    what = "the NLTK POS tagger model" if kind == "tagger" else "the NLTK Punkt sentence tokenizer model"
    alt = ("or pos_tagger='rule' (training; a documented deviation) / 'none' (evaluation only)" if kind == "tagger"
           else "or sentence_split='identity' (allowed only when no query has an internal sentence end)")
    found = f"it is not installed (nltk {version})" + (f": {detail}" if detail else "")
    return JaxprvrError(
        "nltk data", f"{what} '{name}'", found,
        f"python -m nltk.downloader {new}   (nltk >= 3.9)   |   python -m nltk.downloader {old}   (nltk 3.8); {alt}")


# ----------------------------------------------------------------------------------------------------- rule tagger

_CLOSED_CLASS: dict[str, str] = {}
for _tag, _words in {
    "DT": "a an the this that these those each every some any no another either neither both all",
    "IN": ("about above across after against along alongside amid among amongst around as at atop before behind "
           "below beneath beside besides between beyond by despite during except for from in inside into like "
           "near of off on onto opposite outside over past per since than through throughout till toward towards "
           "under underneath unlike until upon via with within without while because if whether though although "
           "unless whereas"),
    "RP": "up down out",
    "CC": "and or but nor plus",
    "PRP": ("i you he she it we they me him us them myself yourself himself herself itself ourselves yourselves "
            "themselves"),
    "PRP$": "my your his her its our their",
    "TO": "to",
    "MD": "can could may might must shall should will would 'll 'd",
    "WDT": "which whichever",
    "WP": "who whom what whoever whatever",
    "WP$": "whose",
    "WRB": "when where how why whenever wherever",
    "EX": "there",
    "POS": "'s '",
    "RB": "not n't 't",
    "CD": ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty thirty forty fifty hundred thousand million"),
    "UH": "oh yes hello",
}.items():
    for _w in _words.split():
        _CLOSED_CLASS[_w] = _tag

_NUMBER = re.compile(r"^[+-]?\d[\d,.:/]*$")
_HAS_ALNUM = re.compile(r"\w")


def rule_tag(token: str) -> str:
    """The rule tagger's tag for one token (case-insensitive closed-class lookup, CD for numbers, ``.`` for
    punctuation, NN otherwise)."""
    t = token.lower()
    tag = _CLOSED_CLASS.get(t)
    if tag is not None:
        return tag
    if _NUMBER.match(t):
        return "CD"
    if not _HAS_ALNUM.search(t):
        return "."
    return "NN"


def rule_tags(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``[(token, tag)]`` from :func:`rule_tag`, in NLTK's output format."""
    return [(t, rule_tag(t)) for t in tokens]


# --------------------------------------------------------------------------------------------------------- tagger

class PosTagger:
    """POS tags and MESM weights of a token list, for ``mode`` in :data:`POS_TAGGERS`.

    ``nltk_tagger``: an object with NLTK's ``tag(tokens)`` method used instead of NLTK's installed model
    (``mode="nltk"`` only). Without it the installed model is checked once at construction (one JaxprvrError
    when missing) and every call goes through ``nltk.pos_tag``, as the official code does.
    """

    def __init__(self, mode: str = "nltk", nltk_tagger=None):
        if mode not in POS_TAGGERS:
            raise JaxprvrError(f"{_WHERE}.pos_tagger", f"one of {POS_TAGGERS}", repr(mode))
        if nltk_tagger is not None and mode != "nltk":
            raise JaxprvrError(f"{_WHERE}.nltk_tagger", "no injected tagger unless pos_tagger='nltk'", repr(mode))
        if nltk_tagger is not None and not callable(getattr(nltk_tagger, "tag", None)):
            raise JaxprvrError(f"{_WHERE}.nltk_tagger", "an object with NLTK's tag(tokens) method",
                               type(nltk_tagger).__name__)
        self.mode = mode
        self._tagger = nltk_tagger
        self._nltk = None
        if mode == "nltk" and nltk_tagger is None:
            nltk = require_nltk()
            try:
                nltk.pos_tag(["check"])
            except LookupError as e:
                raise nltk_resource_error("tagger", nltk) from e
            self._nltk = nltk

    @property
    def official(self) -> bool:
        """True when the tags come from NLTK's installed model through ``nltk.pos_tag`` (the official call)."""
        return self._nltk is not None

    def tags(self, tokens: Sequence[str]) -> list[str]:
        """One tag per token."""
        tokens = list(tokens)
        if self.mode == "none":
            return ["" for _ in tokens]
        if self.mode == "rule":
            return [tag for _, tag in rule_tags(tokens)]
        if self._tagger is not None:
            tagged = self._tagger.tag(tokens)
        else:
            try:
                tagged = self._nltk.pos_tag(tokens)
            except LookupError as e:  # the data went away after the check
                raise nltk_resource_error("tagger", self._nltk) from e
        if len(tagged) != len(tokens):
            raise JaxprvrError(f"{_WHERE}.nltk_tagger", f"{len(tokens)} (token, tag) pairs", f"{len(tagged)}")
        return [tag for _, tag in tagged]

    def weights(self, tokens: Sequence[str]) -> list[int]:
        """The official 2/1 weights (all 1 for ``mode="none"``)."""
        if self.mode == "none":
            return [1] * len(tokens)
        return [pos_weight(tag) for tag in self.tags(tokens)]


def perceptron_tagger_from_pickle(path, encoding: str = "utf-8"):
    """An NLTK ``PerceptronTagger`` holding the ``(weights, tagdict, classes)`` triple of an averaged-perceptron
    pickle (the layout nltk 3.8's ``PerceptronTagger.load`` reads, e.g. Honnibal's ``trontagger-0.1.0.pickle``),
    read with the restricted unpickler of :mod:`jaxprvr.text.glove`; inject it as ``nltk_tagger``.
    ``encoding`` decodes Python 2 ``str`` objects. Whether such a model equals NLTK's own data is not verified."""
    from pathlib import Path

    from jaxprvr.text.glove import restricted_load

    nltk = require_nltk()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxprvrError(path, "an averaged-perceptron tagger pickle", f"an unreadable file ({e.strerror})") from None
    obj = restricted_load(data, str(path), encoding=encoding)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3 and isinstance(obj[0], dict)
            and isinstance(obj[1], dict) and isinstance(obj[2], (set, frozenset, list, tuple))):
        raise JaxprvrError(path, "a (weights dict, tagdict dict, classes set) triple", type(obj).__name__)
    tagger = nltk.tag.PerceptronTagger(load=False)
    tagger.model.weights, tagger.tagdict, tagger.classes = obj[0], obj[1], set(obj[2])
    tagger.model.classes = tagger.classes
    return tagger


# --------------------------------------------------------------------------------------------- sentence split

# A Punkt break candidate is a sentence-end character followed by non-word punctuation or by whitespace and a
# token (nltk/tokenize/punkt.py ``_period_context_fmt``). We flag a query when such a character is followed by
# anything other than closing quotes/brackets and trailing whitespace: a superset of the breaks Punkt can make
# inside a query (abbreviations such as "e.g. x" are flagged too), so the identity split is refused whenever it
# could differ from NLTK's word_tokenize.
_CANDIDATE = re.compile(r"""[.?!](?=[)";}\]*:@'({\[!?\u2018\u2019\u201c\u201d\xab\xbb]|\s+\S)""")
_HARMLESS_TAIL = re.compile(r"""^["')\]}]*\s*$""")


def has_internal_sentence_end(text: str) -> bool:
    """True when ``text`` has a possible sentence end (``.``, ``?``, ``!``) with more text after it.

    Conservative: every break NLTK's Punkt could make inside the query is flagged, plus abbreviation-like
    periods Punkt would keep ("e.g. a cup"). A period inside a number ("3.5 m") or at the very end is not.
    """
    for m in _CANDIDATE.finditer(text):
        if not _HARMLESS_TAIL.match(text[m.end():]):
            return True
    return False


class WordTokenizer:
    """NLTK's ``word_tokenize`` (Punkt sentence split + NLTK's Treebank word tokenizer), case preserved.

    ``sentence_split``: "punkt" | "identity" | "auto" (module docstring). ``sent_tokenizer``: an object with
    ``tokenize(text) -> [sentences]`` (e.g. a ``PunktSentenceTokenizer`` built from Punkt parameters) used instead
    of NLTK's installed English Punkt model; implies "punkt".
    """

    def __init__(self, sentence_split: str = "auto", sent_tokenizer=None):
        if sentence_split not in SENTENCE_SPLITS:
            raise JaxprvrError(f"{_WHERE}.sentence_split", f"one of {SENTENCE_SPLITS}", repr(sentence_split))
        if sent_tokenizer is not None and not callable(getattr(sent_tokenizer, "tokenize", None)):
            raise JaxprvrError(f"{_WHERE}.sent_tokenizer", "an object with a tokenize(text) method",
                               type(sent_tokenizer).__name__)
        if sent_tokenizer is not None and sentence_split == "identity":
            raise JaxprvrError(f"{_WHERE}.sent_tokenizer", "no sentence tokenizer with sentence_split='identity'",
                               "one was given")
        nltk = require_nltk()
        from nltk.tokenize import NLTKWordTokenizer

        self._nltk = nltk
        self._words = NLTKWordTokenizer()  # the class of nltk.tokenize._treebank_word_tokenizer
        self._sent = sent_tokenizer
        if sent_tokenizer is not None:
            self.split = "punkt"
        elif sentence_split == "identity":
            self.split = "identity"
        else:
            available = self._punkt_available()
            if sentence_split == "punkt" and not available:
                raise nltk_resource_error("punkt", nltk)
            self.split = "punkt" if available else "identity"

    def _punkt_available(self) -> bool:
        try:
            self._nltk.tokenize.sent_tokenize("A check. Another one.")
        except LookupError:
            return False
        return True

    @property
    def official(self) -> bool:
        """True when ``tokenize`` is NLTK's own ``word_tokenize`` with its installed Punkt model."""
        return self.split == "punkt" and self._sent is None

    def tokenize(self, text: str, where: str = "query") -> list[str]:
        """The case-preserved tokens of ``text``; with the identity split, a JaxprvrError naming the query when
        it has an internal sentence end."""
        if self.split == "identity":
            if has_internal_sentence_end(text):
                raise JaxprvrError(where, "a query without an internal sentence end (identity sentence split; "
                                   "NLTK's Punkt model is not used)", repr(text),
                                   "install Punkt: python -m nltk.downloader punkt_tab (nltk >= 3.9) or punkt "
                                   "(nltk 3.8)")
            return self._nltk.tokenize.word_tokenize(text, preserve_line=True)
        if self._sent is None:
            try:
                return self._nltk.tokenize.word_tokenize(text)
            except LookupError as e:
                raise nltk_resource_error("punkt", self._nltk) from e
        return [tok for sent in self._sent.tokenize(text) for tok in self._words.tokenize(sent)]


def count_internal_sentence_ends(texts: Iterable[str]) -> tuple[int, list[int]]:
    """``(count, indices)`` of the texts with an internal sentence end (:func:`has_internal_sentence_end`)."""
    idx = [i for i, t in enumerate(texts) if has_internal_sentence_end(t)]
    return len(idx), idx


__all__ = ["POS_TAGGERS", "SENTENCE_SPLITS", "pos_weight", "rule_tag", "rule_tags", "PosTagger", "WordTokenizer",
           "has_internal_sentence_end", "count_internal_sentence_ends", "nltk_resource_error", "require_nltk",
           "perceptron_tagger_from_pickle"]
