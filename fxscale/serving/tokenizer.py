"""Small byte-level BPE tokenizers trained here, in milliseconds, with the `tokenizers` library:
what `fxscale serve llama` (a zoo model with random weights) talks through, and what tests
save beside a model directory. Ids 0, 1, 2 are <unk>, <s>, </s> (the zoo models' pad, bos,
eos); the chat template is ChatML-like and renders in transformers' sandboxed Jinja."""
from __future__ import annotations

import string

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n"
                 "{{ message['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ("<unk>", "<s>", "</s>")
# What the built-in tokenizer learns its merges from: every printable ASCII character (so
# any ASCII text encodes without <unk>) and some English.
BUILTIN_TEXT = (string.printable,
                "The quick brown fox jumps over the lazy dog. Operator groups scale alone: "
                "attention holds the KV cache, the projections and the MLP are row-wise. "
                "How many GPUs does this model need, and what is the time to first token? "
                "Hello, world! The answer is in the table below, with the plot beside it.")


def train_tokenizer(texts: list[str] | tuple[str, ...], vocab_size: int):
    """A transformers fast tokenizer: byte-level BPE with `vocab_size` tokens learnt from
    `texts` (a <s> before every prompt), with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=list(SPECIALS),
                                                       show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)


def builtin_tokenizer(vocab_size: int = 256):
    """The tokenizer `fxscale serve` gives a zoo model (their vocabularies are 256)."""
    return train_tokenizer(BUILTIN_TEXT, vocab_size)
