"""Offline byte-level tokenizers: one token per UTF-8 byte plus a family's special tokens, built with the
`tokenizers` library (no download). A family's file says which specials come before the bytes, which after, and
how a sequence (pair) is framed; `byte_level_tokenizer` builds the fast tokenizer."""

from __future__ import annotations

import functools


def byte_level_tokenizer(
    *,
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    single: str | None = None,
    pair: str | None = None,
    unk_token: str | None = None,
    model_input_names: list[str] | None = None,
    **special_tokens: str,
):
    """A `PreTrainedTokenizerFast` with ids: `before` (0, 1, ...), the 256 bytes, then `after`.

    single/pair: a `tokenizers` TemplateProcessing frame ("$A </s>", "[CLS] $A [SEP] $B:1 [SEP]:1"); None: none.
    special_tokens: the transformers roles (pad_token="<pad>", eos_token=..., ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [*before, *after]
    vocab = {token: i for i, token in enumerate([*before, *byte_characters(), *after])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if single is not None:
        framed = {word.split(":")[0] for word in f"{single} {pair or ''}".split()}  # "[SEP]:1" is [SEP]
        framing = [t for t in specials if t in framed]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in framing]
        )
    extra = {"model_input_names": model_input_names} if model_input_names else {}
    if unk_token is not None:
        extra["unk_token"] = unk_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens, **extra)


@functools.cache
def byte_characters() -> tuple[str, ...]:
    """The 256 characters GPT-2's byte-level alphabet writes the bytes 0..255 as, in byte order."""
    from tokenizers import pre_tokenizers

    return tuple(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of))


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
