//! Train the toy world of experts shipped under `assets/toy/`: task files, a tiny Llama base
//! model pretrained on generic character skills, and two experts fine-tuned from it (`add`:
//! two-digit addition; `cipher`: a Caesar-shifted "second language"), then print the accuracy of
//! every model and of the default TIES and DARE-TIES merges of the two experts on both tasks
//! (recipes in `assets/toy/recipes/`, merged in memory by the merge engine).
//!
//! ```text
//! cargo run --release --example train_toy               # everything, into assets/toy/
//! cargo run --release --example train_toy -- --out /tmp/toy
//! cargo run --release --example train_toy -- --stage eval   # only re-score the shipped models
//! ```
//!
//! Stages: `tasks` (write the JSONL files), `base`, `experts`, `eval`; `--stage all` (default)
//! runs them in order; `experts` and `eval` read the base / experts from `--out`.
//!
//! Everything is seeded (`SEED`) and deterministic for a given thread count: task files come from
//! `StdRng`, initial weights from `model::train::init_weights`, batches from the training loop's
//! own seeded RNG (a re-run reproduces the shipped files bit for bit). Time on the 2-core
//! development machine (release build, other jobs running): base ≈ 3 min (180–200 s), `add`
//! ≈ 50 s, `cipher` ≈ 80 s, eval ≈ 3 s. See `assets/toy/README.md` for the resulting table and
//! the worlds that were tried first; `TOY_ADD_SHARE` / `TOY_CIPHER_SHARE` override how often the
//! base sees the two tasks, and `TOY_SHOW=1` prints a few generations of every model.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use evomerge::candidate::{Candidate, CandidateBody, MemModel, TensorMap};
use evomerge::candle_core::Device;
use evomerge::eval::Split;
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::tasks::{self, Metric, Task, TaskSpec};
use evomerge::merge::executor::merge_in_memory;
use evomerge::model::LlamaConfig;
use evomerge::model::train::{
    TrainConfig, TrainExample, encode_plain, init_weights, load_task_examples, train,
};
use evomerge::recipe::Recipe;
use evomerge::store::{ModelSet, load_mem_f32, save_model_dir};
use evomerge::tokenizer::{CharTokenizer, TextTokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

const SEED: u64 = 1234;
/// The default merge recipes evaluated at the end (shipped beside the models).
const RECIPES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/toy/recipes");
/// The cipher: each letter shifted forward by this much (a → d, ..., x → a).
const SHIFT: u8 = 3;
const DEV: usize = 200;
/// Share of the base's pretraining examples drawn from the `add` / `cipher` train splits.
const ADD_SHARE: f64 = 0.02;
const CIPHER_SHARE: f64 = 0.001;
const TEST: usize = 300;

fn model_config() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": CharTokenizer::VOCAB_SIZE,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "bos_token_id": CharTokenizer::BOS,
        "eos_token_id": CharTokenizer::EOS,
        "pad_token_id": CharTokenizer::PAD,
        "torch_dtype": "float32",
        "evomerge_tokenizer": "char",
    })
}

fn base_train() -> TrainConfig {
    TrainConfig {
        steps: 2000,
        batch_size: 64,
        lr: 3e-3,
        warmup: 100,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        seed: SEED,
        pad_id: CharTokenizer::PAD,
    }
}

fn expert_train(seed: u64) -> TrainConfig {
    TrainConfig {
        steps: 800,
        batch_size: 64,
        lr: 5e-4,
        warmup: 50,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        seed,
        pad_id: CharTokenizer::PAD,
    }
}

/// `ADD_SHARE` / `CIPHER_SHARE`, or `TOY_ADD_SHARE` / `TOY_CIPHER_SHARE` from the environment
/// (for trying other worlds).
fn shares() -> (f64, f64) {
    let get = |key: &str, default: f64| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        get("TOY_ADD_SHARE", ADD_SHARE),
        get("TOY_CIPHER_SHARE", CIPHER_SHARE),
    )
}

fn shift(word: &str, by: u8) -> String {
    word.bytes()
        .map(|b| (b'a' + (b - b'a' + by) % 26) as char)
        .collect()
}

fn caesar(word: &str) -> String {
    shift(word, SHIFT)
}

fn random_word(rng: &mut StdRng, alphabet: &[u8], min: usize, max: usize) -> String {
    let n = rng.random_range(min..=max);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// (prompt, target) pairs of a task, split train / dev / test (disjoint).
struct Splits {
    train: Vec<(String, String)>,
    dev: Vec<(String, String)>,
    test: Vec<(String, String)>,
}

fn split(mut all: Vec<(String, String)>, rng: &mut StdRng) -> Splits {
    all.shuffle(rng);
    let test = all.split_off(all.len() - TEST);
    let dev = all.split_off(all.len() - DEV);
    Splits {
        train: all,
        dev,
        test,
    }
}

/// `add`: every `a+b=` with two-digit a, b (10..100; one-digit sums are part of the base's
/// pretraining).
fn add_task(rng: &mut StdRng) -> Splits {
    let mut all = Vec::new();
    for a in 10..100 {
        for b in 10..100 {
            all.push((format!("{a}+{b}="), (a + b).to_string()));
        }
    }
    split(all, rng)
}

/// `cipher`: `enc:<word>=` → the word shifted by `SHIFT`; 8000 distinct words of 3–6 letters.
fn cipher_task(rng: &mut StdRng) -> Splits {
    let mut words = BTreeSet::new();
    while words.len() < 8000 {
        words.insert(random_word(rng, b"abcdefghijklmnopqrstuvwxyz", 3, 6));
    }
    let all = words
        .into_iter()
        .map(|w| (format!("enc:{w}="), caesar(&w)))
        .collect();
    split(all, rng)
}

/// The base's pretraining mix: generic character skills (copy and reverse strings of letters
/// and digits, the successor of a number, one-digit sums, a shift-by-one letter code) and, rarely
/// (`ADD_SHARE`, `CIPHER_SHARE` of the examples), the two experts' tasks themselves (from their
/// train splits only). The base thus starts weak on both tasks; each expert then needs only a
/// small task vector, which is what makes the experts mergeable (see assets/toy/README.md for
/// the worlds that failed).
fn pretrain_data(
    rng: &mut StdRng,
    n: usize,
    add: &[tasks::Example],
    cipher: &[tasks::Example],
) -> Vec<tasks::Example> {
    let alnum = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let pair = |(prompt, target): (String, String)| tasks::Example::Generation { prompt, target };
    (0..n)
        .map(|i| {
            let u: f64 = rng.random();
            let (add_share, cipher_share) = shares();
            if u < add_share {
                return add[rng.random_range(0..add.len())].clone();
            }
            if u < add_share + cipher_share {
                return cipher[rng.random_range(0..cipher.len())].clone();
            }
            pair(match i % 5 {
                0 => {
                    let w = random_word(rng, alnum, 1, 6);
                    (format!("cp:{w}="), w)
                }
                1 => {
                    let w = random_word(rng, alnum, 1, 6);
                    (format!("rv:{w}="), w.chars().rev().collect())
                }
                2 => {
                    let x = rng.random_range(0..1000u32);
                    (format!("nx:{x}="), (x + 1).to_string())
                }
                3 => {
                    let (a, b) = (rng.random_range(0..10u32), rng.random_range(0..10u32));
                    (format!("{a}+{b}="), (a + b).to_string())
                }
                _ => {
                    let w = random_word(rng, letters, 1, 6);
                    (format!("sh:{w}="), shift(&w, 1))
                }
            })
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[(String, String)]) -> Result<()> {
    let mut s = String::new();
    for (p, t) in rows {
        s.push_str(&serde_json::to_string(
            &json!({ "prompt": p, "target": t }),
        )?);
        s.push('\n');
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, s).with_context(|| path.display().to_string())
}

/// A task's train split, as the library reads task JSONL.
fn read_train(path: &Path) -> Result<Vec<tasks::Example>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(tasks::parse_examples(
        path,
        &text,
        Metric::ExactMatch,
        None,
    )?)
}

/// Replace `dir` with a model directory holding `tensors`.
fn save(dir: &Path, config: &serde_json::Value, tensors: &TensorMap, card: &str) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    save_model_dir(dir, config, tensors, None, card)?;
    Ok(())
}

fn run_training(
    what: &str,
    start: &TensorMap,
    data: &[TrainExample],
    tc: &TrainConfig,
) -> Result<TensorMap> {
    let t0 = Instant::now();
    let mut avg = 0f32;
    let out = train(
        &model_config(),
        start,
        data,
        tc,
        &Device::Cpu,
        |step, loss| {
            avg = if step == 0 {
                loss
            } else {
                0.98 * avg + 0.02 * loss
            };
            if step % 100 == 0 || step == 20 || step + 1 == tc.steps {
                eprintln!(
                    "[{what}] step {step:5}  loss {avg:.4}  ({:.0} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    eprintln!("[{what}] done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(out)
}

fn evaluate(out: &Path) -> Result<()> {
    let tok: Arc<dyn TextTokenizer> = Arc::new(CharTokenizer);
    let tasks = ["add", "cipher"]
        .iter()
        .map(|t| {
            let mut spec = TaskSpec::new(*t, out.join("tasks").join(t), Metric::ExactMatch);
            spec.max_new_tokens = 8;
            spec.stop = "\n".into();
            Ok(Task::load(&spec)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let config = LmConfig {
        batch_size: 100,
        ..LmConfig::default()
    };
    let eval = LmEvaluator::try_new(tasks, tok, config)?;
    let base = load_mem_f32(&out.join("base"))?;
    let add = load_mem_f32(&out.join("add"))?;
    let cipher = load_mem_f32(&out.join("cipher"))?;
    let mut rows: Vec<(String, MemModel)> = vec![
        ("base".into(), base.clone()),
        ("add".into(), add.clone()),
        ("cipher".into(), cipher.clone()),
    ];
    // The shipped default merges, built in memory by the merge engine.
    for method in ["ties", "dare_ties"] {
        // The recipes name the models relative to themselves (`../add`): copy them beside the
        // models when training elsewhere than assets/toy/.
        let file = out.join("recipes").join(format!("{method}.yaml"));
        if !file.exists() {
            std::fs::create_dir_all(out.join("recipes"))?;
            std::fs::copy(Path::new(RECIPES).join(format!("{method}.yaml")), &file)?;
        }
        let recipe = Recipe::from_path(&file)?;
        let merged = merge_in_memory(&recipe, &mut ModelSet::new(), 0)?;
        rows.push((format!("{method} (default)"), merged));
    }
    println!("| model | add dev | add test | cipher dev | cipher test |");
    println!("|---|---|---|---|---|");
    for (name, m) in rows {
        let cand = Candidate {
            body: CandidateBody::Merged(Arc::new(m)),
            recipe: None,
        };
        let mut cells = Vec::new();
        if std::env::var_os("TOY_SHOW").is_some() {
            let model = evomerge::model::build(&cand, &Device::Cpu, evomerge::ComputeDType::F32)?;
            let prompts = ["37+45=", "19+83=", "enc:hello=", "enc:world="];
            let outs = eval.generate(model.as_ref(), &prompts, 8, "\n")?;
            eprintln!("{name}: {outs:?}");
        }
        let dev = evomerge::eval::Evaluator::evaluate(&eval, &cand, Split::Dev)?;
        let test = evomerge::eval::Evaluator::evaluate(&eval, &cand, Split::Test)?;
        for task in ["add", "cipher"] {
            for s in [&dev, &test] {
                let key = format!("{task}/exact_match");
                cells.push(format!(
                    "{:.3}",
                    s.metrics.get(&key).copied().unwrap_or(f64::NAN)
                ));
            }
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn main() -> Result<()> {
    // candle 0.11's elementwise ops hand work to a spinning barrier pool; on a small, busy
    // machine the spinning costs ~15x. One candle thread (matmuls still use rayon) is fastest.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: set before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let mut out = PathBuf::from("assets/toy");
    let mut stage = "all".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            "--stage" => stage = args.next().context("--stage needs a name")?,
            other => bail!("unknown argument `{other}` (expected --out DIR, --stage NAME)"),
        }
    }
    let all = stage == "all";
    if !["all", "tasks", "base", "experts", "eval"].contains(&stage.as_str()) {
        bail!("unknown stage `{stage}` (all, tasks, base, experts, eval)");
    }
    let config = model_config();
    let cfg = LlamaConfig::from_json(&config)?;
    if all || stage == "tasks" {
        let mut rng = StdRng::seed_from_u64(SEED);
        for (name, s) in [
            ("add", add_task(&mut rng)),
            ("cipher", cipher_task(&mut rng)),
        ] {
            let dir = out.join("tasks").join(name);
            write_jsonl(&dir.join("train.jsonl"), &s.train)?;
            write_jsonl(&dir.join("dev.jsonl"), &s.dev)?;
            write_jsonl(&dir.join("test.jsonl"), &s.test)?;
        }
    }
    if all || stage == "base" {
        let mut rng = StdRng::seed_from_u64(SEED + 1);
        let add = read_train(&out.join("tasks/add/train.jsonl"))?;
        let cipher = read_train(&out.join("tasks/cipher/train.jsonl"))?;
        // `[BOS] prompt`, then `target [EOS]` (loss), as the LM evaluator prompts a task.
        let data = encode_plain(
            &pretrain_data(&mut rng, 50_000, &add, &cipher),
            &CharTokenizer,
        )?;
        let init = init_weights(&cfg, SEED);
        let base = run_training("base", &init, &data, &base_train())?;
        save(
            &out.join("base"),
            &config,
            &base,
            "Toy base model (evomerge).",
        )?;
    }
    if all || stage == "experts" {
        let base = load_mem_f32(&out.join("base"))?;
        for (i, task) in ["add", "cipher"].iter().enumerate() {
            let (_, data) =
                load_task_examples(&out.join("tasks").join(task), None, &CharTokenizer, None)?;
            let tc = expert_train(SEED + 10 + i as u64);
            let tuned = run_training(task, &base.tensors, &data, &tc)?;
            let card = format!("Toy `{task}` expert fine-tuned from ../base (evomerge).");
            save(&out.join(task), &config, &tuned, &card)?;
        }
    }
    if all || stage == "eval" {
        evaluate(&out)?;
    }
    Ok(())
}
