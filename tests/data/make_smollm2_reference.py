#!/usr/bin/env python3
"""Reference figures for `tests/real_smollm2.rs`: SmolLM2-135M-Instruct (the Q4_1 GGUF that
`scripts/fetch-smollm2.sh` downloads) run by Hugging Face transformers in float32.

Writes tests/data/smollm2_reference.json with
  - the transformers tokenizer's ids of a fixed text and its mean next-token NLL (nats; the first
    token is not predicted, no BOS is added, as the GGUF says `add_bos_token = false`);
  - for 20 fixed prompts: the tokenizer's ids, and the greedy continuation (24 new tokens,
    do_sample=False, stopping at EOS) from the prompt alone (`greedy`) and from BOS + prompt
    (`greedy_bos`, the convention of evomerge's LM evaluator, which prepends config.json's
    bos_token_id).

Needs torch, transformers, gguf, numpy (a venv outside the repository):
    python tests/data/make_smollm2_reference.py [--gguf target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

import argparse
import json
import math
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_GGUF = os.path.join(ROOT, "target", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MAX_NEW_TOKENS = 24

TEXT = (
    "The river valley was quiet in the early morning. Mist rose from the water and drifted "
    "between the old stone bridges, while the first boats of the day pushed slowly upstream. "
    "Farmers had been working the terraced fields on both banks for more than three hundred "
    "years, growing grapes, barley and a few rows of apple trees. In 1887 a railway line reached "
    "the valley, and within a decade the small market town at its centre had doubled in size. "
    "Today most visitors come for the walking trails, which follow the ridges above the river "
    "for about 42 kilometres. The local museum explains how the water mills worked, how the "
    "bridges were rebuilt after the great flood, and why the church bell is rung twice at noon. "
    "If you ask the people who live there what they like most, many of them will simply say "
    "that nothing much ever happens, and that this is exactly the point."
)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is 12 + 35?\nAnswer:",
    "The three primary colors are",
    "Water boils at 100 degrees Celsius, which is",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
    "Here is a list of fruits:\n1. Apple\n2.",
    "Translate to French: \"Good morning\" ->",
    "The quick brown fox",
    "import numpy as np\n\nx = np.",
    "In mathematics, a prime number is",
    "Dear Sir or Madam,\n\nI am writing to",
    "The café on the corner serves crème brûlée and",
    "SELECT name, age FROM users WHERE",
    "Photosynthesis is the process by which",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a mammal that can fly.<|im_end|>\n<|im_start|>assistant\n",
    "Tips for better sleep:\n-",
    "The year 2024 was",
    "HTML stands for",
]


def greedy(model, ids):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=model.generation_config.eos_token_id,
    )
    return out[0, len(ids):].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=DEFAULT_GGUF)
    parser.add_argument("--out", default=os.path.join(HERE, "smollm2_reference.json"))
    args = parser.parse_args()
    if not os.path.isfile(args.gguf):
        sys.exit(f"{args.gguf}: not found (run scripts/fetch-smollm2.sh first)")
    directory, name = os.path.split(os.path.abspath(args.gguf))

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    bos = model.config.bos_token_id

    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(text_ids[1:])
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    mean_nll = nll.mean().item()

    prompts = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            prompts.append(
                {
                    "prompt": p,
                    "ids": ids,
                    "greedy": greedy(model, ids),
                    "greedy_bos": greedy(model, [bos] + ids),
                }
            )

    reference = {
        "source": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": model.config.eos_token_id,
        "max_new_tokens": MAX_NEW_TOKENS,
        "text": TEXT,
        "text_ids": text_ids,
        "text_mean_nll": mean_nll,
        "text_perplexity": math.exp(mean_nll),
        "prompts": prompts,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(text_ids)} text tokens, mean NLL {mean_nll:.6f}; wrote {args.out}")


if __name__ == "__main__":
    main()
