"""Tiny real models, written to a folder: a transformers config, random weights saved as
safetensors, and a tokenizer trained here with the ``tokenizers`` library.

They run through the real transformers code paths (their text is random, their shapes are real),
so the demo and the tests need no download. ``modelium demo-model DIR`` calls
:func:`write_tiny_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("gpt2", "llama", "bert-cls", "t5")

_CORPUS = """\
Modelium serves many models on few machines. A model folder dropped into a directory is found,
analysed and served when a request asks for it. Requests for a model that is not loaded wait
while it loads. Idle models make room for busy ones, and every decision is written to a log.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump. The five boxing wizards jump quickly.
Once upon a time there was a small model that answered every question with a story.
It told of rivers and mountains, of cities and ships, of numbers one two three four five six
seven eight nine ten, and of the colours red green blue yellow black white.
"""

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(repeat: int = 20) -> list[str]:
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    return lines * repeat


def _train_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _train_wordpiece(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def write_tiny_model(
    folder: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    dtype: str = "float32",
    vocab_size: int = 512,
    context: int = 256,
) -> Path:
    """Write a tiny, loadable model of ``family`` into ``folder`` (created) and return it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tok_config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context}
    if family == "bert-cls":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = _train_wordpiece(vocab_size, specials)
        tok_config |= {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                       "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
        tok = _train_bpe(vocab_size, specials)
        tok_config |= {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        if family == "llama":
            tok_config["chat_template"] = _CHAT_TEMPLATE
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in specials}

    if family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab, n_positions=context, n_embd=hidden, n_layer=layers, n_head=4,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        )
        model = tf.GPT2LMHeadModel(config)
    elif family == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=context, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"], tie_word_embeddings=False,
        )
        model = tf.LlamaForCausalLM(config)
    elif family == "bert-cls":
        config = tf.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=hidden * 2, max_position_embeddings=context, num_labels=2,
            id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
            pad_token_id=ids["[PAD]"],
        )
        model = tf.BertForSequenceClassification(config)
    else:  # t5
        config = tf.T5Config(
            vocab_size=vocab, d_model=hidden, d_kv=16, d_ff=hidden * 2, num_layers=layers,
            num_decoder_layers=layers, num_heads=4, pad_token_id=ids["<pad>"],
            eos_token_id=ids["</s>"], decoder_start_token_id=ids["<pad>"],
        )
        model = tf.T5ForConditionalGeneration(config)

    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in tok_config.items() if k.endswith("_token")}, indent=2)
    )
    return folder
