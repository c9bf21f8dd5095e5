"""SentencePiece BPE training and its exact Hugging Face fast-tokenizer twin.

The SentencePiece model is trained with identity normalisation, no dummy prefix and whitespace kept as is,
so encoding never changes the text: decode(encode(x)) == x for any string, and byte_fallback turns any
character outside the vocabulary into its UTF-8 bytes (no <unk>). Digits are split one per token.

The fast tokenizer is built from the model proto itself (vocab = pieces in id order, BPE merges ranked by
the id of the merged piece, which is SentencePiece BPE's own merge order), with a pre-tokenizer that
reproduces SentencePiece's splitting (whitespace becomes a "▁" prefix of the next word; every digit alone).
Its normalizer is utils.text's character normalisation, the rule data_process applied to the training text:
what a user types ("好!", "１９９８", a full-width ，) reaches the model in the form it was trained on, so
decode(encode(x)) == x holds for normalised text (everything step 0 and later steps train on).
`LlamaTokenizer(vocab_file=...)` is not used: in transformers 5 it silently builds a 3-token vocab.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import sentencepiece_model_pb2_new as sp_pb2

from utils.errors import UserError
from utils.text import CJK_PUNCTUATION, text_normalizer

log = logging.getLogger(__name__)

UNK = "<unk>"
EOT = "<|endoftext|>"  # document separator, tokenizer.eos_token
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turn delimiters
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, PAD)  # ids 1-4 (0 is <unk>)
NUM_BYTE_PIECES = 256
SPACE = "▁"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def min_vocab_size() -> int:
    """The smallest workable vocab: <unk>, the special tokens, 256 byte pieces and some merges."""
    return 1 + len(SPECIAL_TOKENS) + NUM_BYTE_PIECES + 64


def within_budget(lines: Iterable[str], char_counts: Counter[str], max_chars: int,
                  required: str = "") -> Iterator[str]:
    """The training lines cut into fragments at characters outside the `max_chars` most frequent ones
    (`required` characters are always kept).

    SentencePiece needs one piece per character it covers and covers at least 98% of the text, which a
    small vocab cannot hold for Chinese; rare characters are left to byte fallback instead."""
    if len(char_counts) <= max_chars:
        yield from lines
        return
    keep = {c for c in required if c in char_counts}  # the required first, then the most frequent
    for c, _ in char_counts.most_common():
        if len(keep) >= max_chars:
            break
        keep.add(c)
    rare = "".join(sorted(c for c in char_counts if c not in keep))
    splitter = re.compile(f"[{re.escape(rare)}]+")
    for line in lines:
        yield from (part for part in splitter.split(line) if part)


def train_sentencepiece(lines: Iterable[str], char_counts: Counter[str], model_prefix: Path, vocab_size: int,
                        character_coverage: float, num_threads: int, seed: int, max_piece_length: int = 16) -> Path:
    """Train the BPE model on `lines` (one sentence each); return the .model path.

    `max_piece_length` 1 makes a character-level vocabulary: no merges, so every covered character is one
    token and a word-segmented copy of a sentence reuses exactly the sentence's tokens."""
    reserved = min_vocab_size() - 64  # <unk>, the special tokens and the byte pieces
    # without merges every remaining id can be a character; otherwise keep at least half for merges
    char_budget = vocab_size - reserved if max_piece_length == 1 else (vocab_size - reserved) // 2
    log.info("training SentencePiece BPE: vocab %d, %d distinct characters (at most %d get a piece)",
             vocab_size, len(char_counts), char_budget)
    required = "".join(c for c in CJK_PUNCTUATION if c in char_counts)  # what users type gets a piece
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=within_budget(lines, char_counts, char_budget, required), required_chars=required,
            model_prefix=str(model_prefix),
            model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_by_unicode_script=False,
            user_defined_symbols=list(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            unk_piece=UNK, max_sentence_length=1 << 16, num_threads=num_threads, minloglevel=2,
            max_sentencepiece_length=max_piece_length, hard_vocab_limit=max_piece_length > 1,
        )
    except RuntimeError as err:
        raise UserError(f"--vocab_size={vocab_size}: SentencePiece could not train ({err}); the pretraining "
                        "text is too small for this vocab: lower --vocab_size or add text") from None
    return Path(f"{model_prefix}.model")


def fast_tokenizer_from_sp(model_file: Path) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast whose ids equal the SentencePiece model's, with ChatML as chat template."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    normal = sp_pb2.ModelProto.SentencePiece.NORMAL
    mergeable = [(p.piece, i) for i, p in enumerate(proto.pieces) if p.type == normal and len(p.piece) > 1]
    merges = []
    for piece, _ in mergeable:  # already in id order = merge order
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.normalizer = text_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace(SPACE, " ")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False,
        model_max_length=1 << 30,
    )
