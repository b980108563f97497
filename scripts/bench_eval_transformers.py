"""The transformers side of examples/bench_eval.rs: the same work, done the usual way.

Usage: python bench_eval_transformers.py WORK.json MODEL_DIR

WORK.json (written by the Rust bench): threads, texts, mc (context + choices), prompts, lengths.
Prints one JSON line: seconds per phase, peak RSS, and the values (perplexity, mc accuracy, the
first prompt's continuation per length) so the two sides can be checked to do the same work.
Float32 weights, torch.set_num_threads(threads), batches of 32 (generation: all 16 prompts in one
left-padded batch), full-vocabulary logits, model.generate with no EOS id (every row generates
exactly max_new_tokens, as on the Rust side).
"""

import json
import resource
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    work = json.load(open(sys.argv[1]))
    model_dir = sys.argv[2]
    torch.set_num_threads(work["threads"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    out = {"versions": f"{transformers.__version__} / torch {torch.__version__}"}

    # perplexity: 64 texts, batches of 32, right padding with an attention mask
    t = time.perf_counter()
    nll, count, lens = 0.0, 0, []
    with torch.inference_mode():
        for i in range(0, len(work["texts"]), 32):
            enc = tok(work["texts"][i : i + 32], return_tensors="pt", padding=True)
            logits = model(**enc).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt = enc.input_ids[:, 1:]
            m = enc.attention_mask[:, 1:].bool()
            picked = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            nll -= picked[m].sum().item()
            count += m.sum().item()
            lens += enc.attention_mask.sum(1).tolist()
    out["perplexity_s"] = time.perf_counter() - t
    out["perplexity"] = float(torch.exp(torch.tensor(nll / count)))
    out["text_tokens"] = sorted(set(lens))

    # multiple choice: log p(choice | context), lm-eval style (context + continuation tokens)
    t = time.perf_counter()
    reqs = []
    for item in work["mc"]:
        ctx = tok(item["context"]).input_ids
        for c in item["choices"]:
            reqs.append((ctx, tok(c, add_special_tokens=False).input_ids))
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]) - len(reqs[i][1]))
    scores = [0.0] * len(reqs)
    with torch.inference_mode():
        for i in range(0, len(order), 32):
            batch = order[i : i + 32]
            seqs = [reqs[j][0] + reqs[j][1] for j in batch]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for r, j in enumerate(batch):
                ctx, cont = reqs[j]
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                scores[j] = logp[r, pos, torch.tensor(cont)].sum().item()
    out["mc_s"] = time.perf_counter() - t
    correct = 0
    for k in range(len(work["mc"])):
        s = scores[4 * k : 4 * k + 4]
        correct += int(max(range(4), key=lambda c: (s[c], -c)) == 0)
    out["mc_accuracy"] = correct / len(work["mc"])

    # greedy generation: 16 prompts in one left-padded batch
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(work["prompts"], return_tensors="pt", padding=True)
    # no EOS: every row generates exactly n tokens (an EOS argmax is kept, as on the Rust side)
    model.generation_config.eos_token_id = None
    firsts = []
    for n in work["lengths"]:
        t = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        out[f"generate_{n}_s"] = time.perf_counter() - t
        firsts.append(tok.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=True))
    out["first_outputs"] = firsts
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
