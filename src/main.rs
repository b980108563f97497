//! The `evomerge` command line. `main` returns an exit code; `run` returns `anyhow::Result`, and
//! errors are printed with their whole chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use evomerge::device::DeviceSpec;
use evomerge::merge::executor::{ComputeDtype, MergeOptions, merge_to_disk};
use evomerge::recipe::Recipe;
use evomerge::store::ModelSet;
use evomerge::tensor::DType;

/// Find model-merge recipes by evolution; merge models with mergekit-compatible recipes.
#[derive(Parser)]
#[command(name = "evomerge", version, about)]
struct Cli {
    /// Worker threads, 1 to 1024 (default: all cores).
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models with a mergekit YAML recipe and write a Hugging Face model directory.
    Merge {
        /// The recipe (mergekit YAML). Model paths are relative to the recipe's directory.
        recipe: PathBuf,
        /// Output directory (must not exist).
        out_dir: PathBuf,
        /// Seed for the random methods (DARE, DELLA).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest shard, in bytes (suffixes K, M, G accepted: 5G = 5_000_000_000).
        #[arg(long, default_value = "5G", value_parser = parse_size)]
        max_shard_size: u64,
        /// Output dtype (overrides the recipe's out_dtype / dtype).
        #[arg(long)]
        out_dtype: Option<DType>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Git Re-Basin first: permute every other model's hidden units to match the base model
        /// (or the first model) before merging (Ainsworth et al. 2023). The aligned models live
        /// in memory only.
        #[arg(long)]
        align: bool,
        /// Write the merge even when it produces non-finite values (NaN, inf, or values too
        /// large for the output dtype); by default such a merge fails naming the tensor.
        #[arg(long)]
        allow_nonfinite: bool,
        /// The arithmetic: `f32` (compute in f32, round only the output; the default) or
        /// `recipe` (mergekit's, in the recipe's `dtype`: with `dtype: bfloat16` every step
        /// rounded to bf16, bit-identical to mergekit). `recipe` is implemented for linear and
        /// task_arithmetic; other methods with a bf16 / f16 recipe dtype fail before writing.
        #[arg(long, default_value = "f32")]
        compute_dtype: ComputeDtype,
    },
    /// Run an evolutionary search (`searches/*.toml`): CMA-ES proposes recipes, candidates are
    /// built in memory and scored on the dev split; writes history, plots, the best recipe, the
    /// merged model and a test-split report to the output directory.
    Search {
        /// The search definition.
        search: PathBuf,
        /// Output directory (default: the definition's `output`, else runs/NAME beside searches/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress: no bar on a terminal, no line per generation otherwise.
        #[arg(long)]
        quiet: bool,
        /// Run the LM evaluator here instead of the definition's `[evaluator] device`: cpu, cuda
        /// (every GPU, slot i on GPU i mod n) or cuda:N.
        #[arg(long)]
        device: Option<DeviceSpec>,
    },
    /// Continue a killed search from its output directory; reaches the same result as an
    /// uninterrupted run.
    Resume {
        out_dir: PathBuf,
        /// No progress: no bar on a terminal, no line per generation otherwise.
        #[arg(long)]
        quiet: bool,
        /// Override the saved `[evaluator] device` (cpu, cuda, cuda:N); recorded in search.toml.
        #[arg(long)]
        device: Option<DeviceSpec>,
    },
    /// Print a finished search's report (sources, default merge, evolved recipe on the test split).
    Report { out_dir: PathBuf },
    /// Redraw a search's plots (PNG and SVG) from its history.
    Plot { out_dir: PathBuf },
    /// List the merge methods with their declared parameters (a Markdown table).
    Methods,
    /// Describe a model directory: architecture, layers, parameters, dtypes, size on disk.
    Inspect {
        /// A Hugging Face model directory.
        model_dir: PathBuf,
    },
    /// Convert a llama.cpp GGUF checkpoint (llama / qwen2, byte-level BPE tokenizer, any
    /// quantization, dequantized) into a Hugging Face model directory: safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json.
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (must not exist).
        out_dir: PathBuf,
        /// Dtype of the written tensors.
        #[arg(long, default_value = "bf16")]
        dtype: DType,
    },
    /// Git Re-Basin weight matching (Ainsworth et al. 2023): permute OTHER's hidden units to
    /// match REF and write the (functionally identical) permuted model to OUT.
    Align {
        reference: PathBuf,
        other: PathBuf,
        out: PathBuf,
        /// Seed of the random group order of the coordinate descent.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most sweeps over all permutation groups.
        #[arg(long, default_value_t = 100)]
        max_sweeps: usize,
    },
    /// Model soup / SWA: the plain average of checkpoints of one architecture (a `linear` merge
    /// with equal weights, streamed to disk; the recipe goes in the model card), of all of them
    /// or of a greedy selection (`--greedy TASKS.toml`).
    Soup {
        /// Output directory (must not exist).
        out: PathBuf,
        /// The checkpoints to average.
        #[arg(required = true, num_args = 1..)]
        models: Vec<PathBuf>,
        /// Output dtype (default: the first model's).
        #[arg(long)]
        out_dtype: Option<DType>,
        /// Greedy soup (Wortsman et al. 2022) instead of uniform: rank the models by dev score on
        /// these tasks (a `--tasks` file as for `eval`) and add each only if the running
        /// average's dev score strictly improves.
        #[arg(long, value_name = "TASKS.toml")]
        greedy: Option<PathBuf>,
        /// How `--greedy` runs the models.
        #[command(flatten)]
        lm: LmArgs,
    },
    /// Compute a causal LM's diagonal Fisher on task examples and write MODEL/fisher.safetensors
    /// (what `merge_method: fisher` reads).
    Fisher {
        /// The model directory.
        model: PathBuf,
        /// A tasks TOML file (as for `eval`) whose examples the Fisher is taken over.
        #[arg(long)]
        tasks: PathBuf,
        /// Which split's examples (dev or test).
        #[arg(long, default_value = "dev")]
        split: String,
        /// At most this many examples per task (the first ones).
        #[arg(long, default_value_t = 256)]
        max_examples: usize,
        /// Rescale the Fisher to mean 1 over all entries (see `merge::fisher::normalize_fisher`).
        #[arg(long)]
        normalize: bool,
        /// Where the forward and backward run: cpu, cuda (the first GPU) or cuda:N (in f32).
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// LoRA fine-tuning: train low-rank adapters on a frozen base model over tasks' train.jsonl
    /// (encoded exactly as `eval` prompts them; loss on the target + EOS) and write a PEFT
    /// adapter directory (adapter_config.json, adapter_model.safetensors).
    Finetune(FinetuneArgs),
    /// Score model directories and merge recipes (built in memory, in the inputs' dtype) on
    /// held-out tasks; prints a Markdown table per task and split.
    Eval {
        /// A TOML file with `[[tasks]]` entries (name, path, metric, weight, max_new_tokens,
        /// stop, limit); paths relative to the file.
        #[arg(long)]
        tasks: PathBuf,
        /// Model directories, recipe files (.yml / .yaml) and/or DFS route files (a search's
        /// best_route.json).
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Seed for random merge methods in recipes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only this split (dev or test); default both.
        #[arg(long)]
        split: Option<String>,
        #[command(flatten)]
        lm: LmArgs,
    },
}

/// `evomerge finetune` (see [`finetune_command`]).
#[derive(clap::Args, Clone, Debug)]
struct FinetuneArgs {
    /// The base model directory (frozen).
    base: PathBuf,
    /// A tasks TOML file (as for `eval`; each task's train.jsonl is used) or a task directory
    /// holding train.jsonl (an exact_match task).
    tasks: PathBuf,
    /// Output adapter directory (must not exist).
    out: PathBuf,
    /// Train on this task of the tasks file only (default: every task).
    #[arg(long)]
    task: Option<String>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha (scale alpha / r, or alpha / sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// Linear modules to adapt, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    target_modules: Vec<String>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warm-up steps, then cosine decay to lr / 10.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// AdamW weight decay (on the adapter weights).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seeds the adapter initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// At most this many examples per task (the first ones of train.jsonl).
    #[arg(long)]
    max_examples: Option<usize>,
    /// Print the loss every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Where training runs: cpu, cuda (the first GPU) or cuda:N (in f32).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// The `base_model_name_or_path` written into adapter_config.json, e.g. a Hugging Face hub
    /// id (default: BASE as given on the command line).
    #[arg(long)]
    base_name: Option<String>,
}

/// `evomerge finetune`: LoRA adapters trained on the tasks' train splits, saved for PEFT.
fn finetune_command(a: &FinetuneArgs) -> anyhow::Result<()> {
    use evomerge::model::lora::{LoraConfig, train_lora};
    use evomerge::model::train::TrainConfig;
    use evomerge::model::train::load_task_examples;

    anyhow::ensure!(
        !a.out.exists(),
        "{}: the output directory already exists",
        a.out.display()
    );
    let lora = LoraConfig {
        rank: a.lora_rank,
        alpha: a.lora_alpha,
        rslora: a.rslora,
        target_modules: a.target_modules.clone(),
    };
    let tokenizer = evomerge::tokenizer::load_tokenizer(&a.base)?;
    let (names, examples) = load_task_examples(
        &a.tasks,
        a.task.as_deref(),
        tokenizer.as_ref(),
        a.max_examples,
    )?;
    let model = evomerge::candidate::MemModel::read_dir(&a.base)?;
    // Check the modules before anything slow (the error lists the model's linear modules).
    lora.targets(&evomerge::model::LlamaConfig::from_json(&model.config)?)
        .with_context(|| format!("{}", a.base.display()))?;
    let device = open_device(&a.device)?;
    let tc = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup: a.warmup,
        min_lr_ratio: 0.1,
        weight_decay: a.weight_decay,
        seed: a.seed,
        pad_id: 0,
    };
    let targets: usize = examples
        .iter()
        .map(|e| e.loss_mask.iter().skip(1).filter(|m| **m).count())
        .sum();
    eprintln!(
        "fine-tuning {} on {} examples ({} target tokens) of {}: rank {}, alpha {}, scale {:.4}, \
         modules {}",
        a.base.display(),
        examples.len(),
        targets,
        names.join(", "),
        lora.rank,
        lora.alpha,
        lora.scale(),
        lora.target_modules.join(",")
    );
    let start = std::time::Instant::now();
    let mut last = f32::NAN;
    let every = a.log_every.max(1);
    let mut adapter = train_lora(
        &model.config,
        &model.tensors,
        &examples,
        &lora,
        &tc,
        &device,
        |step, loss, lr| {
            last = loss;
            if (step + 1) % every == 0 || step == 0 || step + 1 == tc.steps {
                eprintln!(
                    "step {:>5}/{}  loss {loss:.4}  lr {lr:.2e}  {:.1} s",
                    step + 1,
                    tc.steps,
                    start.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let per_step = secs / a.steps.max(1) as f64;
    adapter.notes = vec![
        format!("base: {}", a.base.display()),
        format!("tasks: {} ({})", a.tasks.display(), names.join(", ")),
        format!("examples: {} ({targets} target tokens)", examples.len()),
        format!(
            "steps {}, batch size {}, lr {} (warm-up {}, cosine to lr/10), weight decay {}, seed {}",
            a.steps, a.batch_size, a.lr, a.warmup, a.weight_decay, a.seed
        ),
        format!("final loss {last:.4}; {per_step:.3} s/step on {}", a.device),
    ];
    let base_name = a
        .base_name
        .clone()
        .unwrap_or_else(|| a.base.display().to_string());
    let out = adapter.save_peft(&a.out, &base_name)?;
    eprintln!(
        "{} steps in {secs:.1} s ({per_step:.3} s/step); final loss {last:.4}; wrote {}",
        a.steps,
        out.display()
    );
    Ok(())
}

/// How the LM evaluator runs a model (`eval`, `soup --greedy`).
#[derive(clap::Args, Clone, Debug)]
struct LmArgs {
    /// Where the forward runs: cpu, cuda (the first GPU) or cuda:N. GPUs need a build with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype of the forward: f32, bf16 or f16 (weights are cast as the model is built).
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Sequences per forward call (tasks may set their own).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Longest sequence an example may need; longer ones are an error before anything runs.
    /// Default: the model's config.json `max_position_embeddings`.
    #[arg(long)]
    max_length: Option<usize>,
}

fn is_recipe(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "yml" || e == "yaml")
}

/// The LM evaluator for a `--tasks` file, with the tokenizer (and the default `max_length`) of
/// the model in `model_dir`.
fn lm_evaluator(
    tasks: &std::path::Path,
    model_dir: &std::path::Path,
    args: &LmArgs,
) -> anyhow::Result<evomerge::eval::lm::LmEvaluator> {
    use evomerge::eval::lm::{LmConfig, LmEvaluator};

    let loaded = evomerge::eval::tasks::load_task_file(tasks)?;
    let tokenizer = evomerge::tokenizer::load_tokenizer(model_dir)?;
    let config = LmConfig {
        device: open_device(&args.device)?,
        dtype: args.dtype.into(),
        batch_size: args.batch_size,
        max_length: args
            .max_length
            .or_else(|| evomerge::search::run::model_max_length(model_dir)),
    };
    Ok(LmEvaluator::try_new(
        loaded,
        std::sync::Arc::from(tokenizer),
        config,
    )?)
}

/// The first device of a `--device` spec, the error naming the flag.
fn open_device(spec: &DeviceSpec) -> anyhow::Result<candle_core::Device> {
    spec.open().with_context(|| format!("--device {spec}"))
}

/// `evomerge fisher`: the model's diagonal Fisher over task examples, beside the model.
fn fisher_command(
    model_dir: &std::path::Path,
    tasks: &std::path::Path,
    split: &str,
    max_examples: usize,
    normalize: bool,
    device: &DeviceSpec,
) -> anyhow::Result<()> {
    use evomerge::merge::fisher::{
        FISHER_FILE, lm_examples, lm_fisher, normalize_fisher, save_fisher,
    };

    let split = match split {
        "dev" => evomerge::eval::Split::Dev,
        "test" => evomerge::eval::Split::Test,
        other => anyhow::bail!("unknown split `{other}` (dev or test)"),
    };
    let tokenizer = evomerge::tokenizer::load_tokenizer(model_dir)?;
    let mut examples = Vec::new();
    for task in evomerge::eval::tasks::load_task_file(tasks)? {
        let take = &task.examples(split)[..task.examples(split).len().min(max_examples)];
        examples.extend(
            lm_examples(take, tokenizer.as_ref())
                .with_context(|| format!("task `{}`", task.spec.name))?,
        );
    }
    let device = open_device(device)?;
    let model = evomerge::candidate::MemModel::read_dir(model_dir)?;
    let start = std::time::Instant::now();
    let mut fisher = lm_fisher(&model, &examples, &device)?;
    if normalize {
        normalize_fisher(&mut fisher);
    }
    save_fisher(model_dir, &fisher)?;
    eprintln!(
        "Fisher over {} examples in {:.1} s; wrote {}",
        examples.len(),
        start.elapsed().as_secs_f64(),
        model_dir.join(FISHER_FILE).display()
    );
    Ok(())
}

/// `evomerge eval`: build each candidate (recipes merged in memory), score both splits, print.
fn eval_command(
    tasks: &std::path::Path,
    models: &[PathBuf],
    seed: u64,
    split: Option<&str>,
    lm: &LmArgs,
) -> anyhow::Result<()> {
    use std::sync::Arc;

    use evomerge::candidate::{Candidate, CandidateBody};
    use evomerge::eval::Split;
    use evomerge::eval::table::{EvalTable, PRIMARY};
    use evomerge::merge::executor::merge_in_memory;

    let mut set = ModelSet::new();
    let mut candidates = Vec::new();
    let mut tokenizer_dir = None;
    for path in models {
        let label = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        if path.extension().is_some_and(|e| e == "json") {
            let (candidate, tok) = route_candidate(path, &mut set, seed)?;
            tokenizer_dir.get_or_insert(tok);
            candidates.push((label, candidate));
        } else if is_recipe(path) {
            let recipe = Recipe::from_path(path)?;
            let merged = merge_in_memory(&recipe, &mut set, seed)
                .with_context(|| format!("merging {}", path.display()))?;
            if tokenizer_dir.is_none() {
                tokenizer_dir = recipe
                    .base_model
                    .as_ref()
                    .or_else(|| recipe.referenced_models().first().copied())
                    .map(|m| evomerge::store::lora::base_dir_of(&m.path));
            }
            candidates.push((
                label,
                Candidate {
                    body: CandidateBody::Merged(Arc::new(merged)),
                    recipe: Some(recipe.to_yaml()),
                },
            ));
        } else {
            tokenizer_dir.get_or_insert_with(|| evomerge::store::lora::base_dir_of(path));
            candidates.push((
                label,
                Candidate {
                    body: CandidateBody::Dir(path.clone()),
                    recipe: None,
                },
            ));
        }
    }
    let tokenizer_dir = tokenizer_dir.context("no model directory to take the tokenizer from")?;
    let evaluator = lm_evaluator(tasks, &tokenizer_dir, lm)?;
    let splits = match split {
        None => vec![Split::Dev, Split::Test],
        Some("dev") => vec![Split::Dev],
        Some("test") => vec![Split::Test],
        Some(other) => anyhow::bail!("unknown split `{other}` (dev or test)"),
    };
    let mut metrics = evaluator.metric_keys();
    metrics.push(PRIMARY.to_string());
    let labels = candidates.iter().map(|(l, _)| l.clone()).collect();
    let progress = EvalProgress::new(&evaluator, labels, splits.len());
    let table = EvalTable::score(&progress, &candidates, &metrics, &splits);
    progress.finish();
    write_stdout(&table.to_markdown())?;
    // The table shows every failure; a run in which nothing could be scored is an error.
    if let Some(first) = table.rows.iter().find(|r| !r.errors.is_empty())
        && table.rows.iter().all(|r| !r.errors.is_empty())
    {
        anyhow::bail!(
            "every model failed to evaluate; the first ({}): {}",
            first.label,
            first.errors[0]
        );
    }
    Ok(())
}

/// `eval`'s progress on stderr, one step per model and split: a bar on a terminal, else a line
/// each (`eval 3/6 · add · dev · primary 0.8250 · 0.4s · elapsed 1.2s · ETA 2.4s`). Wraps the
/// evaluator [`EvalTable::score`](evomerge::eval::table::EvalTable::score) calls model by model,
/// split by split.
struct EvalProgress<'a> {
    inner: &'a dyn evomerge::eval::Evaluator,
    labels: Vec<String>,
    splits: usize,
    done: std::sync::atomic::AtomicUsize,
    start: std::time::Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> EvalProgress<'a> {
    fn new(
        inner: &'a dyn evomerge::eval::Evaluator,
        labels: Vec<String>,
        splits: usize,
    ) -> EvalProgress<'a> {
        use std::io::IsTerminal;
        let total = (labels.len() * splits) as u64;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} model × split · ETA {eta} · {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        EvalProgress {
            inner,
            labels,
            splits: splits.max(1),
            done: std::sync::atomic::AtomicUsize::new(0),
            start: std::time::Instant::now(),
            bar,
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl evomerge::eval::Evaluator for EvalProgress<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn evaluate(
        &self,
        candidate: &evomerge::candidate::Candidate,
        split: evomerge::eval::Split,
    ) -> Result<evomerge::eval::Score, evomerge::eval::EvalError> {
        let t = std::time::Instant::now();
        let score = self.inner.evaluate(candidate, split);
        let n = self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let total = self.labels.len() * self.splits;
        let label = self
            .labels
            .get((n - 1) / self.splits)
            .map_or("?", String::as_str);
        let result = match &score {
            Ok(s) => format!("primary {:.4}", s.primary),
            Err(_) => "failed".to_string(),
        };
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = elapsed / n as f64 * total.saturating_sub(n) as f64;
        match &self.bar {
            Some(bar) => {
                bar.set_position(n as u64);
                bar.set_message(format!("{label} · {split} · {result}"));
            }
            None => eprintln!(
                "eval {n}/{total} · {label} · {split} · {result} · {:.1}s · elapsed {elapsed:.1}s · \
                 ETA {eta:.1}s",
                t.elapsed().as_secs_f64()
            ),
        }
        score
    }
}

/// A DFS / PS+DFS result file (`best_route.json`) as a candidate: its pool models loaded (a
/// `ps:` entry merged from its recipe) and its route; also the directory to take the tokenizer
/// from (the first pool model's).
fn route_candidate(
    path: &std::path::Path,
    set: &mut ModelSet,
    seed: u64,
) -> anyhow::Result<(evomerge::candidate::Candidate, PathBuf)> {
    use std::sync::Arc;

    use evomerge::candidate::{Candidate, CandidateBody};
    use evomerge::search::run::RouteFile;
    use evomerge::store::lora::{base_dir_of, resolve_ref};

    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let file: RouteFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a route file (best_route.json)", path.display()))?;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut models = Vec::with_capacity(file.models.len());
    let mut tokenizer_dir = None;
    for name in &file.models {
        let model = match name.strip_prefix("ps:") {
            Some(recipe) => {
                let recipe_path = resolve_ref(std::path::Path::new(recipe), Some(dir));
                let recipe = Recipe::from_path(&recipe_path)?;
                tokenizer_dir.get_or_insert_with(|| {
                    let first = recipe.referenced_models().first().map(|m| m.path.clone());
                    base_dir_of(&first.unwrap_or_default())
                });
                evomerge::merge::executor::merge_in_memory(&recipe, set, seed)
                    .with_context(|| format!("merging {}", recipe_path.display()))?
            }
            None => {
                let model_path = resolve_ref(std::path::Path::new(name), Some(dir));
                tokenizer_dir.get_or_insert_with(|| base_dir_of(&model_path));
                evomerge::store::load_mem(&model_path)
                    .with_context(|| format!("{}: pool model `{name}`", path.display()))?
            }
        };
        models.push(Arc::new(model));
    }
    let tokenizer_dir = tokenizer_dir
        .with_context(|| format!("{}: the route file lists no models", path.display()))?;
    let candidate = Candidate {
        body: CandidateBody::Routed {
            models,
            route: file.route,
        },
        recipe: Some(text),
    };
    Ok((candidate, tokenizer_dir))
}

/// The most worker threads `--threads` accepts: far more than any useful value; more only
/// costs (2,000 threads made a 0.02 s merge take 12 s).
const MAX_THREADS: usize = 1024;

fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(format!("{n} is outside 1..={MAX_THREADS}"));
    }
    Ok(n)
}

/// `5000`, `5K`, `500M`, `5G` (decimal units, as mergekit's 5_000_000_000 default).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1_000,
                'M' => 1_000_000,
                'G' => 1_000_000_000,
                _ => return Err(format!("unknown size suffix `{c}` (use K, M or G)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` is not a size in bytes"))?;
    n.checked_mul(mult)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a usable shard size"))
}

/// Align every model of `recipe` to its base (or first) model and register the permuted copies
/// in `models`, so the merge reads them instead of the files.
fn align_inputs(recipe: &Recipe, models: &mut ModelSet, seed: u64) -> anyhow::Result<()> {
    use evomerge::align::{MatchConfig, align};
    use evomerge::store::load_mem_f32;

    let refs = recipe.referenced_models();
    let reference = recipe
        .base_model
        .as_ref()
        .or_else(|| refs.first().copied())
        .context("the recipe names no model to align to")?
        .path
        .clone();
    let target = load_mem_f32(&reference)?;
    let config = MatchConfig {
        seed,
        ..MatchConfig::default()
    };
    let mut done = std::collections::BTreeSet::new();
    for m in refs {
        if m.path == reference || !done.insert(m.path.clone()) {
            continue;
        }
        let (aligned, matching) = align(&target, &load_mem_f32(&m.path)?, &config)
            .with_context(|| format!("aligning {} to {}", m.path.display(), reference.display()))?;
        eprintln!(
            "aligned {} to {}: {} permutation groups, {} sweeps",
            m.name,
            reference.display(),
            matching.perms.len(),
            matching.sweeps
        );
        models.insert(m.path.clone(), std::sync::Arc::new(aligned));
    }
    Ok(())
}

/// The end of a search: where things are, and the report.
fn print_summary(
    out_dir: &std::path::Path,
    summary: &evomerge::search::run::RunSummary,
) -> anyhow::Result<()> {
    let best = summary
        .best
        .fitness
        .map_or_else(|| "none".to_string(), |f| format!("{f:.4}"));
    eprintln!(
        "best dev fitness {best} after {} generations ({} evaluated, {} from history, {} failed); outputs in {}",
        summary.generations,
        summary.evaluated,
        summary.replayed,
        summary.failures,
        out_dir.display()
    );
    if summary.test_rows.is_some() {
        write_stdout(&evomerge::report::report(out_dir)?)?;
    }
    Ok(())
}

/// Write command output to stdout and flush it. Unlike `print!`, which panics when stdout is
/// gone, a failed write is an error: a closed pipe (`evomerge inspect M | head -1`) is a
/// `BrokenPipe` that `main` turns into a quiet exit, anything else (`> /dev/full`: no space left)
/// is reported and exits non-zero.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// The registry as a Markdown table, straight from each method's declarations.
fn methods_table() -> String {
    use evomerge::merge::{BaseUse, ParamKind, Scope, registry};
    let mut out = String::from(
        "| method | base model | models | global parameters | per-model parameters |\n|---|---|---|---|---|\n",
    );
    for m in registry() {
        let base = match m.base() {
            BaseUse::Required => "required",
            BaseUse::Optional => "optional",
            BaseUse::OptionalApart => "optional",
        };
        let models = match m.model_count() {
            (lo, Some(hi)) if lo == hi => format!("{lo}"),
            (lo, Some(hi)) => format!("{lo}–{hi}"),
            (lo, None) => format!("≥ {lo}"),
        };
        let params = |scope: Scope| {
            let list: Vec<String> = m
                .params()
                .iter()
                .filter(|p| p.scope == scope)
                .map(|p| {
                    let default = match (p.default, p.kind) {
                        (None, _) => "required".to_string(),
                        (Some(v), ParamKind::Bool) => format!("{}", v != 0.0),
                        (Some(v), _) => format!("{v}"),
                    };
                    let range = match p.kind {
                        ParamKind::Float { min, max } => format!(" in [{min}, {max}]"),
                        ParamKind::Bool => String::new(),
                    };
                    let range = if p.searched || p.kind == ParamKind::Bool {
                        range
                    } else {
                        format!("{range} (searched only when named)")
                    };
                    format!("`{}` = {default}{range}", p.name)
                })
                .collect();
            if list.is_empty() {
                "—".to_string()
            } else {
                list.join(", ")
            }
        };
        out.push_str(&format!(
            "| `{}` | {base} | {models} | {} | {} |\n",
            m.name(),
            params(Scope::Global),
            params(Scope::PerModel)
        ));
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.command {
        Command::Merge {
            recipe,
            out_dir,
            seed,
            max_shard_size,
            out_dtype,
            quiet,
            align,
            allow_nonfinite,
            compute_dtype,
        } => {
            let parsed = Recipe::from_path(&recipe)?;
            let mut models = ModelSet::new();
            if align {
                align_inputs(&parsed, &mut models, seed)?;
            }
            let options = MergeOptions {
                seed,
                out_dtype,
                max_shard_size,
                progress: !quiet,
                allow_nonfinite,
                compute_dtype,
                ..MergeOptions::default()
            };
            let out = merge_to_disk(&parsed, &mut models, &out_dir, &options)
                .with_context(|| format!("merging {}", recipe.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Command::Eval {
            tasks,
            models,
            seed,
            split,
            lm,
        } => eval_command(&tasks, &models, seed, split.as_deref(), &lm)?,
        Command::Fisher {
            model,
            tasks,
            split,
            max_examples,
            normalize,
            device,
        } => fisher_command(&model, &tasks, &split, max_examples, normalize, &device)?,
        Command::Finetune(args) => finetune_command(&args)?,
        Command::Align {
            reference,
            other,
            out,
            seed,
            max_sweeps,
        } => {
            let config = evomerge::align::MatchConfig { max_sweeps, seed };
            let m = evomerge::align::align_dirs(&reference, &other, &out, &config)?;
            eprintln!(
                "aligned {} permutation groups in {} sweeps: Σ⟨W_ref, W_other⟩ {:.4} → {:.4}; wrote {}",
                m.perms.len(),
                m.sweeps,
                m.before,
                m.after,
                out.display()
            );
        }
        Command::Soup {
            out,
            mut models,
            out_dtype,
            greedy,
            lm,
        } => {
            if let Some(tasks) = greedy {
                let evaluator = lm_evaluator(&tasks, &models[0], &lm)?;
                let loaded = models
                    .iter()
                    .map(|m| evomerge::candidate::MemModel::read_dir(m))
                    .collect::<evomerge::Result<Vec<_>>>()?;
                let refs: Vec<_> = loaded.iter().collect();
                let soup = evomerge::merge::soup::greedy_soup(&refs, &evaluator)?;
                for (m, score) in models.iter().zip(&soup.individual) {
                    eprintln!("dev {score:.4}  {}", m.display());
                }
                eprintln!(
                    "greedy soup: {} of {} models, dev {:.4}",
                    soup.members.len(),
                    models.len(),
                    soup.score
                );
                models = soup.members.iter().map(|&i| models[i].clone()).collect();
            }
            let cwd = std::env::current_dir().context("current directory")?;
            let mut yaml = String::from("merge_method: linear\nmodels:\n");
            for m in &models {
                let abs = cwd.join(m);
                yaml.push_str(&format!(
                    "  - model: {}\n    parameters:\n      weight: 1.0\n",
                    serde_json::to_string(&abs.display().to_string())?
                ));
            }
            let recipe = Recipe::from_str(&yaml, None)?;
            let options = MergeOptions {
                out_dtype,
                progress: true,
                ..MergeOptions::default()
            };
            let written = merge_to_disk(&recipe, &mut ModelSet::new(), &out, &options)?;
            eprintln!(
                "averaged {} models into {}",
                models.len(),
                written.display()
            );
        }
        Command::Search {
            search,
            out,
            quiet,
            device,
        } => {
            let def = evomerge::search::def::SearchDef::load(&search)?;
            let out_dir = out.unwrap_or_else(|| def.output_dir());
            let options = evomerge::search::run::RunOptions {
                progress: !quiet,
                device,
                ..Default::default()
            };
            let summary = evomerge::pipeline::run_search(&def, &out_dir, &options)
                .with_context(|| format!("search {}", search.display()))?;
            print_summary(&out_dir, &summary)?;
        }
        Command::Resume {
            out_dir,
            quiet,
            device,
        } => {
            let options = evomerge::search::run::RunOptions {
                progress: !quiet,
                device,
                ..Default::default()
            };
            let summary = evomerge::pipeline::resume(&out_dir, &options)
                .with_context(|| format!("resuming {}", out_dir.display()))?;
            print_summary(&out_dir, &summary)?;
        }
        Command::Report { out_dir } => write_stdout(&evomerge::report::report(&out_dir)?)?,
        Command::Plot { out_dir } => {
            for p in evomerge::report::plots::plot(&out_dir)? {
                eprintln!("wrote {}", p.display());
            }
        }
        Command::Methods => write_stdout(&methods_table())?,
        Command::ImportGguf {
            file,
            out_dir,
            dtype,
        } => {
            let config = evomerge::store::gguf::ImportConfig { dtype };
            let s = evomerge::store::gguf::import_gguf(&file, &out_dir, &config)?;
            eprintln!(
                "imported {} tensors of a {} model ({:?}), {} tokens; wrote {}",
                s.tensors,
                s.arch,
                s.ggml_types,
                s.vocab,
                s.dir.display()
            );
        }
        Command::Inspect { model_dir } => {
            let summary = evomerge::store::inspect(&model_dir)?;
            let mut text = summary.to_string();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            write_stdout(&text)?;
        }
    }
    Ok(())
}

/// Size candle's elementwise worker pool for the command. candle's CPU backend parallelises in
/// two ways: matmuls (gemm) split over the caller's rayon pool — the threads our batches, slots
/// and merges run on — while `CANDLE_NUM_THREADS` sizes a separate pool of spinning workers that
/// large elementwise ops (≥ 64K elements) hand their work to, one caller at a time. Scoring one
/// model at a time (`eval`, `fisher`, `soup --greedy`, a one-slot search) keeps candle's default
/// (the core count): long sequences ran 8 % faster with it, short ones the same. Concurrent
/// evaluations (`slots ≥ 2`) get 1: their threads already fill the cores, and the extra spinning
/// workers and that pool's one-caller lock only slow them (a toy search on a loaded 2-core
/// machine: 11.3 s with 1, 18.7 s with 2). A `CANDLE_NUM_THREADS` already set is kept.
fn size_candle_pool(command: &Command) {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return;
    }
    let slots = match command {
        Command::Search { search, .. } => evomerge::search::def::SearchDef::load(search)
            .ok()
            .map(|d| d.parallelism.slots),
        Command::Resume { out_dir, .. } => evomerge::search::run::load_saved_def(out_dir)
            .ok()
            .map(|d| d.parallelism.slots),
        _ => None,
    };
    if slots.is_some_and(|s| s >= 2) {
        // SAFETY: called from `main` before any other thread exists (parsing the arguments and
        // reading a TOML file start none).
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    size_candle_pool(&cli.command);
    // Before any thread starts (and after the last `set_var`): SIGINT / SIGTERM end evaluators,
    // Slurm jobs and scratch directories, then exit 130 / 143 (see evomerge::procs).
    evomerge::procs::install_signal_cleanup();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
