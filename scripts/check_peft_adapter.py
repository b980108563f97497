#!/usr/bin/env python3
"""Check an `evomerge finetune` adapter against PEFT (reference only; no build or test runs it).

    python scripts/check_peft_adapter.py BASE ADAPTER [MERGED]

Loads BASE with transformers, the adapter with `peft.PeftModel.from_pretrained`, and prints the
largest logits difference of

  * PEFT's model (base + adapter, unmerged) against the adapter folded into the base by
    `merge_and_unload()`, and against the plain base (how much the adapter changes);
  * with MERGED (a model directory written by evomerge, e.g. `evomerge merge` of a linear recipe
    with the one input `BASE+ADAPTER`, weight 1): MERGED against PEFT's merged model, logits and
    the largest weight difference.

Needs torch, transformers and peft (`pip install peft`).
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Question: what is 12 + 7? Answer:",
    "Once upon a time, in a small village,",
]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def masked_max(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    base_dir, adapter_dir = sys.argv[1], sys.argv[2]
    merged_dir = sys.argv[3] if len(sys.argv) == 4 else None
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].float()

    base_logits = logits(load(base_dir), batch)
    peft = PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    peft_logits = logits(peft, batch)
    folded = peft.merge_and_unload()
    folded_logits = logits(folded, batch)
    print(f"adapter: {adapter_dir}")
    print(f"max |logits(PEFT) - logits(merge_and_unload)| = {masked_max(peft_logits, folded_logits, mask):.3e}")
    print(f"max |logits(PEFT) - logits(base)|             = {masked_max(peft_logits, base_logits, mask):.3e}")

    if merged_dir:
        merged = load(merged_dir)
        merged_logits = logits(merged, batch)
        print(f"merged: {merged_dir}")
        print(f"max |logits(evomerge merged) - logits(merge_and_unload)| = {masked_max(merged_logits, folded_logits, mask):.3e}")
        print(f"max |logits(evomerge merged) - logits(PEFT)|             = {masked_max(merged_logits, peft_logits, mask):.3e}")
        ref = folded.state_dict()
        worst, name = 0.0, None
        for k, v in merged.state_dict().items():
            if k in ref:
                d = (v.float() - ref[k].float()).abs().max().item()
                if d > worst:
                    worst, name = d, k
        print(f"max |W(evomerge merged) - W(merge_and_unload)| = {worst:.3e} ({name})")


if __name__ == "__main__":
    main()
