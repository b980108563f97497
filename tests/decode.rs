//! Incremental decoding (KV cache) against the full forward: greedy tokens must be identical.

use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use evomerge::candidate::{Hop, MemModel, Route};
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::tasks::{Metric, Task, TaskSpec};
use evomerge::model::{CausalLm, RoutedModel, Transformer};
use evomerge::tensor::TensorBuf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// A random checkpoint of `config` (weights ~ U(−0.6, 0.6), norms around 1).
fn random_model(config: Value, qkv_bias: bool, seed: u64) -> MemModel {
    let cfg = evomerge::model::LlamaConfig::from_json(&config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = cfg
        .tensor_shapes(qkv_bias)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let data = (0..n)
                .map(|_| {
                    let u = rng.random::<f32>() - 0.5;
                    if norm { 1.0 + 0.4 * u } else { 1.2 * u }
                })
                .collect();
            (name, TensorBuf::new(shape, data))
        })
        .collect();
    MemModel { config, tensors }
}

/// Llama (GQA, separate head), Qwen2 (q/k/v biases, tied head, large θ), Mistral (GQA 4:1,
/// head_dim given), and a multi-head Llama with `llama3` RoPE scaling.
fn configs() -> Vec<(&'static str, Value, bool)> {
    vec![
        (
            "llama",
            json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
                   "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "vocab_size": 29, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "tie_word_embeddings": false}),
            false,
        ),
        (
            "qwen2",
            json!({"model_type": "qwen2", "hidden_size": 24, "intermediate_size": 40,
                   "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                   "vocab_size": 31, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": true}),
            true,
        ),
        (
            "mistral",
            json!({"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                   "head_dim": 8, "vocab_size": 37, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "tie_word_embeddings": false}),
            false,
        ),
        (
            "llama3-rope",
            json!({"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 23,
                   "rope_theta": 500000.0, "tie_word_embeddings": false,
                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8}}),
            false,
        ),
    ]
}

fn prompts(vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    [5usize, 1, 12, 3, 9]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect()
}

/// Prompts that share their first 6 tokens (a few-shot prefix), then differ in length.
fn prefixed_prompts(vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let prefix: Vec<u32> = (0..6).map(|_| rng.random_range(0..vocab as u32)).collect();
    [4usize, 1, 9, 2, 6]
        .iter()
        .map(|&n| {
            let mut p = prefix.clone();
            p.extend((0..n).map(|_| rng.random_range(0..vocab as u32)));
            p
        })
        .collect()
}

/// Greedy tokens by re-running the whole (unpadded) sequence through `forward`, one prompt at a
/// time: the reference, with no padding and no cache.
fn greedy_full(model: &dyn CausalLm, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut seq = prompt.to_vec();
    let mut logits = Vec::new();
    for _ in 0..n {
        let ids = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
        let last = model
            .forward(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap();
        let row: Vec<f32> = last.to_vec1().unwrap();
        seq.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
        logits.push(row);
    }
    (seq[prompt.len()..].to_vec(), logits)
}

/// Greedy tokens of all prompts at once through the model's decoder; rows `drop_at.0` leave the
/// batch after step `drop_at.1` (exercising `retain`).
fn greedy_cached(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    n: usize,
    drop_at: (usize, usize),
) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>) {
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (mut dec, mut logits) = model.decoder(&rows, n).unwrap().expect("a cache");
    let mut out = vec![Vec::new(); prompts.len()];
    let mut all_logits = vec![Vec::new(); prompts.len()];
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..n {
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for ((&r, &t), l) in active.iter().zip(&next).zip(rows) {
            out[r].push(t);
            all_logits[r].push(l);
        }
        if step + 1 == n {
            break;
        }
        let keep: Vec<usize> = (0..active.len())
            .filter(|&k| !(active[k] == drop_at.0 && step >= drop_at.1))
            .collect();
        dec.retain(&keep).unwrap();
        let tokens: Vec<u32> = keep.iter().map(|&k| next[k]).collect();
        active = keep.iter().map(|&k| active[k]).collect();
        logits = dec.step(&tokens).unwrap();
    }
    (out, all_logits)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The cached batch equals the one-prompt full forward: tokens exactly, logits to 1e-4.
fn check_equivalence(label: &str, model: &dyn CausalLm, vocab: usize, seed: u64) {
    check_prompts(label, model, prompts(vocab, seed));
    check_prompts(
        &format!("{label}, shared prefix"),
        model,
        prefixed_prompts(vocab, seed),
    );
}

fn check_prompts(label: &str, model: &dyn CausalLm, prompts: Vec<Vec<u32>>) {
    let n = 12;
    let (cached, cached_logits) = greedy_cached(model, &prompts, n, (2, 4));
    for (r, p) in prompts.iter().enumerate() {
        let (full, full_logits) = greedy_full(model, p, n);
        let got = &cached[r];
        assert_eq!(
            got[..],
            full[..got.len()],
            "{label}: prompt {r} (len {}) diverged",
            p.len()
        );
        for (step, (a, b)) in cached_logits[r].iter().zip(&full_logits).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < 1e-4,
                "{label}: prompt {r} step {step}: logits differ by {d}"
            );
        }
        let expect_len = if r == 2 { 5 } else { n };
        assert_eq!(got.len(), expect_len, "{label}: prompt {r}");
    }
    // the outputs are not degenerate (a constant token would make the check weak)
    let distinct: std::collections::BTreeSet<u32> = cached.iter().flatten().copied().collect();
    assert!(distinct.len() > 3, "{label}: outputs {cached:?}");
}

#[test]
fn cached_greedy_equals_full_forward_on_random_checkpoints() {
    for (i, (label, config, bias)) in configs().into_iter().enumerate() {
        let vocab = config["vocab_size"].as_u64().unwrap() as usize;
        let mem = random_model(config, bias, 40 + i as u64);
        let model = Transformer::from_mem(&mem, &Device::Cpu, DType::F32).unwrap();
        check_equivalence(label, &model, vocab, i as u64);
    }
}

#[test]
fn cached_greedy_equals_full_forward_on_routes_that_repeat_layers() {
    let (_, config, _) = configs().remove(0);
    let models: Vec<Transformer> = (0..2)
        .map(|s| {
            Transformer::from_mem(
                &random_model(config.clone(), false, 7 + s),
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
        })
        .collect();
    let hop = |model, layer, scale| Hop {
        model,
        layer,
        scale,
    };
    // layer 0 of model 0 twice (two cache slots), layers of both models, scaled hops
    let route = Route {
        embed_model: 1,
        hops: vec![
            hop(0, 0, 1.0),
            hop(0, 0, 0.8),
            hop(1, 1, 1.25),
            hop(0, 2, 1.0),
            hop(1, 2, 0.9),
        ],
    };
    let routed = RoutedModel { models, route };
    check_equivalence("route", &routed, 29, 3);
}

/// Hides the cache, so the evaluator falls back to re-running the whole sequence.
struct NoCache<'a>(&'a dyn CausalLm);

impl CausalLm for NoCache<'_> {
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }

    fn forward(&self, input_ids: &Tensor) -> evomerge::Result<Tensor> {
        self.0.forward(input_ids)
    }
}

#[test]
fn toy_world_generation_is_the_same_with_and_without_the_cache() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tok = evomerge::tokenizer::load_tokenizer(&dir.join("add")).unwrap();
    let tasks = ["add", "cipher"]
        .iter()
        .map(|t| {
            Task::load(&TaskSpec::new(
                *t,
                dir.join("tasks").join(t),
                Metric::ExactMatch,
            ))
            .unwrap()
        })
        .collect::<Vec<_>>();
    let prompts: Vec<String> = tasks
        .iter()
        .flat_map(|t| {
            t.examples(evomerge::eval::Split::Test)
                .iter()
                .take(24)
                .map(|e| match e {
                    evomerge::eval::tasks::Example::Generation { prompt, .. } => prompt.clone(),
                    _ => unreachable!(),
                })
        })
        .collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let cfg = LmConfig {
        batch_size: 7,
        ..LmConfig::default()
    };
    let eval = LmEvaluator::try_new(tasks, Arc::from(tok), cfg).unwrap();
    for expert in ["add", "cipher", "base"] {
        let disk = evomerge::store::Model::open(dir.join(expert)).unwrap();
        let model = Transformer::from_source(&disk, &Device::Cpu, DType::F32).unwrap();
        let cached = eval.generate(&model, &prompts, 12, "").unwrap();
        let full = eval.generate(&NoCache(&model), &prompts, 12, "").unwrap();
        assert_eq!(cached, full, "{expert}");
        assert!(cached.iter().any(|s| !s.is_empty()), "{expert}: {cached:?}");
    }
}

#[test]
fn bf16_compute_decodes_close_to_f32() {
    let (_, config, _) = configs().remove(0);
    let mem = random_model(config, false, 5);
    let f32m = Transformer::from_mem(&mem, &Device::Cpu, DType::F32).unwrap();
    let bf16m = Transformer::from_mem(&mem, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(bf16m.dtype(), DType::BF16);
    let prompts = prompts(29, 11);
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (_, a) = f32m.decoder(&rows, 1).unwrap().unwrap();
    let (_, b) = bf16m.decoder(&rows, 1).unwrap().unwrap();
    assert_eq!(b.dtype(), DType::F32, "logits come back in f32");
    let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.to_vec2().unwrap(), b.to_vec2().unwrap());
    for (x, y) in a.iter().zip(&b) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(x, y);
        assert!(
            d > 0.0 && d < 0.1 * scale,
            "bf16 vs f32: {d} (scale {scale})"
        );
    }
}
