#!/usr/bin/env python3
"""Regenerate the golden files for tests/methods.rs from mergekit 0.1.5.

Usage (from the repository root, with a venv that has `mergekit==0.1.5`):

    /work/venv/bin/python tests/golden/make_golden.py [--mergekit-yaml PATH] [--only CASE,CASE]

`--only` regenerates just the named cases (the models are always rewritten, byte for byte the
same).

Writes:
  tests/golden/models/{base,ft_a,ft_b}/  three tiny llama-style models (f32, seeded numpy)
  tests/golden/models_bf16/{base,ft_a,ft_b}/  the same models rounded to bfloat16 (torch)
  tests/golden/<case>/recipe.yml          a mergekit recipe (model paths relative to the recipe)
  tests/golden/<case>/merged.safetensors  mergekit's output (deterministic methods)
  tests/golden/<case>/stats.json          distribution statistics over several seeds (DARE, DELLA)

Nothing in the Rust build or tests runs this script; it only refreshes the shipped files.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
HIDDEN, INTER, LAYERS, VOCAB, HEADS = 8, 16, 3, 16, 2
STAT_SEEDS = list(range(1, 9))


def config():
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def shapes():
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            out[p + f"self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
        out[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def make_models():
    rng = np.random.default_rng(20240601)
    base, ft_a, ft_b = {}, {}, {}
    for name, shape in shapes().items():
        if len(shape) == 1:
            # norms: nearly parallel to each other (slerp falls back to lerp here)
            b = 1.0 + 0.1 * rng.standard_normal(shape)
            da = 0.005 * rng.standard_normal(shape)
            db = 0.005 * rng.standard_normal(shape)
        else:
            b = 0.5 * rng.standard_normal(shape)
            da = 0.08 * rng.standard_normal(shape)
            # partly anti-correlated with da: plenty of sign conflicts for TIES
            db = -0.5 * da + 0.08 * rng.standard_normal(shape)
        base[name] = b.astype(np.float32)
        ft_a[name] = (b + da).astype(np.float32)
        ft_b[name] = (b + db).astype(np.float32)
    for label, tensors in (("base", base), ("ft_a", ft_a), ("ft_b", ft_b)):
        d = os.path.join(HERE, "models", label)
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(d, "model.safetensors"), 0o644)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config(), f, indent=2)
    write_bf16_models(base, ft_a, ft_b)
    return base, ft_a, ft_b


def write_bf16_models(base, ft_a, ft_b):
    """The same models in bfloat16 (round to nearest even, as torch casts), for the bf16 cases."""
    import torch
    from safetensors.torch import save_file as save_torch

    for label, tensors in (("base", base), ("ft_a", ft_a), ("ft_b", ft_b)):
        d = os.path.join(HERE, "models_bf16", label)
        os.makedirs(d, exist_ok=True)
        t = {k: torch.from_numpy(v).to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        save_torch(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(d, "model.safetensors"), 0o644)
        cfg = config()
        cfg["torch_dtype"] = "bfloat16"
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)


# Recipes in mergekit syntax; model paths are relative to tests/golden/<case>/.
BASE, A, B = "../models/base", "../models/ft_a", "../models/ft_b"
# The bf16 copies, for the `*_bf16` cases.
BASE16, A16, B16 = "../models_bf16/base", "../models_bf16/ft_a", "../models_bf16/ft_b"

DETERMINISTIC = {
    "linear": f"""
merge_method: linear
models:
  - model: {A}
    parameters:
      weight: 0.7
  - model: {B}
    parameters:
      weight: 0.5
dtype: float32
""",
    # gradient and filter lists; the base model takes part as an ordinary input
    "linear_gradient": f"""
merge_method: linear
models:
  - model: {BASE}
    parameters:
      weight: 0.2
  - model: {A}
    parameters:
      weight:
        - filter: self_attn
          value: [0.1, 0.9]
        - filter: mlp
          value: [1.0, 0.2, 0.6]
        - value: 0.5
  - model: {B}
    parameters:
      weight: 0.3
parameters:
  normalize: false
dtype: float32
""",
    "slerp": f"""
merge_method: slerp
base_model: {BASE}
models:
  - model: {BASE}
  - model: {A}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3]
    - filter: mlp
      value: [1.0, 0.4]
    - value: 0.35
dtype: float32
""",
    "nuslerp": f"""
merge_method: nuslerp
models:
  - model: {A}
    parameters:
      weight: 0.3
  - model: {B}
    parameters:
      weight: 0.5
dtype: float32
""",
    "nuslerp_base_rows": f"""
merge_method: nuslerp
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
  - model: {B}
    parameters:
      weight: 0.6
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
dtype: float32
""",
    "nuslerp_cols": f"""
merge_method: nuslerp
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 0.4
  - model: {B}
    parameters:
      weight: 0.4
parameters:
  nuslerp_flatten: false
dtype: float32
""",
    "task_arithmetic": f"""
merge_method: task_arithmetic
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 0.8
  - model: {B}
    parameters:
      weight: [0.3, 0.9]
parameters:
  lambda: 1.3
dtype: float32
""",
    "ties": f"""
merge_method: ties
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {B}
    parameters:
      weight: 0.6
      density:
        - filter: mlp
          value: [0.3, 0.7]
        - value: 0.6
dtype: float32
""",
    "ties_rescale": f"""
merge_method: ties
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 0.9
      density: 0.4
  - model: {B}
    parameters:
      weight: 0.4
      density: 0.7
parameters:
  normalize: false
  rescale: true
  lambda: 0.8
dtype: float32
""",
    "breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 0.7
      density: 0.6
      gamma: 0.1
  - model: {B}
    parameters:
      weight: 0.5
      density: 0.8
dtype: float32
""",
    "breadcrumbs_ties": f"""
merge_method: breadcrumbs_ties
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.5
      gamma: 0.2
  - model: {B}
    parameters:
      weight: 0.8
      density: 0.7
      gamma: 0.05
parameters:
  normalize: true
dtype: float32
""",
    # arcee_fusion, ram, ramplus_tl (tests/methods_bf16.rs): f32 and bf16 inputs
    "arcee_fusion": f"""
merge_method: arcee_fusion
base_model: {BASE}
models:
  - model: {A}
dtype: float32
""",
    "arcee_fusion_bf16": f"""
merge_method: arcee_fusion
base_model: {BASE16}
models:
  - model: {A16}
dtype: bfloat16
""",
    # epsilon large enough that some entries have one contributor, some two, some none
    "ram": f"""
merge_method: ram
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
parameters:
  epsilon: 0.04
dtype: float32
""",
    "ram_bf16": f"""
merge_method: ram
base_model: {BASE16}
models:
  - model: {A16}
  - model: {B16}
dtype: bfloat16
""",
    # rho = shared / unique lands on both sides of alpha across the tensors
    "ramplus_tl": f"""
merge_method: ramplus_tl
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
parameters:
  r: 0.3
  alpha: 0.5
  epsilon: 0.1
dtype: float32
""",
    "ramplus_tl_bf16": f"""
merge_method: ramplus_tl
base_model: {BASE16}
models:
  - model: {A16}
  - model: {B16}
parameters:
  r: 0.3
  alpha: 0.5
  epsilon: 0.1
dtype: bfloat16
""",
    # bf16 tie cases: one model of weight 1, so `merged - base` shows which entries were kept
    "ties_bf16": f"""
merge_method: ties
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 1.0
      density: 0.5
dtype: bfloat16
""",
    "breadcrumbs_bf16": f"""
merge_method: breadcrumbs
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 1.0
      density: 0.6
      gamma: 0.1
dtype: bfloat16
""",
    "breadcrumbs_ties_bf16": f"""
merge_method: breadcrumbs_ties
base_model: {BASE16}
models:
  - model: {B16}
    parameters:
      weight: 1.0
      density: 0.5
      gamma: 0.05
parameters:
  normalize: true
dtype: bfloat16
""",
    "model_stock": f"""
merge_method: model_stock
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
dtype: float32
""",
    "model_stock_filter_wise": f"""
merge_method: model_stock
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
parameters:
  filter_wise: true
dtype: float32
""",
    "passthrough": f"""
merge_method: passthrough
models:
  - model: {A}
    parameters:
      scale:
        - filter: o_proj
          value: 0.0
        - filter: down_proj
          value: 0.5
dtype: float32
""",
    # sce, multislerp, karcher, nearswap (tests/methods_more.rs): f32 and bf16 inputs.
    # sce: a filter sends mlp tensors down the unselected (streamed) path, the rest select 60 %
    "sce": f"""
merge_method: sce
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
parameters:
  select_topk:
    - filter: mlp
      value: 1.0
    - value: 0.6
dtype: float32
""",
    "sce_bf16": f"""
merge_method: sce
base_model: {BASE16}
models:
  - model: {A16}
  - model: {B16}
parameters:
  select_topk: 0.6
dtype: bfloat16
""",
    # no base model: three plain models, one weight a gradient
    "multislerp": f"""
merge_method: multislerp
models:
  - model: {BASE}
    parameters:
      weight: 0.2
  - model: {A}
    parameters:
      weight: 0.5
  - model: {B}
    parameters:
      weight: [0.1, 0.6]
dtype: float32
""",
    # task vectors about the base model, weights not normalised
    "multislerp_base": f"""
merge_method: multislerp
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 0.7
  - model: {B}
    parameters:
      weight: 0.4
parameters:
  normalize_weights: false
dtype: float32
""",
    "multislerp_bf16": f"""
merge_method: multislerp
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 0.6
  - model: {B16}
    parameters:
      weight: 0.4
dtype: bfloat16
""",
    # the base model is one more input (mergekit adds it); no iteration: the normalised
    # Euclidean mean of the directions (5e-5 relative from the converged mean of karcher_default)
    # the base also listed among the models (mergekit counts it once / drops it)
    "multislerp_base_listed": f"""
merge_method: multislerp
base_model: {BASE}
models:
  - model: {BASE}
    parameters:
      weight: 0.3
  - model: {A}
    parameters:
      weight: 0.7
  - model: {B}
    parameters:
      weight: 0.4
dtype: float32
""",
    "karcher_base_listed": f"""
merge_method: karcher
base_model: {BASE}
models:
  - model: {BASE}
  - model: {A}
  - model: {B}
dtype: float32
""",
    "karcher": f"""
merge_method: karcher
base_model: {BASE}
models:
  - model: {A}
  - model: {B}
parameters:
  max_iter: 0
  tol: 1.0e-6
dtype: float32
""",
    # defaults (10 iterations, tol 1e-5), no base model
    "karcher_default": f"""
merge_method: karcher
models:
  - model: {BASE}
  - model: {A}
  - model: {B}
dtype: float32
""",
    "karcher_bf16": f"""
merge_method: karcher
models:
  - model: {BASE16}
  - model: {A16}
  - model: {B16}
dtype: bfloat16
""",
    # t between the norm weights' differences (~0.005) and the matrices' (~0.08)
    "nearswap": f"""
merge_method: nearswap
base_model: {BASE}
models:
  - model: {A}
parameters:
  t:
    - filter: mlp
      value: [0.005, 0.05]
    - value: 0.01
dtype: float32
""",
    "nearswap_bf16": f"""
merge_method: nearswap
base_model: {BASE16}
models:
  - model: {A16}
parameters:
  t: 0.01
dtype: bfloat16
""",
    # the same bf16 inputs with mergekit computing in f32 (`dtype: float32`) and writing bf16:
    # evomerge's arithmetic, so these must agree to the bit (up to SCE's ties at the cut)
    "sce_bf16_f32math": f"""
merge_method: sce
base_model: {BASE16}
models:
  - model: {A16}
  - model: {B16}
parameters:
  select_topk: 0.6
dtype: float32
out_dtype: bfloat16
""",
    "multislerp_bf16_f32math": f"""
merge_method: multislerp
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 0.6
  - model: {B16}
    parameters:
      weight: 0.4
dtype: float32
out_dtype: bfloat16
""",
    "karcher_bf16_f32math": f"""
merge_method: karcher
models:
  - model: {BASE16}
  - model: {A16}
  - model: {B16}
dtype: float32
out_dtype: bfloat16
""",
    "nearswap_bf16_f32math": f"""
merge_method: nearswap
base_model: {BASE16}
models:
  - model: {A16}
parameters:
  t: 0.01
dtype: float32
out_dtype: bfloat16
""",
    # mergekit computing in bf16 (`dtype: bfloat16`: every torch op rounded to bf16), matched
    # bit for bit by `evomerge merge --compute-dtype recipe` (tests/compute_dtype.rs); the
    # weights and lambda are not bf16-exact, so their rounding is exercised too
    "task_arithmetic_bf16": f"""
merge_method: task_arithmetic
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 0.3
  - model: {B16}
    parameters:
      weight: 0.45
parameters:
  lambda: 0.8
dtype: bfloat16
""",
    "task_arithmetic_normalize_bf16": f"""
merge_method: task_arithmetic
base_model: {BASE16}
models:
  - model: {A16}
    parameters:
      weight: 0.3
  - model: {B16}
    parameters:
      weight: 0.45
parameters:
  normalize: true
  lambda: 1.3
dtype: bfloat16
""",
    "linear_bf16": f"""
merge_method: linear
models:
  - model: {A16}
    parameters:
      weight: 0.3
  - model: {B16}
    parameters:
      weight: 0.45
dtype: bfloat16
""",
}

# Random methods: one fine-tune (the stats then describe one sparsified task vector) or two.
RANDOM = {
    "dare_linear": f"""
merge_method: dare_linear
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.3
dtype: float32
""",
    "dare_ties": f"""
merge_method: dare_ties
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {B}
    parameters:
      weight: 0.7
      density: 0.5
dtype: float32
""",
    "della_linear": f"""
merge_method: della_linear
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.5
      epsilon: 0.3
dtype: float32
""",
    "della": f"""
merge_method: della
base_model: {BASE}
models:
  - model: {A}
    parameters:
      weight: 1.0
      density: 0.4
  - model: {B}
    parameters:
      weight: 0.5
      density: 0.6
      epsilon: 0.2
dtype: float32
""",
}


def run_mergekit(exe, recipe_path, out_dir, seed=None):
    cmd = [exe, recipe_path, out_dir, "--quiet", "--no-copy-tokenizer", "--no-write-model-card"]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    subprocess.run(cmd, check=True, cwd=os.path.dirname(recipe_path))
    files = [f for f in os.listdir(out_dir) if f.endswith(".safetensors")]
    merged = {}
    for f in files:
        merged.update(load_file_any(os.path.join(out_dir, f)))
    return merged


def load_file_any(path):
    """A safetensors file as numpy arrays; bfloat16 tensors (which numpy lacks) stay torch
    tensors, saved back as they are by save_any."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        if all(f.get_slice(k).get_dtype() != "BF16" for k in f.keys()):
            return load_file(path)
        return {k: f.get_tensor(k) for k in f.keys()}


def save_any(tensors, path):
    """Save what run_mergekit returned: numpy arrays as before, torch tensors (bf16) via torch."""
    if any(not isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.torch import save_file as save_torch

        save_torch({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def stats(merged, base, ft_a):
    """Distribution statistics of the merged delta (merged - base) over all 2-D tensors."""
    kept = total = 0
    abs_sum = abs_kept_sum = 0.0
    top_kept = top_total = bot_kept = bot_total = 0
    for name, m in merged.items():
        if m.ndim != 2:
            continue
        d = m.astype(np.float64) - base[name]
        nz = d != 0
        kept += int(nz.sum())
        total += d.size
        abs_sum += float(np.abs(d).sum())
        abs_kept_sum += float(np.abs(d[nz]).sum())
        # kept share among the larger / smaller half of |ft_a - base| in each row
        mag = np.abs(ft_a[name].astype(np.float64) - base[name])
        ranks = mag.argsort(axis=1).argsort(axis=1)
        top = ranks >= mag.shape[1] // 2
        top_kept += int((nz & top).sum())
        top_total += int(top.sum())
        bot_kept += int((nz & ~top).sum())
        bot_total += int((~top).sum())
    return {
        "kept_share": kept / total,
        "mean_abs_delta": abs_sum / total,
        "mean_abs_kept": abs_kept_sum / max(kept, 1),
        "kept_share_top_half": top_kept / top_total,
        "kept_share_bottom_half": bot_kept / bot_total,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--mergekit-yaml",
        default=os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
    )
    ap.add_argument("--only", default="", help="comma-separated cases (default: all)")
    args = ap.parse_args()
    only = {c for c in args.only.split(",") if c}
    unknown = only - set(DETERMINISTIC) - set(RANDOM)
    if unknown:
        sys.exit(f"unknown case(s): {sorted(unknown)}")
    base, ft_a, _ = make_models()

    for case, recipe in DETERMINISTIC.items():
        if only and case not in only:
            continue
        d = os.path.join(HERE, case)
        os.makedirs(d, exist_ok=True)
        rp = os.path.join(d, "recipe.yml")
        with open(rp, "w") as f:
            f.write(recipe.lstrip())
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            merged = run_mergekit(args.mergekit_yaml, rp, out)
            save_any(merged, os.path.join(d, "merged.safetensors"))
            os.chmod(os.path.join(d, "merged.safetensors"), 0o644)
        print(f"{case}: {len(merged)} tensors")

    for case, recipe in RANDOM.items():
        if only and case not in only:
            continue
        d = os.path.join(HERE, case)
        os.makedirs(d, exist_ok=True)
        rp = os.path.join(d, "recipe.yml")
        with open(rp, "w") as f:
            f.write(recipe.lstrip())
        per_seed = []
        for seed in STAT_SEEDS:
            with tempfile.TemporaryDirectory() as tmp:
                merged = run_mergekit(args.mergekit_yaml, rp, os.path.join(tmp, "out"), seed)
                per_seed.append(stats(merged, base, ft_a))
        keys = per_seed[0].keys()
        summary = {
            "seeds": STAT_SEEDS,
            "mean": {k: float(np.mean([s[k] for s in per_seed])) for k in keys},
            "std": {k: float(np.std([s[k] for s in per_seed], ddof=1)) for k in keys},
            "per_seed": per_seed,
        }
        with open(os.path.join(d, "stats.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"{case}: {summary['mean']}")


if __name__ == "__main__":
    main()
