"""Loading a tokenizer for training and inference: step0's ChatML tokenizer or the one of an existing Hugging
Face model (its own vocabulary, special tokens and chat template).

Pad rule: a tokenizer without a pad token (Llama-3 style) gets its eos token as the pad token. No token is
added, so the model's embedding matrix and every id stay as they are, and the exported tokenizer then names
that pad token. The pad id may therefore also be a real token inside a sequence (the end-of-turn or
end-of-text token, as it already is in Qwen2.5's tokenizer): nothing here tells padding from content by its
id. Collators build attention masks and labels from row lengths, reward models pool at the last position
of the attention mask (utils.reward), and replies end at the first stop token (utils.generation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from utils.errors import UserError, read_json_file

log = logging.getLogger(__name__)

# The JSON files a tokenizer dir may hold, and the fix when one does not parse (damaged after it was written)
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
REDO_TOKENIZER = ("the file is damaged (an interrupted copy?): copy the tokenizer dir again, or rerun the step that "
                  "wrote it (step0 for its tokenizer/, any step for its final/)")


def prepare_tokenizer(tokenizer, where: str):
    """`tokenizer` ready for batching: a pad token (its eos when it has none) and a fast backend (the chat
    renderer needs character offsets). A UserError names `where` when neither can be had."""
    if not tokenizer.is_fast:
        raise UserError(f"{where}: {type(tokenizer).__name__} is a slow tokenizer; save the model's fast one "
                        "(tokenizer.json): AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{where}: the tokenizer defines neither a pad nor an eos token: set \"pad_token\" "
                            "in its tokenizer_config.json to an existing special token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("%s: no pad token; padding with the eos token %r (id %d), positions come from attention masks",
                 where, tokenizer.eos_token, tokenizer.pad_token_id)
    return tokenizer


def load_tokenizer_dir(path: str | Path, flag: str):
    """The tokenizer saved in `path` (step0's tokenizer/ dir, a step export or any Hugging Face model dir),
    prepared by prepare_tokenizer; a UserError naming `flag` when the dir holds none, or naming the file when
    one of its JSON files does not parse (tokenizers would fail with a bare message that names no file)."""
    # transformers only when a tokenizer is loaded: step0's checks run without it
    from transformers import AutoTokenizer

    if not path or not (Path(path) / "tokenizer_config.json").is_file():
        raise UserError(f"{path or flag}: no tokenizer_config.json: give step0's tokenizer/ dir ({flag}) or a "
                        "model dir saved with its tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:
        for name in TOKENIZER_JSON:  # only on failure: name the damaged file instead of a bare parser message
            if (Path(path) / name).is_file():
                read_json_file(Path(path) / name, REDO_TOKENIZER)
        raise
    return prepare_tokenizer(tokenizer, f"{flag} {path}")
