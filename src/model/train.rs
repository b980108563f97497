//! Training the toy world: seeded initialisation, next-token cross-entropy with a per-token loss
//! mask, and candle-nn's AdamW with linear warm-up and cosine decay.
//!
//! Everything is deterministic for a given seed and thread count: the initial weights come from a
//! seeded [`StdRng`] through `Tensor::from_vec` (candle's own CPU RNG cannot be seeded), batches
//! are drawn from the same kind of RNG, and the forward is [`Transformer`] itself (plain
//! differentiable ops).
//!
//! Bringing your own experts takes four library calls: read a task's `train.jsonl` and encode it
//! as the LM evaluator prompts it ([`load_task_examples`]; in-memory prompt / target pairs:
//! [`encode_plain`]), train ([`train`], from [`init_weights`] or a model read with
//! [`crate::store::load_mem_f32`]), and write a Hugging Face model directory
//! ([`crate::store::save_model_dir`]):
//!
//! ```no_run
//! use evomerge::model::train::{TrainConfig, init_weights, load_task_examples, train};
//! use evomerge::tokenizer::CharTokenizer;
//! # fn main() -> evomerge::Result<()> {
//! let base = evomerge::store::load_mem_f32("assets/toy/base".as_ref())?;
//! let (_, data) =
//!     load_task_examples("assets/toy/tasks/add".as_ref(), None, &CharTokenizer, None)?;
//! let tc = TrainConfig { steps: 100, batch_size: 64, lr: 5e-4, ..TrainConfig::default() };
//! let device = evomerge::candle_core::Device::Cpu;
//! let tuned = train(&base.config, &base.tensors, &data, &tc, &device, |_, _| {})?;
//! evomerge::store::save_model_dir("my-add".as_ref(), &base.config, &tuned, None, "My expert.")?;
//! // A model from scratch starts from seeded random weights:
//! let cfg = evomerge::model::LlamaConfig::from_json(&base.config)?;
//! let _init = init_weights(&cfg, 42);
//! # Ok(()) }
//! ```
//!
//! **Threads.** For tiny models on CPU, set `CANDLE_NUM_THREADS=1` before anything runs (in the
//! environment, or with `std::env::set_var` at the top of `main`, before any other thread
//! exists): candle's elementwise ops hand work to a spinning barrier pool whose spinning made a
//! training step of the 208k-parameter toy model ~15× slower on a busy 2-core machine (0.9 s →
//! 0.07 s per step; see `assets/toy/README.md`). Matmuls still use the rayon pool. Larger models
//! (hidden sizes in the thousands) gain from candle's default instead.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use std::path::Path;

use serde::Deserialize;

use crate::candidate::TensorMap;
use crate::error::{Error, Result};
use crate::eval::lm::render_prompt;
use crate::eval::tasks::{self, Metric, Task, TaskSpec};
use crate::model::transformer::{LlamaConfig, Transformer, log_softmax_last};
use crate::tensor::TensorBuf;
use crate::tokenizer::TextTokenizer;

/// One training sequence: `ids` (with bos / eos as wanted) and, per position `t`, whether
/// predicting `ids[t]` from `ids[..t]` counts in the loss (`loss_mask[0]` is ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainExample {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl TrainExample {
    /// A prompt / target pair: loss on the target tokens only.
    pub fn prompt_target(prompt: &[u32], target: &[u32]) -> Self {
        let ids: Vec<u32> = prompt.iter().chain(target).copied().collect();
        let loss_mask = (0..ids.len()).map(|i| i >= prompt.len()).collect();
        TrainExample { ids, loss_mask }
    }

    /// Plain text: loss on every token after the first.
    pub fn text(ids: &[u32]) -> Self {
        TrainExample {
            ids: ids.to_vec(),
            loss_mask: (0..ids.len()).map(|i| i > 0).collect(),
        }
    }
}

/// Optimiser and schedule settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `lr · min_lr_ratio`.
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Seeds the batch sampling.
    pub seed: u64,
    /// The padding id (its positions never count in the loss).
    pub pad_id: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 32,
            lr: 3e-3,
            warmup: 50,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            seed: 0,
            pad_id: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Seeded initial weights for `cfg`: matrices ~ N(0, 0.02²) (the transformers default), norms 1,
/// no biases. Tensors are drawn in [`LlamaConfig::tensor_shapes`] order.
pub fn init_weights(cfg: &LlamaConfig, seed: u64) -> TensorMap {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).expect("valid std");
    cfg.tensor_shapes(false)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            (name, TensorBuf::new(shape, data))
        })
        .collect()
}

/// Build a padded batch: inputs `[b, s]`, targets `[b, s]`, mask `[b, s]` (f32), where
/// `s` = longest example − 1.
pub fn make_batch(
    examples: &[&TrainExample],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(2)
        - 1;
    let b = examples.len();
    let mut inputs = vec![pad_id; b * s];
    let mut targets = vec![pad_id; b * s];
    let mut mask = vec![0f32; b * s];
    for (r, e) in examples.iter().enumerate() {
        if e.ids.len() != e.loss_mask.len() {
            return Err(Error::msg(format!(
                "training example {r}: {} ids but {} mask entries",
                e.ids.len(),
                e.loss_mask.len()
            )));
        }
        for t in 0..e.ids.len().saturating_sub(1) {
            inputs[r * s + t] = e.ids[t];
            targets[r * s + t] = e.ids[t + 1];
            if e.loss_mask[t + 1] && e.ids[t + 1] != pad_id {
                mask[r * s + t] = 1.0;
            }
        }
    }
    Ok((
        Tensor::from_vec(inputs, (b, s), device)?,
        Tensor::from_vec(targets, (b, s), device)?,
        Tensor::from_vec(mask, (b, s), device)?,
    ))
}

/// Mean next-token cross-entropy over the masked positions: logits `[b, s, v]`, targets
/// `[b, s]` u32, mask `[b, s]` f32. Differentiable.
pub fn lm_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let total = mask.sum_all()?.to_scalar::<f32>()?;
    if total == 0.0 {
        return Err(Error::msg("loss mask selects no token"));
    }
    Ok(((picked * mask)?.sum_all()?.neg()? / total as f64)?)
}

/// Train from `start` (tensors by HF name, e.g. [`init_weights`] or a base model) on `data`;
/// returns the trained tensors. `log(step, loss)` is called after every step.
pub fn train(
    config: &serde_json::Value,
    start: &TensorMap,
    data: &[TrainExample],
    tc: &TrainConfig,
    device: &Device,
    mut log: impl FnMut(usize, f32),
) -> Result<TensorMap> {
    if data.is_empty() {
        return Err(Error::msg("no training examples"));
    }
    let mut vars: Vec<(String, Var)> = Vec::with_capacity(start.len());
    for (name, t) in start {
        vars.push((name.clone(), Var::from_tensor(&t.to_candle(device)?)?));
    }
    let by_name: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let model = Transformer::from_tensors(config, &by_name, device)?;
    let params = ParamsAdamW {
        lr: tc.lr_at(0),
        weight_decay: tc.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let mut rng = StdRng::seed_from_u64(tc.seed);
    for step in 0..tc.steps {
        let batch: Vec<&TrainExample> = (0..tc.batch_size)
            .map(|_| &data[rng.random_range(0..data.len())])
            .collect();
        let (inputs, targets, mask) = make_batch(&batch, tc.pad_id, device)?;
        let logits = model.logits(&inputs)?;
        let loss = lm_loss(&logits, &targets, &mask)?;
        opt.set_learning_rate(tc.lr_at(step));
        opt.backward_step(&loss)?;
        log(step, loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    vars.into_iter()
        .map(|(name, v)| {
            let t = v.as_tensor();
            let shape = t.dims().to_vec();
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((name, TensorBuf::new(shape, data)))
        })
        .collect()
}

/// A tasks file's entries, without loading their dev / test splits.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskSpecs {
    tasks: Vec<TaskSpec>,
}

/// The training examples of `path`: a tasks TOML file (every task's `train.jsonl`, or only the
/// task named `only`) or a task directory holding `train.jsonl` (an `exact_match` task named
/// `only` or after the directory). At most `max_examples` per task (the first ones). Each
/// example is encoded as the LM evaluator prompts it (see [`encode_examples`]). Returns the task
/// names and the examples.
pub fn load_task_examples(
    path: &Path,
    only: Option<&str>,
    tokenizer: &dyn TextTokenizer,
    max_examples: Option<usize>,
) -> Result<(Vec<String>, Vec<TrainExample>)> {
    let specs = if path.is_dir() {
        let name = match only {
            Some(n) => n.to_string(),
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "task".into()),
        };
        vec![TaskSpec::new(name, path, Metric::ExactMatch)]
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: TaskSpecs = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let all: Vec<TaskSpec> = file.tasks.iter().map(|t| t.relative_to(base)).collect();
        match only {
            None => all,
            Some(n) => {
                let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
                let found: Vec<TaskSpec> = all.iter().filter(|t| t.name == n).cloned().collect();
                if found.is_empty() {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        msg: format!("no task named `{n}` (tasks: {})", names.join(", ")),
                    });
                }
                found
            }
        }
    };
    let mut names = Vec::new();
    let mut out = Vec::new();
    for spec in specs {
        let train_path = spec.train_path();
        let contents =
            std::fs::read_to_string(&train_path).map_err(|e| Error::io(&train_path, e))?;
        let examples = tasks::parse_examples(&train_path, &contents, spec.metric, max_examples)?;
        let all_train = if spec.fewshot > 0 {
            tasks::parse_examples(&train_path, &contents, spec.metric, None)?
        } else {
            Vec::new()
        };
        let name = spec.name.clone();
        let task = Task::from_examples_with_train(spec, &all_train, Vec::new(), Vec::new())?;
        let encoded = encode_examples(&task, &examples, tokenizer)
            .map_err(|e| Error::msg(format!("task `{name}`, {}: {e}", train_path.display())))?;
        names.push(name);
        out.extend(encoded);
    }
    Ok((names, out))
}

/// Encode `examples` of `task` as the LM evaluator sees them: the context is the task's
/// rendered prompt ([`render_prompt`]: shots, chat template) with the tokenizer's BOS before it
/// when the evaluator puts one there; the target (loss) is a generation's target followed by
/// EOS, or a choice's correct answer (what `multiple_choice` scores); a text is all target
/// after its BOS (or EOS) start token.
pub fn encode_examples(
    task: &Task,
    examples: &[tasks::Example],
    tok: &dyn TextTokenizer,
) -> Result<Vec<TrainExample>> {
    let context = |prompt: &str| -> Result<Vec<u32>> {
        let (text, add_bos) = render_prompt(task, prompt, tok)?;
        let mut ids: Vec<u32> = tok.bos_id().filter(|_| add_bos).into_iter().collect();
        ids.extend(tok.encode(&text)?);
        if ids.is_empty() {
            ids.extend(tok.eos_id());
        }
        if ids.is_empty() {
            return Err(Error::msg(
                "empty context and the tokenizer has neither BOS nor EOS",
            ));
        }
        Ok(ids)
    };
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let at = |e: Error| Error::msg(format!("example {}: {e}", i + 1));
            Ok(match e {
                tasks::Example::Generation { prompt, target } => {
                    let ctx = context(prompt).map_err(at)?;
                    let mut t = tok.encode(target).map_err(at)?;
                    t.extend(tok.eos_id());
                    if t.is_empty() {
                        return Err(at(Error::msg("empty target and no EOS")));
                    }
                    TrainExample::prompt_target(&ctx, &t)
                }
                tasks::Example::Choice {
                    prompt,
                    choices,
                    answer,
                } => {
                    let ctx = context(prompt).map_err(at)?;
                    let t = tok.encode(&choices[*answer]).map_err(at)?;
                    if t.is_empty() {
                        return Err(at(Error::msg("the correct choice has no tokens")));
                    }
                    TrainExample::prompt_target(&ctx, &t)
                }
                tasks::Example::Text { text } => {
                    let start = tok.bos_id().or(tok.eos_id()).ok_or_else(|| {
                        at(Error::msg("a text needs a BOS or EOS token to start from"))
                    })?;
                    let mut ids = vec![start];
                    ids.extend(tok.encode(text).map_err(at)?);
                    TrainExample::text(&ids)
                }
            })
        })
        .collect()
}

/// Encode `examples` as a plain task prompts them (no shots, no chat template): a generation is
/// `[BOS] prompt` (context) then `target [EOS]` (loss); a choice, its correct answer; a text is
/// all target after its start token. The in-memory counterpart of [`load_task_examples`] (e.g.
/// generated pretraining data); [`encode_examples`] with a task of its own.
pub fn encode_plain(
    examples: &[tasks::Example],
    tok: &dyn TextTokenizer,
) -> Result<Vec<TrainExample>> {
    let task = Task::from_examples(
        TaskSpec::new("plain", "", Metric::ExactMatch),
        Vec::new(),
        Vec::new(),
    )?;
    encode_examples(&task, examples, tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> serde_json::Value {
        serde_json::json!({
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        })
    }

    #[test]
    fn lr_schedule_warms_up_then_decays() {
        let tc = TrainConfig {
            steps: 110,
            warmup: 10,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((tc.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((tc.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((tc.lr_at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn loss_is_masked_cross_entropy() {
        // Uniform logits over 4 classes: every position's loss is ln 4; the mask picks 2 of 3.
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let targets = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 0., 1.]], &dev).unwrap();
        let l = lm_loss(&logits, &targets, &mask).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
        // A confident correct logit lowers it: position 0 has logit 10 on class 0.
        let mut v = vec![0f32; 12];
        v[0] = 10.0;
        let logits = Tensor::from_vec(v, (1, 3, 4), &dev).unwrap();
        let l = lm_loss(&logits, &targets, &mask).unwrap();
        let p0 = -(10f32 - (10f32.exp() + 3.0).ln());
        let want = (p0 + 4f32.ln()) / 2.0;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }

    #[test]
    fn batch_masks_prompt_and_padding() {
        let a = TrainExample::prompt_target(&[1, 5, 6], &[7, 2]);
        let b = TrainExample::text(&[1, 4]);
        let (i, t, m) = make_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap(),
            vec![vec![1, 5, 6, 7], vec![1, 0, 0, 0]]
        );
        assert_eq!(
            t.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 2], vec![4, 0, 0, 0]]
        );
        assert_eq!(
            m.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 1., 1.], vec![1., 0., 0., 0.]]
        );
    }

    #[test]
    fn training_memorises_a_sequence_deterministically() {
        let config = tiny_config();
        let cfg = LlamaConfig::from_json(&config).unwrap();
        let init = init_weights(&cfg, 7);
        let data = vec![
            TrainExample::text(&[1, 3, 5, 7, 2]),
            TrainExample::text(&[1, 4, 6, 2]),
        ];
        let tc = TrainConfig {
            steps: 60,
            batch_size: 4,
            lr: 1e-2,
            warmup: 5,
            seed: 3,
            ..TrainConfig::default()
        };
        let mut losses = Vec::new();
        let out = train(&config, &init, &data, &tc, &Device::Cpu, |_, l| {
            losses.push(l)
        })
        .unwrap();
        assert!(losses[0] > 1.5, "start near ln 8: {}", losses[0]);
        assert!(*losses.last().unwrap() < 0.8, "{losses:?}");
        // Every tensor moved (gradients reach all of them).
        for (name, t) in &out {
            assert_ne!(t, &init[name], "{name} did not change");
        }
        let mut again = Vec::new();
        let out2 = train(&config, &init, &data, &tc, &Device::Cpu, |_, l| {
            again.push(l)
        })
        .unwrap();
        assert_eq!(losses, again);
        assert_eq!(out, out2);
    }

    #[test]
    fn task_examples_are_encoded_as_the_evaluator_prompts_them() {
        let tok = crate::tokenizer::CharTokenizer::new();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("add");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("train.jsonl"),
            "{\"prompt\":\"1+2=\",\"target\":\"3\"}\n{\"prompt\":\"2+2=\",\"target\":\"4\"}\n",
        )
        .unwrap();
        let (names, ex) = load_task_examples(&dir, None, &tok, Some(1)).unwrap();
        assert_eq!(names, vec!["add"]);
        assert_eq!(ex.len(), 1);
        let mut prompt = vec![tok.bos_id().unwrap()];
        prompt.extend(tok.encode("1+2=").unwrap());
        let mut target = tok.encode("3").unwrap();
        target.push(tok.eos_id().unwrap());
        assert_eq!(ex[0], TrainExample::prompt_target(&prompt, &target));
        // From a tasks file with few-shot: the shots come before the prompt.
        std::fs::write(
            tmp.path().join("tasks.toml"),
            "[[tasks]]\nname = \"add\"\npath = \"add\"\nmetric = \"exact_match\"\nfewshot = 1\n",
        )
        .unwrap();
        let (_, ex) =
            load_task_examples(&tmp.path().join("tasks.toml"), Some("add"), &tok, None).unwrap();
        assert_eq!(ex.len(), 2);
        let n_prompt = ex[0].loss_mask.iter().filter(|m| !**m).count();
        assert!(n_prompt > 1 + 4 + 1, "shots prefixed: {n_prompt}");
        let err = load_task_examples(&tmp.path().join("tasks.toml"), Some("nope"), &tok, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no task named `nope`"), "{err}");
    }
}
