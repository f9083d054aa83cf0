"""Tiny causal LMs (Llama, Qwen2, GPT-2) and a deterministic tokenizer for them, offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tiny import WORDS

#: Words of the LLM-Adapters prompt and the commonsense answers, so prompts stay short.
PROMPT_WORDS = (
    "below instruction describes task write response appropriately completes request paired "
    "input provides further context ### please choose correct answer question solution "
    "format true false option fill blank complete given sentence ending answer1 answer2 "
    "answer3 answer4 answer5 solution1 solution2 option1 option2 ending1 ending2 ending3 "
    "ending4 user assistant : / ? . , _"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_causal_tokenizer():
    """A word-level tokenizer (whitespace and punctuation split) with BOS, EOS and PAD."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab_list = ["<pad>", "<unk>", "<s>", "</s>", *WORDS, *PROMPT_WORDS, *chars]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def causal_config(arch: str, vocab_size: int):
    """A 2-layer, hidden-32 config of ``arch`` (llama, qwen2, gpt2)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                          n_positions=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    raise ValueError(arch)


def build_causal_checkpoint(arch: str, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Save a seeded random causal LM plus tokenizer, like a hub checkpoint; ``dtype`` saves it
    in that dtype (as LLaMA-3-8B, Qwen2 and SmolLM2 are saved in bf16)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_causal_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(causal_config(arch, len(tokenizer)))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _question(rng: random.Random, task: str) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
    if task == "boolq":
        answer = rng.choice(["true", "false"])
        head = "good" if answer == "true" else "bad"
        text = (f"please answer the following question with true or false , question : {head} "
                f"{words} ?\n\nAnswer format : true / false")
    elif task == "hellaswag":
        k = rng.randint(1, 4)
        answer = f"ending{k}"
        endings = " ".join(f"ending{i} : {rng.choice(WORDS)}" for i in range(1, 5))
        text = (f"please choose the correct ending to complete the given sentence : {words} "
                f"{'good ' * k}\n\n{endings}\n\nAnswer format: ending1/ending2/ending3/ending4")
    else:  # ARC-like, answer1..answer3
        k = rng.randint(1, 3)
        answer = f"answer{k}"
        options = " ".join(f"answer{i} : {rng.choice(WORDS)}" for i in range(1, 4))
        text = (f"please choose the correct answer to the question : {words} {'good ' * k}"
                f"\n\n{options}\n\nAnswer format: answer1/answer2/answer3")
    return {"instruction": text, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def write_commonsense(root: Path, tasks: dict[str, tuple[int, int]]) -> Path:
    """LLM-Adapters-layout files ``<task>/{train,test}.json`` (sizes ``(train, test)``)."""
    for task, (n_train, n_test) in tasks.items():
        rng = random.Random(task)
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        kind = "boolq" if task == "boolq" else "hellaswag" if task == "hellaswag" else "arc"
        for split, n in (("train", n_train), ("test", n_test)):
            if n:
                records = [_question(rng, kind) for _ in range(n)]
                (folder / f"{split}.json").write_text(json.dumps(records, indent=1))
    return root
