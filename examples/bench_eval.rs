//! The LM evaluator on a real checkpoint, side by side with transformers doing the same work the
//! usual way, in one run and on the same number of threads.
//!
//! ```text
//! scripts/fetch-smollm2.sh                       # SmolLM2-135M-Instruct → target/smollm2/model
//! python3 -m venv /work/venv && /work/venv/bin/pip install torch transformers gguf
//! cargo run --release --example bench_eval -- --python /work/venv/bin/python
//! ```
//!
//! Work (texts generated from a seed, so both sides read the same strings):
//! - perplexity: 64 texts of 128 tokens;
//! - multiple choice: 50 items × 4 choices (log-likelihood of each choice after its context);
//! - greedy generation: 16 prompts of ~100 tokens × 16 / 64 / 128 new tokens, EOS ignored on both
//!   sides so both generate exactly that many tokens.
//!
//! Ours: [`LmEvaluator`] (tasks scored by `score_model`, generation by `generate`: KV cache,
//! head on scored positions only). Theirs: `scripts/bench_eval_transformers.py` (full-vocabulary
//! logits and `model.generate`, float32, `torch.set_num_threads(T)`). Each side runs in its own
//! process so its peak RSS is its own; ours is read after all phases (`getrusage`). The table
//! gives seconds per phase and our time / theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use evomerge::eval::Split;
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::tasks::{Example, Metric, Task, TaskSpec};
use evomerge::model::Transformer;
use evomerge::tokenizer::TextTokenizer;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

struct Args {
    model: PathBuf,
    python: Option<PathBuf>,
    lengths: Vec<usize>,
    threads: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: PathBuf::from("target/smollm2/model"),
        python: Some(PathBuf::from("/work/venv/bin/python")),
        lengths: vec![16, 64, 128],
        threads: rayon::current_num_threads(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--model" => a.model = v()?.into(),
            "--python" => a.python = Some(v()?.into()),
            "--no-python" => a.python = None,
            "--lengths" => a.lengths = v()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            other => anyhow::bail!(
                "unknown argument {other} (--model DIR, --python PATH, --no-python, \
                 --lengths 16,64,128)"
            ),
        }
    }
    Ok(a)
}

/// A tokenizer that never ends generation: both sides generate exactly `n` tokens.
struct NoEos(Arc<dyn TextTokenizer>);

impl TextTokenizer for NoEos {
    fn encode(&self, text: &str) -> evomerge::Result<Vec<u32>> {
        self.0.encode(text)
    }
    fn decode(&self, ids: &[u32]) -> evomerge::Result<String> {
        self.0.decode(ids)
    }
    fn bos_id(&self) -> Option<u32> {
        self.0.bos_id()
    }
    fn eos_id(&self) -> Option<u32> {
        None
    }
}

const NAMES: &[&str] = &[
    "Anna",
    "Marco",
    "the teacher",
    "a farmer",
    "my neighbour",
    "the old captain",
    "Li Wei",
    "the committee",
    "our doctor",
    "a young painter",
];
const VERBS: &[&str] = &[
    "carried",
    "found",
    "painted",
    "sold",
    "repaired",
    "described",
    "borrowed",
    "measured",
    "planted",
    "forgot",
];
const ADJS: &[&str] = &[
    "small", "heavy", "bright", "ancient", "wooden", "quiet", "broken", "famous", "green",
    "strange",
];
const NOUNS: &[&str] = &[
    "boat", "garden", "letter", "bridge", "lamp", "river", "map", "clock", "village", "window",
    "library", "engine",
];
const PLACES: &[&str] = &[
    "near the harbour",
    "before dawn",
    "in the north",
    "after the storm",
    "across the valley",
    "during the festival",
    "behind the school",
    "on Tuesday",
];

fn sentence(rng: &mut StdRng) -> String {
    fn pick(rng: &mut StdRng, w: &[&'static str]) -> &'static str {
        w.choose(rng).copied().unwrap_or("")
    }
    let mut s = format!(
        "{} {} the {} {} {}",
        pick(rng, NAMES),
        pick(rng, VERBS),
        pick(rng, ADJS),
        pick(rng, NOUNS),
        pick(rng, PLACES)
    );
    if rng.random_bool(0.5) {
        s += &format!(
            ", because the {} {} was {}",
            pick(rng, NOUNS),
            ["near", "by", "beside"][rng.random_range(0..3)],
            pick(rng, ADJS)
        );
    }
    let mut c = s.chars();
    let first = c.next().map(|f| f.to_uppercase().collect::<String>());
    format!("{}{}.", first.unwrap_or_default(), c.as_str())
}

/// Sentences until the text has at least `tokens` tokens, then cut to exactly that many and
/// decoded back.
fn text_of(rng: &mut StdRng, tok: &dyn TextTokenizer, tokens: usize) -> anyhow::Result<String> {
    let mut s = sentence(rng);
    while tok.encode(&s)?.len() < tokens + 4 {
        s = format!("{s} {}", sentence(rng));
    }
    let ids = tok.encode(&s)?;
    Ok(tok.decode(&ids[..tokens])?)
}

fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let tok: Arc<dyn TextTokenizer> = Arc::from(evomerge::tokenizer::load_tokenizer(&a.model)?);
    let mut rng = StdRng::seed_from_u64(2024);
    let texts: Vec<String> = (0..64)
        .map(|_| text_of(&mut rng, tok.as_ref(), 128))
        .collect::<anyhow::Result<_>>()?;
    let mc: Vec<(String, Vec<String>)> = (0..50)
        .map(|_| -> anyhow::Result<_> {
            let ctx = text_of(&mut rng, tok.as_ref(), 48)?;
            let choices = (0..4)
                .map(|_| sentence(&mut rng))
                .map(|c| format!(" {c}"))
                .collect();
            Ok((ctx, choices))
        })
        .collect::<anyhow::Result<_>>()?;
    let prompts: Vec<String> = (0..16)
        .map(|_| text_of(&mut rng, tok.as_ref(), 100))
        .collect::<anyhow::Result<_>>()?;
    let work = json!({
        "threads": a.threads,
        "texts": texts,
        "mc": mc.iter().map(|(c, ch)| json!({"context": c, "choices": ch})).collect::<Vec<_>>(),
        "prompts": prompts,
        "lengths": a.lengths,
    });
    let work_path = std::env::temp_dir().join(format!("bench_eval_{}.json", std::process::id()));
    std::fs::write(&work_path, serde_json::to_vec(&work)?)?;

    // transformers first, in its own process
    let theirs = match &a.python {
        Some(py) => Some(run_python(py, &work_path, &a.model)?),
        None => None,
    };
    let _ = std::fs::remove_file(&work_path);

    // ours
    let t0 = Instant::now();
    let disk = evomerge::store::Model::open(&a.model)?;
    let model = Transformer::from_source(&disk, &Device::Cpu, DType::F32)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = LmConfig {
        batch_size: 32,
        ..LmConfig::default()
    };
    let task = |name: &str, metric, examples: Vec<Example>| {
        Task::from_examples(TaskSpec::new(name, "-", metric), examples.clone(), examples)
    };
    let ppl_eval = LmEvaluator::try_new(
        vec![task(
            "ppl",
            Metric::Perplexity,
            texts
                .iter()
                .map(|t| Example::Text { text: t.clone() })
                .collect(),
        )?],
        tok.clone(),
        cfg.clone(),
    )?;
    let t = Instant::now();
    let ppl = ppl_eval.score_model(&model, Split::Dev)?;
    let ppl_s = t.elapsed().as_secs_f64();
    let mc_eval = LmEvaluator::try_new(
        vec![task(
            "mc",
            Metric::MultipleChoice,
            mc.iter()
                .map(|(c, ch)| Example::Choice {
                    prompt: c.clone(),
                    choices: ch.clone(),
                    answer: 0,
                })
                .collect(),
        )?],
        tok.clone(),
        cfg.clone(),
    )?;
    let t = Instant::now();
    let mc_score = mc_eval.score_model(&model, Split::Dev)?;
    let mc_s = t.elapsed().as_secs_f64();
    let gen_eval = LmEvaluator::try_new(
        vec![task(
            "g",
            Metric::ExactMatch,
            vec![Example::Generation {
                prompt: "a".into(),
                target: "b".into(),
            }],
        )?],
        Arc::new(NoEos(tok.clone())),
        cfg,
    )?;
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut gen_s = Vec::new();
    let mut first_outputs = Vec::new();
    for &n in &a.lengths {
        let t = Instant::now();
        let out = gen_eval.generate(&model, &prompt_refs, n, "")?;
        gen_s.push(t.elapsed().as_secs_f64());
        first_outputs.push(out[0].clone());
    }
    let rss = peak_rss_mb();

    println!(
        "SmolLM2 bench: {} threads, model {} (f32 compute, load {load_s:.2} s)",
        a.threads,
        a.model.display()
    );
    let metric = |s: &evomerge::eval::Score, k: &str| s.metrics.get(k).copied().unwrap_or(f64::NAN);
    println!(
        "ours: perplexity {:.4}, mc accuracy (choice 0 correct) {:.3}",
        metric(&ppl, "ppl/perplexity"),
        metric(&mc_score, "mc/multiple_choice")
    );
    if let Some(th) = &theirs {
        println!(
            "transformers {}: perplexity {:.4}, mc accuracy {:.3}, tokens/text {}",
            th["versions"], th["perplexity"], th["mc_accuracy"], th["text_tokens"]
        );
    }
    println!("\n| work | evomerge | transformers | ratio |\n|---|---:|---:|---:|");
    let row = |name: String, ours: f64, key: &str| {
        let th = theirs.as_ref().and_then(|t| t[key].as_f64());
        match th {
            Some(th) => println!("| {name} | {ours:.2} s | {th:.2} s | {:.2}× |", ours / th),
            None => println!("| {name} | {ours:.2} s | — | — |"),
        }
    };
    row("perplexity, 64 × 128 tokens".into(), ppl_s, "perplexity_s");
    row("multiple choice, 50 × 4".into(), mc_s, "mc_s");
    for (n, s) in a.lengths.iter().zip(&gen_s) {
        row(
            format!("greedy, 16 prompts × {n} new tokens"),
            *s,
            &format!("generate_{n}_s"),
        );
    }
    let th_rss = theirs.as_ref().and_then(|t| t["peak_rss_mb"].as_f64());
    match th_rss {
        Some(th) => println!("| peak RSS | {rss:.0} MB | {th:.0} MB | {:.2}× |", rss / th),
        None => println!("| peak RSS | {rss:.0} MB | — | — |"),
    }
    if let Some(th) = &theirs {
        // the same greedy continuation of the first prompt, as a sanity check of equal work
        for ((n, ours), theirs) in a
            .lengths
            .iter()
            .zip(&first_outputs)
            .zip(th["first_outputs"].as_array().into_iter().flatten())
        {
            let same = theirs.as_str() == Some(ours.as_str());
            println!(
                "first prompt, {n} tokens: outputs {}",
                if same { "identical" } else { "DIFFER" }
            );
            if !same {
                println!("  ours:   {ours:?}\n  theirs: {theirs}");
            }
        }
    }
    Ok(())
}

fn run_python(py: &Path, work: &Path, model: &Path) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_eval_transformers.py");
    let out = std::process::Command::new(py)
        .arg(&script)
        .arg(work)
        .arg(model)
        .output()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", py.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} {} failed ({}):\n{}",
            py.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .map_err(|e| anyhow::anyhow!("transformers script output {last:?}: {e}"))
}
