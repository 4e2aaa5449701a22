"""A few-kB T5 encoder and word-level tokenizer, saved the way `save_pretrained` saves Flan-T5, built offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

PAD_ID = 0
EOS_ID = 1
WORDS = ("a", "dog", "barks", "near", "the", "road", "birds", "sing", "in", "park", "rain", "falls")
VOCAB = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": 2} | {word: index + 3 for index, word in enumerate(WORDS)}
D_MODEL = 32


def build_tiny_t5(directory: Path, model_max_length: int, seed: int = 0) -> Path:
    """Write config, random weights and a tokenizer that, like T5's, appends </s> and pads with id 0."""
    word_level = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    config = T5Config(
        vocab_size=len(VOCAB),
        d_model=D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def token_ids(text: str) -> list[int]:
    """What T5 tokenisation gives for `text` in this vocabulary: one id per word, then </s>."""
    return [VOCAB[word] for word in text.split()] + [EOS_ID]
