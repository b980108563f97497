"""Regenerate tests/golden/plan/<case>/plan.json with mergekit 0.1.5's planner.

For every output tensor mergekit plans: its input models and input tensor names, the base model,
and the resolved global and per-model parameters. Only planning runs (no tensor is merged).
Usage: /work/venv/bin/python tests/golden/plan/make_plan_golden.py
"""

import json
import os
import sys

import yaml
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

HERE = os.path.dirname(os.path.abspath(__file__))


def name_of(ref):
    return os.path.basename(os.path.normpath(ref.model.path))


def plain(v):
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if v is None:
        return None
    return float(v)


def run(case):
    d = os.path.join(HERE, case)
    old = os.getcwd()
    os.chdir(d)  # mergekit resolves relative model paths against the working directory
    try:
        with open("recipe.yml") as f:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
        options = MergeOptions()
        arch = get_architecture_info(cfg, options)
        out_cfg = _model_out_config(cfg, arch)
        planner = MergePlanner(cfg, arch, options, out_cfg)
        planner._plan()
        tensors = []
        for weight, task in planner._tensors:
            winfo = dict(task.gather_tensors.weight_info.items())
            base = task.base_model
            inputs = [(m, winfo[m].name) for m in task.model_order]
            tensors.append(
                {
                    "name": weight.name,
                    "base": None
                    if base is None
                    else [name_of(base), dict(inputs)[base]],
                    "models": [[name_of(m), n] for m, n in inputs if m != base],
                    "global": {k: plain(v) for k, v in task.parameters.items()},
                    "model_params": [
                        {
                            k: plain(v)
                            for k, v in task.input_parameters[m].items()
                        }
                        for m, _ in inputs
                        if m != base
                    ],
                }
            )
        out = {
            "num_hidden_layers": out_cfg.num_hidden_layers,
            "tensors": tensors,
        }
    finally:
        os.chdir(old)
    with open(os.path.join(d, "plan.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(case, len(tensors), "tensors")


if __name__ == "__main__":
    for case in sys.argv[1:] or ["ties_slices", "passthrough_stack"]:
        run(case)
