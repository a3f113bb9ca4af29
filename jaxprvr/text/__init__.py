"""Text tokenizers: OpenAI CLIP's byte-level BPE (:mod:`jaxprvr.text.clip_bpe`).

ftfy and regex are imported when a tokenizer is first built, not when this package is imported.
"""

from jaxprvr.text.clip_bpe import EOT_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer, clip_sequences, load_tokenizer

__all__ = ["ClipTokenizer", "clip_sequences", "load_tokenizer", "SOT_ID", "EOT_ID", "VOCAB_SIZE"]
