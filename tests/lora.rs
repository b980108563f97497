//! LoRA adapters as recipe inputs: a random PEFT adapter directory written by hand, folded by
//! `BASE+ADAPTER` references, against the same adapter folded into a model directory by the
//! plain loops of this file (independent of `src/store/lora.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use evomerge::store::{Model, ModelWriter, WriteConfig, open_source};
use evomerge::synth::{self, LlamaSpec};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// A seeded stream of values in [-amp, amp).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, amp: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(amp)).collect()
    }
}

/// Write a safetensors file of f32 tensors by hand.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let begin = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    fs::write(path, bytes).unwrap();
}

/// One LoRA module of the hand-made adapter.
struct Factor {
    /// Base tensor, e.g. `model.layers.0.self_attn.q_proj.weight`.
    base: String,
    embedding: bool,
    rank: usize,
    scale: f64,
    /// Linear: A [r, in], B [out, r]. Embedding: A [r, vocab], B [hidden, r].
    a: Vec<f32>,
    b: Vec<f32>,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
}

/// A hand-made adapter: its LoRA factors and whole replacements.
struct Adapter {
    factors: Vec<Factor>,
    /// Base tensor → (shape, values).
    replaced: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Write a random rsLoRA adapter for `base` into `dir`: `q_proj` / `v_proj` at r 4, `down_proj`
/// at r 2 (rank_pattern), the embedding (lora_embedding_A/B, alpha 4 by alpha_pattern) when
/// `embedding`, `lm_head` replaced whole (modules_to_save) when `head`.
fn write_adapter(
    dir: &Path,
    base: &Model,
    seed: u64,
    amp: f32,
    embedding: bool,
    head: bool,
) -> Adapter {
    let (r, alpha) = (4usize, 8.0f64);
    let mut rng = Lcg(seed);
    let mut factors = Vec::new();
    let mut replaced = BTreeMap::new();
    for info in base.tensors() {
        let name = &info.name;
        let (rank, alpha, emb) =
            if name.ends_with("q_proj.weight") || name.ends_with("v_proj.weight") {
                (r, alpha, false)
            } else if name.ends_with("down_proj.weight") {
                (2, alpha, false)
            } else if embedding && name == "model.embed_tokens.weight" {
                (r, 4.0, true)
            } else if head && name == "lm_head.weight" {
                replaced.insert(
                    name.clone(),
                    (info.shape.clone(), rng.vec(info.numel(), 0.5)),
                );
                continue;
            } else {
                continue;
            };
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let (a_shape, b_shape) = if emb {
            (vec![rank, rows], vec![cols, rank])
        } else {
            (vec![rank, cols], vec![rows, rank])
        };
        factors.push(Factor {
            base: name.clone(),
            embedding: emb,
            rank,
            scale: alpha / (rank as f64).sqrt(),
            a: rng.vec(a_shape.iter().product(), amp),
            b: rng.vec(b_shape.iter().product(), amp),
            a_shape,
            b_shape,
        });
    }
    let adapter = Adapter { factors, replaced };
    write_adapter_files(dir, &adapter, &[]);
    adapter
}

/// Write `adapter` (plus `extra` raw tensors) as a PEFT directory.
fn write_adapter_files(dir: &Path, adapter: &Adapter, extra: &[(String, Vec<usize>, Vec<f32>)]) {
    fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    for f in &adapter.factors {
        let module = f.base.strip_suffix(".weight").unwrap();
        let (a, b) = if f.embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        tensors.push((
            format!("base_model.model.{module}.{a}"),
            f.a_shape.clone(),
            f.a.clone(),
        ));
        tensors.push((
            format!("base_model.model.{module}.{b}"),
            f.b_shape.clone(),
            f.b.clone(),
        ));
    }
    for (name, (shape, values)) in &adapter.replaced {
        tensors.push((
            format!("base_model.model.{name}"),
            shape.clone(),
            values.clone(),
        ));
    }
    tensors.extend(extra.iter().cloned());
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors);
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": true,
        "lora_dropout": 0.05,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens", "x_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"embed_tokens": 4},
        "modules_to_save": ["lm_head"],
        "base_model_name_or_path": null,
        "inference_mode": true,
    });
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Every tensor of `base` with `adapter` folded in, by plain loops in f64.
fn hand_fold(base: &Model, adapter: &Adapter) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for info in base.tensors() {
        let mut w = base.read(&info.name).unwrap().to_f32_vec();
        if let Some((_, v)) = adapter.replaced.get(&info.name) {
            w = v.clone();
        }
        if let Some(f) = adapter.factors.iter().find(|f| f.base == info.name) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            for i in 0..rows {
                for j in 0..cols {
                    let mut d = 0f64;
                    for k in 0..f.rank {
                        d += if f.embedding {
                            // (B [cols, r] · A [r, rows])ᵀ [i, j] = Σ_k B[j, k] A[k, i].
                            f.b[j * f.rank + k] as f64 * f.a[k * rows + i] as f64
                        } else {
                            // B [rows, r] · A [r, cols].
                            f.b[i * f.rank + k] as f64 * f.a[k * cols + j] as f64
                        };
                    }
                    w[i * cols + j] = (w[i * cols + j] as f64 + f.scale * d) as f32;
                }
            }
        }
        out.insert(info.name.clone(), w);
    }
    out
}

/// Write the hand-folded model as a model directory (config and donor files of `base`).
fn write_folded(target: &Path, base: &Model, folded: &BTreeMap<String, Vec<f32>>) {
    let infos = base.tensors().to_vec();
    let w = ModelWriter::create(target, &infos, &WriteConfig::default()).unwrap();
    for (name, values) in folded {
        w.write(name, values).unwrap();
    }
    w.finish(base.config(), Some(base.dir()), "# folded by hand\n")
        .unwrap();
}

/// `DIR/models/{base, ft1, adapter, folded}`: a tiny random Llama family, a random adapter for
/// its base, and that adapter folded in by hand.
struct World {
    root: PathBuf,
    adapter: Adapter,
    folded: BTreeMap<String, Vec<f32>>,
}

fn world(root: &Path) -> World {
    let models = root.join("models");
    synth::write_family(&models, &LlamaSpec::tiny(), 1, 11).unwrap();
    let base = Model::open(models.join("base")).unwrap();
    let adapter = write_adapter(&models.join("adapter"), &base, 5, 0.5, true, true);
    let folded = hand_fold(&base, &adapter);
    write_folded(&models.join("folded"), &base, &folded);
    World {
        root: root.to_path_buf(),
        adapter,
        folded,
    }
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn merge(recipe: &Path, out: &Path) -> Output {
    Command::new(bin())
        .arg("merge")
        .arg(recipe)
        .arg(out)
        .arg("--quiet")
        // Not the recipe's directory: model paths must resolve against the recipe file.
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

fn recipe_text(method: &str, first: &str) -> String {
    match method {
        "task_arithmetic" => format!(
            "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.7}}\n  - model: models/ft1\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
        ),
        "linear" => format!(
            "merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.6}}\n  - model: models/ft1\n    parameters: {{weight: 0.4}}\ndtype: float32\n"
        ),
        other => panic!("{other}"),
    }
}

/// (a) `evomerge merge` with `models/base+models/adapter` as an input equals the same recipe over
/// the hand-folded model directory, for task arithmetic and linear.
#[test]
fn merging_base_plus_adapter_equals_merging_the_hand_folded_model() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(tmp.path());
    for method in ["task_arithmetic", "linear"] {
        let lora_recipe = w.root.join(format!("{method}-lora.yml"));
        let folded_recipe = w.root.join(format!("{method}-folded.yml"));
        fs::write(
            &lora_recipe,
            recipe_text(method, "models/base+models/adapter"),
        )
        .unwrap();
        fs::write(&folded_recipe, recipe_text(method, "models/folded")).unwrap();
        let (out_lora, out_folded) = (
            w.root.join(format!("out-{method}-lora")),
            w.root.join(format!("out-{method}-folded")),
        );
        for (recipe, out) in [(&lora_recipe, &out_lora), (&folded_recipe, &out_folded)] {
            let run = merge(recipe, out);
            assert!(
                run.status.success(),
                "{method}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        let (a, b) = (
            Model::open(&out_lora).unwrap(),
            Model::open(&out_folded).unwrap(),
        );
        assert_eq!(a.tensors(), b.tensors(), "{method}");
        for info in a.tensors() {
            close(
                &a.read(&info.name).unwrap().to_f32_vec(),
                &b.read(&info.name).unwrap().to_f32_vec(),
                &format!("{method} {}", info.name),
            );
        }
        assert_eq!(a.config()["torch_dtype"], "float32");
    }
}

/// (b) The folded source's tensors equal the hand-folded ones, in full and in ranges, keep the
/// base's dtypes, and untouched tensors are the base's exactly.
#[test]
fn folded_source_equals_the_hand_fold() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(tmp.path());
    let models = w.root.join("models");
    let reference = PathBuf::from(format!(
        "{}+{}",
        models.join("base").display(),
        models.join("adapter").display()
    ));
    let src = open_source(&reference).unwrap();
    let base = Model::open(models.join("base")).unwrap();
    assert_eq!(src.tensor_infos(), base.tensors());
    assert_eq!(src.config(), base.config());
    assert_eq!(src.label(), reference.display().to_string());
    // 2 layers × (q, v, down) + the embedding fold; lm_head replaced.
    assert_eq!(w.adapter.factors.len(), 7);
    for (name, want) in &w.folded {
        let mut got = vec![0f32; want.len()];
        src.read_into(name, &mut got).unwrap();
        close(&got, want, name);
        let touched = w.adapter.factors.iter().any(|f| &f.base == name)
            || w.adapter.replaced.contains_key(name);
        if !touched {
            assert_eq!(got, base.read(name).unwrap().to_f32_vec(), "{name}");
        } else {
            assert_ne!(got, base.read(name).unwrap().to_f32_vec(), "{name}");
        }
        // A few odd ranges read the same as the full tensor.
        for (start, len) in [(0, 1), (3, 17), (want.len() / 2, want.len() / 3 + 1)] {
            let len = len.min(want.len() - start);
            let mut part = vec![0f32; len];
            src.read_range_into(name, start, &mut part).unwrap();
            assert_eq!(part, got[start..start + len], "{name} {start}+{len}");
        }
    }
}

fn assert_refused(w: &World, first: &str, needles: &[String], tag: &str) {
    let recipe = w.root.join(format!("{tag}.yml"));
    fs::write(&recipe, recipe_text("task_arithmetic", first)).unwrap();
    let out = w.root.join(format!("out-{tag}"));
    let run = merge(&recipe, &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{tag}: merged");
    for n in needles {
        assert!(err.contains(n.as_str()), "{tag}: `{n}` not in: {err}");
    }
    assert!(!out.exists(), "{tag}: output written");
    let leftovers: Vec<_> = fs::read_dir(&w.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&format!("out-{tag}")))
        .collect();
    assert!(leftovers.is_empty(), "{tag}: {leftovers:?}");
}

/// (c) A missing adapter directory, an adapter key with no base tensor and a shape mismatch are
/// each one error naming the adapter path / file and key; nothing is written.
#[test]
fn bad_adapters_are_refused_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(tmp.path());
    let models = w.root.join("models");
    let base = Model::open(models.join("base")).unwrap();

    assert_refused(
        &w,
        "models/base+models/nope",
        &[models.join("nope").display().to_string(), "adapter".into()],
        "missing",
    );

    // A LoRA pair for a module the base does not have.
    let dir = models.join("bad-key");
    let mut rng = Lcg(9);
    let key = "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight".to_string();
    write_adapter_files(
        &dir,
        &w.adapter,
        &[
            (key.clone(), vec![4, 16], rng.vec(64, 0.5)),
            (
                "base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight".into(),
                vec![16, 4],
                rng.vec(64, 0.5),
            ),
        ],
    );
    assert_refused(
        &w,
        "models/base+models/bad-key",
        &[
            dir.join("adapter_model.safetensors").display().to_string(),
            format!("`{key}`"),
            "model.layers.0.self_attn.x_proj.weight".into(),
        ],
        "bad-key",
    );

    // A factor whose shape does not fit its base tensor.
    let dir = models.join("bad-shape");
    let mut adapter = write_adapter(&dir, &base, 5, 0.5, false, false);
    let f = &mut adapter.factors[0];
    f.a_shape = vec![f.rank, 15];
    f.a.truncate(f.rank * 15);
    let module = f.base.strip_suffix(".weight").unwrap().to_string();
    write_adapter_files(&dir, &adapter, &[]);
    assert_refused(
        &w,
        "models/base+models/bad-shape",
        &[
            dir.join("adapter_model.safetensors").display().to_string(),
            format!("`base_model.model.{module}.lora_A.weight`"),
            "do not fit".into(),
        ],
        "bad-shape",
    );
}

/// (d) `evomerge inspect BASE+ADAPTER` shows the base and what the adapter folds in.
#[test]
fn inspect_accepts_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let w = world(tmp.path());
    let run = Command::new(bin())
        .args(["inspect", "models/base+models/adapter"])
        .current_dir(&w.root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for needle in [
        "model:         models/base+models/adapter",
        "architecture:  LlamaForCausalLM",
        "LoRA adapter:  models/adapter folded in: r 4, alpha 8, scale 4 (rsLoRA",
        "rank_pattern / alpha_pattern",
        "7 target tensors",
        "1 replaced whole",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
}

/// (d) `evomerge eval` scores `BASE+ADAPTER` (the toy base, tokenizer from the base) exactly as
/// the hand-folded directory.
#[test]
fn eval_accepts_base_plus_adapter() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tmp = tempfile::tempdir().unwrap();
    let base = Model::open(toy.join("base")).unwrap();
    let adapter_dir = tmp.path().join("ad");
    let adapter = write_adapter(&adapter_dir, &base, 3, 0.05, false, false);
    let folded = tmp.path().join("folded");
    write_folded(&folded, &base, &hand_fold(&base, &adapter));
    let tasks = tmp.path().join("tasks.toml");
    fs::write(
        &tasks,
        format!(
            "[[tasks]]\nname = \"add\"\npath = \"{}\"\nmetric = \"exact_match\"\nmax_new_tokens = 4\nlimit = 8\n",
            toy.join("tasks/add").display()
        ),
    )
    .unwrap();
    let reference = format!("{}+{}", toy.join("base").display(), adapter_dir.display());
    let run = Command::new(bin())
        .arg("eval")
        .arg("--tasks")
        .arg(&tasks)
        .args(["--split", "dev"])
        .arg(&reference)
        .arg(&folded)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let row = |label: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {label} ")))
            .unwrap_or_else(|| panic!("no row {label}:\n{table}"));
        line.split('|')
            .skip(2)
            .map(|c| c.trim().to_string())
            .collect()
    };
    assert_eq!(row("ad"), row("folded"), "{table}");
}
