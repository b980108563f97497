//! SmolLM2-135M-Instruct imported from its Q4_1 GGUF by `evomerge import-gguf`, checked against
//! Hugging Face transformers running the same GGUF in float32 (`tests/data/smollm2_reference.json`,
//! made by `tests/data/make_smollm2_reference.py`).
//!
//! Not part of a plain `cargo test` (`test = false` in Cargo.toml): it needs the real model.
//!
//! ```text
//! scripts/fetch-smollm2.sh                      # target/smollm2/model (f32) and model-bf16
//! cargo test --release --test real_smollm2 -- --nocapture
//! ```
//!
//! `EVOMERGE_SMOLLM2_DIR` points at another f32 import; the bf16 import is looked for beside it
//! (`<dir>-bf16`) and only reported when present. A missing f32 model fails every test with a
//! message saying how to fetch it.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::tasks::{Example, Metric, Task, TaskSpec};
use evomerge::model::transformer::{Transformer, log_softmax_last};
use evomerge::store::Model;
use evomerge::tokenizer::{TextTokenizer, load_tokenizer};
use serde_json::Value;

/// Transformers' mean NLL must be matched this closely by the f32 import.
const NLL_TOLERANCE: f64 = 1e-3;

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("EVOMERGE_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/smollm2/model"));
    assert!(
        dir.join("config.json").is_file(),
        "SmolLM2-135M-Instruct is not imported at {}: run scripts/fetch-smollm2.sh \
         (or set EVOMERGE_SMOLLM2_DIR to an f32 import)",
        dir.display()
    );
    dir
}

fn bf16_dir() -> Option<PathBuf> {
    let dir = model_dir();
    let mut name = dir.file_name()?.to_os_string();
    name.push("-bf16");
    let bf16 = dir.with_file_name(name);
    bf16.join("config.json").is_file().then_some(bf16)
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load(dir: &std::path::Path) -> Transformer {
    let model = Model::open(dir).unwrap();
    Transformer::from_source(&model, &Device::Cpu, DType::F32).unwrap()
}

/// Mean next-token NLL (nats) of `ids`, the first token not predicted.
fn mean_nll(model: &Transformer, ids: &[u32]) -> f64 {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.logits(&input).unwrap();
    let logp = log_softmax_last(&logits.squeeze(0).unwrap()).unwrap();
    let logp: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    let total: f64 = (0..ids.len() - 1)
        .map(|i| -(logp[i][ids[i + 1] as usize] as f64))
        .sum();
    total / (ids.len() - 1) as f64
}

/// Greedy continuation of `prompt` (at most `n` tokens, ending with EOS when reached), as
/// transformers' `generate(do_sample=False)` returns it.
fn greedy(model: &Transformer, prompt: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let input = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = model.hidden(&input).unwrap();
        let last = h.narrow(1, seq.len() - 1, 1).unwrap();
        let row: Vec<f32> = model
            .head(&last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 { (i, x) } else { best }
            })
            .0 as u32;
        seq.push(next);
        if next == eos {
            break;
        }
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let tok = load_tokenizer(&model_dir()).unwrap();
    let r = reference();
    assert_eq!(
        tok.encode(r["text"].as_str().unwrap()).unwrap(),
        ids(&r["text_ids"])
    );
    let mut differ = Vec::new();
    for p in r["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let ours = tok.encode(prompt).unwrap();
        if ours != ids(&p["ids"]) {
            differ.push(format!(
                "{prompt:?}\n  ours {ours:?}\n  HF   {:?}",
                ids(&p["ids"])
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "tokenizer ids differ:\n{}",
        differ.join("\n")
    );
    // The GGUF says `tokenizer.ggml.add_bos_token = false`, so no BOS is added, as in transformers.
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_id().map(u64::from), r["eos_token_id"].as_u64());
}

#[test]
fn mean_nll_matches_transformers() {
    let r = reference();
    let text_ids = ids(&r["text_ids"]);
    let want = r["text_mean_nll"].as_f64().unwrap();
    let ours = mean_nll(&load(&model_dir()), &text_ids);
    println!(
        "mean NLL over {} tokens: transformers {want:.6}, ours f32 {ours:.6} (Δ {:+.2e})",
        text_ids.len(),
        ours - want
    );
    if let Some(dir) = bf16_dir() {
        let bf16 = mean_nll(&load(&dir), &text_ids);
        println!("ours bf16 weights {bf16:.6} (Δ {:+.2e})", bf16 - want);
    }
    assert!(
        (ours - want).abs() < NLL_TOLERANCE,
        "mean NLL {ours} vs transformers {want}"
    );
}

#[test]
fn greedy_continuations_equal_transformers() {
    let r = reference();
    let model = load(&model_dir());
    let n = r["max_new_tokens"].as_u64().unwrap() as usize;
    let eos = r["eos_token_id"].as_u64().unwrap() as u32;
    let bos = r["bos_token_id"].as_u64().unwrap() as u32;
    let mut differ = Vec::new();
    let prompts = r["prompts"].as_array().unwrap();
    for p in prompts {
        let prompt = ids(&p["ids"]);
        for (key, input) in [
            ("greedy", prompt.clone()),
            ("greedy_bos", [vec![bos], prompt.clone()].concat()),
        ] {
            let ours = greedy(&model, &input, n, eos);
            let want = ids(&p[key]);
            if ours != want {
                let same = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
                differ.push(format!(
                    "{key} {:?}: first {same} tokens agree\n  ours {ours:?}\n  HF   {want:?}",
                    p["prompt"].as_str().unwrap()
                ));
            }
        }
    }
    println!(
        "{} of {} greedy continuations differ",
        differ.len(),
        2 * prompts.len()
    );
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

/// The LM evaluator's `generate` against transformers' greedy continuation of the prompt (after
/// BOS when the tokenizer adds one), compared as decoded text.
#[test]
fn evaluator_generation_equals_transformers() {
    let dir = model_dir();
    let r = reference();
    let tok: Arc<dyn TextTokenizer> = Arc::from(load_tokenizer(&dir).unwrap());
    let text = Example::Text {
        text: r["text"].as_str().unwrap().to_string(),
    };
    let task = Task::from_examples(
        TaskSpec::new("text", "unused", Metric::Perplexity),
        vec![text.clone()],
        vec![text],
    )
    .unwrap();
    let eval = LmEvaluator::try_new(vec![task], tok.clone(), LmConfig::default()).unwrap();
    let model = load(&dir);
    let prompts: Vec<&str> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    let n = r["max_new_tokens"].as_u64().unwrap() as usize;
    let ours = eval.generate(&model, &prompts, n, "").unwrap();
    let mut differ = Vec::new();
    for (p, got) in r["prompts"].as_array().unwrap().iter().zip(&ours) {
        let key = match tok.bos_id() {
            None => "greedy",
            Some(_) => "greedy_bos",
        };
        let want = tok.decode(&ids(&p[key])).unwrap();
        if *got != want {
            differ.push(format!(
                "{:?}\n  ours {got:?}\n  HF   {want:?}",
                p["prompt"].as_str().unwrap()
            ));
        }
    }
    println!(
        "{} of {} evaluator generations differ",
        differ.len(),
        prompts.len()
    );
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
