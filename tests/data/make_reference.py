"""Reference logits for the transformer forward test (tests/model.rs).

Builds tiny, seeded checkpoints with Hugging Face transformers and saves, per case, under
tests/data/<case>/: config.json, model.safetensors (F32), and reference.safetensors holding
`input_ids` (int64, [2, 7]) and `logits` (float32, [2, 7, vocab]) from the PyTorch forward.

Cases: tiny_llama (LlamaForCausalLM, GQA 4 heads / 2 kv heads, hidden 32, 2 layers, separate
lm_head, rope_theta 500), tiny_qwen2 (Qwen2ForCausalLM: q/k/v biases, tied embeddings) and
tiny_llama3_rope (tiny_llama's shapes with Llama 3.1's `llama3` RoPE scaling; its original
context of 64 puts the 4 frequency pairs of head_dim 8 in all three bands: kept, blended,
divided). All three were made with transformers 5.24.0 (see each config.json).

Run from the repo root with a Python that has torch + transformers (not needed to build or test),
naming the cases to (re)make, or none for all:
    /work/venv/bin/python tests/data/make_reference.py [CASE ...]
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def save_case(name, model, config_extra):
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    model.eval()
    # Randomise every tensor (norm weights and biases too) so no term is trivially 1 or 0.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                if n.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    tensors = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.update(config_extra)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))
    print(name, tuple(logits.shape), float(logits.abs().max()))


def main():
    import sys
    wanted = set(sys.argv[1:])

    def want(case):
        return not wanted or case in wanted

    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
                        tie_word_embeddings=False, attention_bias=False,
                        torch_dtype="float32")
    llama._attn_implementation = "eager"
    if want("tiny_llama"):
        save_case("tiny_llama", LlamaForCausalLM(llama), {})

    torch.manual_seed(1)
    qwen = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                       max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                       tie_word_embeddings=True, torch_dtype="float32")
    qwen._attn_implementation = "eager"
    if want("tiny_qwen2"):
        save_case("tiny_qwen2", Qwen2ForCausalLM(qwen), {})

    torch.manual_seed(2)
    scaled = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64,
                                       "rope_theta": 500.0},
                         rope_theta=500.0, tie_word_embeddings=False, attention_bias=False,
                         torch_dtype="float32")
    scaled._attn_implementation = "eager"
    if want("tiny_llama3_rope"):
        save_case("tiny_llama3_rope", LlamaForCausalLM(scaled), {})


if __name__ == "__main__":
    main()
