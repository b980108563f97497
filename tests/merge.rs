//! Integration tests: the whole merge path (recipe → plan → execute) against mergekit 0.1.5's
//! outputs, and the `evomerge merge` / `inspect` commands with their failure modes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use evomerge::merge::executor::{MergeOptions, merge_in_memory, merge_to_disk};
use evomerge::recipe::Recipe;
use evomerge::store::{Model, ModelSet, TensorSource};
use evomerge::synth::{self, LlamaSpec};
use evomerge::tensor::DType;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Read every tensor of a bare safetensors file as f32.
fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, view.shape().to_vec(), data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Each deterministic golden case, run through the recipe parser, planner and executor, equals
/// mergekit 0.1.5's output for the same YAML and inputs.
#[test]
fn full_pipeline_matches_mergekit_golden_outputs() {
    let mut cases = 0;
    for entry in fs::read_dir(golden_dir()).unwrap() {
        let dir = entry.unwrap().path();
        let expected_path = dir.join("merged.safetensors");
        if !expected_path.is_file() {
            continue;
        }
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        // bf16 cases (bf16 outputs; mergekit computes in bf16 unless `_f32math`):
        // tests/methods_bf16.rs and tests/methods_more.rs compare them in bf16 steps.
        if case.ends_with("_bf16") || case.ends_with("_f32math") {
            continue;
        }
        let recipe = Recipe::from_path(dir.join("recipe.yml")).unwrap();
        let merged = merge_in_memory(&recipe, &mut ModelSet::new(), 0)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let expected = read_safetensors(&expected_path);
        assert_eq!(
            merged.tensors.keys().cloned().collect::<Vec<_>>(),
            expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
            "{case}: tensor names"
        );
        for (name, shape, want) in &expected {
            let got = &merged.tensors[name];
            assert_eq!(&got.shape, shape, "{case}: {name} shape");
            for (i, (g, w)) in got.values().iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{case}: {name}[{i}] = {g}, mergekit gives {w}"
                );
            }
        }
        cases += 1;
    }
    assert!(cases >= 10, "only {cases} golden cases found");
}

/// A merge written to disk reads back as the same tensors as the in-memory merge (rounded
/// through the output dtype), with config, index and model card in place.
#[test]
fn disk_merge_equals_memory_merge_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = LlamaSpec::tiny();
    spec.dtype = evomerge::tensor::DType::BF16;
    let family = synth::write_family(tmp.path(), &spec, 2, 11).unwrap();
    let yaml = format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.7, density: 0.6}}\n",
        family[0].display(),
        family[1].display(),
        family[2].display()
    );
    let recipe = Recipe::from_str(&yaml, None).unwrap();
    let mut models = ModelSet::new();
    let mem = merge_in_memory(&recipe, &mut models, 3).unwrap();
    let out = tmp.path().join("merged");
    let options = MergeOptions {
        seed: 3,
        max_shard_size: 4096,
        ..MergeOptions::default()
    };
    merge_to_disk(&recipe, &mut models, &out, &options).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(out.join("README.md").is_file());
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("merge_method: ties"), "{card}");
    let disk = Model::open(&out).unwrap();
    assert_eq!(disk.config()["torch_dtype"], "bfloat16");
    assert_eq!(disk.tensors().len(), mem.tensors.len());
    for (name, t) in &mem.tensors {
        assert_eq!(disk.read(name).unwrap().to_f32_vec(), *t.values(), "{name}");
    }
    // bf16 inputs make a bf16 candidate: the checkpoint's size in memory, not twice it
    assert!(mem.tensors.values().all(|t| t.dtype() == DType::BF16));
    assert_eq!(mem.nbytes() as u64, spec.parameters() * 2);

    // a whole-tensor method (nuslerp) and an `out_dtype` override land in memory the same way
    let (a, b) = (family[1].display(), family[2].display());
    for (i, (yaml, dtype)) in [
        (
            format!(
                "merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n"
            ),
            DType::BF16,
        ),
        (
            format!(
                "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\nout_dtype: float16\n"
            ),
            DType::F16,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let recipe = Recipe::from_str(&yaml, None).unwrap();
        let mem = merge_in_memory(&recipe, &mut models, 3).unwrap();
        let out = tmp.path().join(format!("merged-{i}"));
        merge_to_disk(&recipe, &mut models, &out, &MergeOptions::default()).unwrap();
        let disk = Model::open(&out).unwrap();
        assert_eq!(disk.config()["torch_dtype"], dtype.torch_name(), "{yaml}");
        for (name, t) in &mem.tensors {
            assert_eq!(t.dtype(), dtype, "{name}: {yaml}");
            assert_eq!(disk.tensor_info(name).unwrap().dtype, dtype, "{name}");
            assert_eq!(disk.read(name).unwrap().to_f32_vec(), *t.values(), "{name}");
        }
    }
}

/// A merged model's config.json states one dtype: `torch_dtype` and (where the base has it, as
/// transformers ≥ 4.56 writes) `dtype` both name the output dtype, also under `--out-dtype`.
#[test]
fn merged_config_states_one_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = LlamaSpec::tiny();
    spec.dtype = DType::BF16;
    let family = synth::write_family(tmp.path(), &spec, 1, 4).unwrap();
    let cfg_path = family[0].join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["dtype"] = "bfloat16".into();
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    let yaml = format!(
        "merge_method: linear\nbase_model: {0}\nmodels:\n  - model: {0}\n    parameters: {{weight: 0.5}}\n  - model: {1}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
        family[0].display(),
        family[1].display()
    );
    let recipe = Recipe::from_str(&yaml, None).unwrap();
    for (out_dtype, want) in [(None, "float32"), (Some(DType::F16), "float16")] {
        let out = tmp.path().join(format!("out-{want}"));
        let options = MergeOptions {
            out_dtype,
            ..MergeOptions::default()
        };
        merge_to_disk(&recipe, &mut ModelSet::new(), &out, &options).unwrap();
        let disk = Model::open(&out).unwrap();
        assert_eq!(disk.config()["torch_dtype"], want);
        assert_eq!(disk.config()["dtype"], want);
        assert!(disk.tensors().iter().all(|t| t.dtype.torch_name() == want));
    }
}

/// Streamed merges (chunk by chunk, read with positioned reads, written in pieces to several
/// shards) equal each method's whole-tensor merge, for tensors of many chunks — enough (17 in
/// the embedding) that the top-k cut comes from a sample — and bf16 inputs, whose task vectors
/// tie a lot. SLERP (a moments pass), model stock (a Gram pass, per tensor or per row) and
/// passthrough stream too; DELLA, which takes whole tensors, is checked through the same path.
#[test]
fn streamed_disk_merges_equal_whole_tensor_merges() {
    use evomerge::merge::stream::STREAM_CHUNK;
    use evomerge::merge::{MergeInput, plan::plan, tensor_seed};
    use evomerge::tensor::DType;

    let tmp = tempfile::tempdir().unwrap();
    // hidden 72: rows (model_stock's filter_wise) straddle chunk boundaries
    let spec = LlamaSpec {
        hidden: 72,
        layers: 1,
        intermediate: 96,
        vocab: 8200,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        tie_embeddings: false,
    };
    assert!(spec.vocab * spec.hidden > 16 * STREAM_CHUNK);
    let fam = synth::write_family(&tmp.path().join("fam"), &spec, 2, 9).unwrap();
    let (w, d, g, e) = ("weight: 0.8", "density: 0.4", "gamma: 0.05", "epsilon: 0.1");
    let (w2, d2, g2) = ("weight: 0.6", "density: 0.7", "gamma: 0.02");
    let cases = [
        ("linear", w.to_string(), w2.to_string()),
        ("task_arithmetic", w.to_string(), w2.to_string()),
        ("ties", format!("{w}, {d}"), format!("{w2}, {d2}")),
        ("dare_ties", format!("{w}, {d}"), format!("{w2}, {d2}")),
        ("dare_linear", format!("{w}, {d}"), format!("{w2}, {d2}")),
        (
            "breadcrumbs",
            format!("{w}, {d}, {g}"),
            format!("{w2}, {d2}, {g2}"),
        ),
        (
            "breadcrumbs_ties",
            format!("{w}, {d}, {g}"),
            format!("{w2}, {d2}, {g2}"),
        ),
        (
            "della",
            format!("{w}, {d}, {e}"),
            format!("{w2}, {d2}, {e}"),
        ),
    ];
    let (base, a, b) = (fam[0].display(), fam[1].display(), fam[2].display());
    let mut recipes: Vec<(&str, String)> = cases
        .iter()
        .map(|(method, params, params2)| {
            let yaml = format!(
                "merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{{params}}}\n  - model: {b}\n    parameters: {{{params2}}}\n"
            );
            (*method, yaml)
        })
        .collect();
    recipes.push((
        "slerp",
        format!(
            "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{t: 0.3}}\n"
        ),
    ));
    for filter_wise in [false, true] {
        recipes.push((
            "model_stock",
            format!(
                "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{filter_wise: {filter_wise}}}\n"
            ),
        ));
    }
    recipes.push((
        "passthrough",
        format!(
            "merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters: {{scale: 0.5}}\n"
        ),
    ));
    for (i, (method, yaml)) in recipes.into_iter().enumerate() {
        let recipe = Recipe::from_str(&yaml, None).unwrap();
        let mut models = ModelSet::new();
        let out = tmp.path().join(format!("out-{i}-{method}"));
        let options = MergeOptions {
            seed: 5,
            max_shard_size: 400_000,
            ..MergeOptions::default()
        };
        merge_to_disk(&recipe, &mut models, &out, &options).unwrap();
        let disk = Model::open(&out).unwrap();
        assert!(disk.files().len() > 1, "{method}: several shards");
        let mem = merge_in_memory(&recipe, &mut models, 5).unwrap();
        let plan = plan(&recipe, &mut models).unwrap();
        for t in &plan.tensors {
            let read = |src: &evomerge::merge::plan::SourceRef| {
                Model::open(&src.model)
                    .unwrap()
                    .read(&src.tensor)
                    .unwrap()
                    .into_f32_vec()
            };
            let base = t.base.as_ref().map(read);
            let inputs: Vec<Vec<f32>> = t.models.iter().map(read).collect();
            let whole = plan
                .method
                .merge(&MergeInput {
                    tensor: &t.name,
                    shape: &t.shape,
                    base: base.as_deref(),
                    models: inputs.iter().map(Vec::as_slice).collect(),
                    model_params: t.model_params.clone(),
                    global: t.global.clone(),
                    aux: Vec::new(),
                    seed: tensor_seed(5, &t.name),
                })
                .unwrap();
            let whole: Vec<f32> = whole
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let on_disk = disk.read(&t.name).unwrap().into_f32_vec();
            assert!(on_disk == whole, "{method}: {} on disk", t.name);
            assert!(
                *mem.tensors[&t.name].values() == whole,
                "{method}: {} in memory",
                t.name
            );
        }
    }
}

fn evomerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evomerge"))
        .args(args)
        .output()
        .unwrap()
}

/// Run `evomerge merge` expecting failure: non-zero exit, an error naming `needle`, and nothing
/// (not even a temporary directory) left beside the target.
fn assert_merge_fails(root: &Path, recipe_text: &str, needle: &str) {
    let recipe = root.join("recipe.yml");
    fs::write(&recipe, recipe_text).unwrap();
    let out_dir = root.join("out");
    let before: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = evomerge(&[
        "merge",
        recipe.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "merge should fail; stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr should mention `{needle}`:\n{stderr}"
    );
    assert!(!out_dir.exists(), "an output directory appeared");
    let after: Vec<_> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before.len(), after.len(), "stray files: {after:?}");
}

fn family(root: &Path) -> Vec<PathBuf> {
    synth::write_family(&root.join("fam"), &LlamaSpec::tiny(), 2, 5).unwrap()
}

fn ties_recipe(models: &[PathBuf]) -> String {
    format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        models[0].display(),
        models[1].display(),
        models[2].display()
    )
}

#[test]
fn merge_command_writes_a_model_that_inspect_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    let recipe = tmp.path().join("r.yml");
    fs::write(&recipe, ties_recipe(&fam)).unwrap();
    let out_dir = tmp.path().join("merged");
    let out = evomerge(&[
        "merge",
        recipe.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        "--out-dtype",
        "bf16",
        "--seed",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = evomerge(&["inspect", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bf16") || text.contains("BF16"), "{text}");
    let merged = Model::open(&out_dir).unwrap();
    assert_eq!(merged.config()["num_hidden_layers"], 2);
}

#[test]
fn merge_refuses_a_truncated_safetensors_file() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    let file = fam[1].join("model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_merge_fails(tmp.path(), &ties_recipe(&fam), "ft1/model.safetensors");
}

#[test]
fn merge_refuses_a_header_pointing_past_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    let file = fam[2].join("model.safetensors");
    let mut bytes = fs::read(&file).unwrap();
    // A header length far larger than the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&file, &bytes).unwrap();
    assert_merge_fails(tmp.path(), &ties_recipe(&fam), "ft2/model.safetensors");
}

#[test]
fn merge_refuses_mismatched_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    let mut wide = LlamaSpec::tiny();
    wide.intermediate *= 2;
    let other = synth::write_family(&tmp.path().join("wide"), &wide, 0, 5).unwrap();
    let models = [fam[0].clone(), fam[1].clone(), other[0].clone()];
    assert_merge_fails(tmp.path(), &ties_recipe(&models), "mlp.gate_proj.weight");
}

#[test]
fn merge_refuses_a_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    // Rewrite ft1 without one tensor.
    let src = Model::open(&fam[1]).unwrap();
    let keep: Vec<_> = src
        .tensor_infos()
        .into_iter()
        .filter(|t| t.name != "model.layers.1.mlp.up_proj.weight")
        .collect();
    let target = tmp.path().join("ft1-missing");
    let w = evomerge::store::ModelWriter::create(&target, &keep, &Default::default()).unwrap();
    for t in &keep {
        w.write(&t.name, &src.read(&t.name).unwrap().values())
            .unwrap();
    }
    w.finish(src.config(), None, "").unwrap();
    let models = [fam[0].clone(), target, fam[2].clone()];
    assert_merge_fails(
        tmp.path(),
        &ties_recipe(&models),
        "model.layers.1.mlp.up_proj.weight",
    );
}

#[test]
fn merge_refuses_an_unknown_yaml_key_naming_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    let text =
        ties_recipe(&fam).replace("merge_method: ties\n", "merge_method: ties\ndensty: 0.5\n");
    assert_merge_fails(tmp.path(), &text, "densty");
    let out = evomerge(&[
        "merge",
        tmp.path().join("recipe.yml").to_str().unwrap(),
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2"));
}

#[test]
fn merge_refuses_the_wrong_number_of_models() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = family(tmp.path());
    // slerp takes exactly two models: the base and one other.
    let text = format!(
        "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n  - model: {}\nparameters:\n  t: 0.5\n",
        fam[0].display(),
        fam[0].display(),
        fam[1].display(),
        fam[2].display()
    );
    assert_merge_fails(tmp.path(), &text, "slerp");
}

/// A bf16 candidate held in memory runs the same forward as its merge written to disk, in `f32`
/// and in `bf16` compute (the weights are cast from the same stored values).
#[test]
fn bf16_candidate_in_memory_runs_like_its_checkpoint() {
    use evomerge::candidate::{Candidate, CandidateBody};

    let tmp = tempfile::tempdir().unwrap();
    let mut spec = LlamaSpec::tiny();
    spec.dtype = DType::BF16;
    let family = synth::write_family(tmp.path(), &spec, 1, 9).unwrap();
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
        family[0].display(),
        family[1].display()
    );
    let recipe = Recipe::from_str(&yaml, None).unwrap();
    let mut models = ModelSet::new();
    let mem = std::sync::Arc::new(merge_in_memory(&recipe, &mut models, 0).unwrap());
    let out = tmp.path().join("merged");
    merge_to_disk(&recipe, &mut models, &out, &MergeOptions::default()).unwrap();
    let dev = candle_core::Device::Cpu;
    let ids = candle_core::Tensor::new(&[[1u32, 5, 7, 3, 30]], &dev).unwrap();
    let logits = |body: CandidateBody, dt: DType| -> Vec<Vec<Vec<f32>>> {
        let c = Candidate { body, recipe: None };
        let model = evomerge::model::build(&c, &dev, dt.into()).unwrap();
        model.forward(&ids).unwrap().to_vec3().unwrap()
    };
    for dt in [DType::F32, DType::BF16] {
        let in_memory = logits(CandidateBody::Merged(mem.clone()), dt);
        let on_disk = logits(CandidateBody::Dir(out.clone()), dt);
        assert_eq!(in_memory, on_disk, "{dt}");
        assert!(in_memory[0].iter().flatten().all(|v| v.is_finite()));
    }
}
