//! Measures what the search itself costs (CMA-ES, genome decoding, history logging) against the
//! time spent building and scoring candidates.
//!
//! ```text
//! cargo run --release --example bench_search                      # a synthetic evaluator
//! cargo run --release --example bench_search -- searches/toy-ps.toml 3   # real toy world, 3 generations
//! ```
//!
//! With one evaluation slot, wall time = evaluation time + overhead, so the overhead share is
//! `(loop − eval) / loop`. The synthetic run decodes a realistic 36-gene per-layer TIES space
//! and "evaluates" in a fixed 20 ms; the toy run uses the real merge and LM evaluator.

use std::sync::Arc;
use std::time::Duration;

use evomerge::candidate::{Candidate, CandidateBody, MemModel};
use evomerge::eval::{EvalError, Evaluator, Score, Split};
use evomerge::merge::{ParamDecl, ParamKind, Scope};
use evomerge::search::def::{
    EvaluatorDef, Granularity, OptimizerDef, ParallelismDef, PsDef, Restarts, SearchDef, SpaceDef,
};
use evomerge::search::run::{CandidateBuilder, RunOptions, RunSummary, Search};
use evomerge::search::space::{Decoded, PsModels, PsSpace, Space};

struct Sleep(Duration);

impl Evaluator for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }
    fn evaluate(&self, c: &Candidate, _split: Split) -> Result<Score, EvalError> {
        std::thread::sleep(self.0);
        let n = c.recipe.as_ref().map_or(0, |r| r.len()) as f64;
        Ok(Score {
            primary: -(n - 3000.0).abs(),
            metrics: Default::default(),
        })
    }
}

struct RecipeOnly;

impl CandidateBuilder for RecipeOnly {
    fn build(&self, decoded: &Decoded) -> evomerge::Result<Candidate> {
        Ok(Candidate {
            body: CandidateBody::Merged(Arc::new(MemModel {
                config: serde_json::json!({}),
                tensors: Default::default(),
            })),
            recipe: Some(decoded.text()),
        })
    }
}

const DECLS: &[ParamDecl] = &[
    ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1.0),
        searched: true,
        doc: "",
    },
    ParamDecl {
        name: "density",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1.0),
        searched: true,
        doc: "",
    },
];

fn synthetic(out: &std::path::Path) -> evomerge::Result<RunSummary> {
    let ps = PsDef {
        granularity: Granularity::PerLayer,
        split_attn_mlp: false,
        embeddings: true,
        params: None,
        ranges: Default::default(),
        defaults: Default::default(),
    };
    let info = PsModels {
        method: "ties".into(),
        decls: DECLS.to_vec(),
        models: vec!["/models/add".into(), "/models/cipher".into()],
        base: Some("/models/base".into()),
        n_layers: 8,
        pre_tensors: vec!["model.embed_tokens.weight".into()],
        post_tensors: vec!["lm_head.weight".into(), "model.norm.weight".into()],
    };
    let space = Space::Ps(PsSpace::new(info, &ps)?);
    let def = SearchDef {
        name: "bench".into(),
        models: vec!["a".into(), "b".into()],
        base_model: None,
        method: Some("ties".into()),
        output: None,
        merge_seed: 0,
        space: SpaceDef::Ps(ps),
        evaluator: EvaluatorDef::Lm {
            tasks: Vec::new(),
            batch_size: None,
            device: None,
            dtype: None,
            max_length: None,
            subsample: None,
            subsample_confidence: None,
            fitness_split: Split::Dev,
        },
        optimizer: OptimizerDef {
            sigma0: 0.2,
            population: Some(8),
            generations: Some(15),
            max_evaluations: None,
            seed: 1,
            restarts: Restarts::None,
        },
        parallelism: ParallelismDef {
            slots: 1,
            ..ParallelismDef::default()
        },
    };
    let search = Search {
        def,
        space,
        builder: Arc::new(RecipeOnly),
        evaluator: Arc::new(Sleep(Duration::from_millis(20))),
        sources: Vec::new(),
        pool_names: Vec::new(),
        merge_models: None,
    };
    search.run(
        out,
        &RunOptions {
            progress: false,
            write_model: false,
            report: false,
            plots: true,
            stop_after_evals: None,
            device: None,
            finish: Some(evomerge::pipeline::report_hook()),
        },
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // the run's history, plots and recipe live in a temporary directory removed at exit
    let temp = tempfile::Builder::new()
        .prefix("evomerge-bench-search")
        .tempdir()?;
    let out = temp.path().join("run");
    let (label, summary) = match args.first() {
        None => (
            "synthetic (36 genes, 20 ms evaluations)".to_string(),
            synthetic(&out)?,
        ),
        Some(path) => {
            let mut def = SearchDef::load(path.as_ref())?;
            def.parallelism.slots = 1;
            if let Some(g) = args.get(1) {
                def.optimizer.generations = Some(g.parse()?);
                def.optimizer.max_evaluations = None;
            }
            let opts = RunOptions {
                progress: false,
                write_model: false,
                report: false,
                plots: false,
                stop_after_evals: None,
                device: None,
                finish: None,
            };
            let search = Search::prepare(&def, &opts)?;
            (format!("{path} (1 slot)"), search.run(&out, &opts)?)
        }
    };
    let overhead = summary.loop_seconds - summary.eval_seconds;
    println!("{label}");
    println!(
        "  evaluations {}  loop {:.3} s  in evaluations {:.3} s  ({:.1} ms each)",
        summary.evaluated,
        summary.loop_seconds,
        summary.eval_seconds,
        1e3 * summary.eval_seconds / summary.evaluated.max(1) as f64
    );
    println!(
        "  search overhead {:.4} s = {:.3} ms per evaluation = {:.3} % of the loop",
        overhead,
        1e3 * overhead / summary.evaluated.max(1) as f64,
        100.0 * overhead / summary.loop_seconds
    );
    if let Some(path) = args.first() {
        let def = SearchDef::load(path.as_ref())?;
        let yaml_path = out.join("best_recipe.yaml");
        if matches!(def.space, SpaceDef::Ps(_)) && yaml_path.exists() {
            memory_vs_disk(&yaml_path, &out, def.merge_seed)?;
        }
    }
    Ok(())
}

/// Time building the best recipe in memory (as the search does) against writing it to disk (as
/// `evomerge merge` does), in the same process.
fn memory_vs_disk(
    yaml_path: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
) -> anyhow::Result<()> {
    use evomerge::merge::executor::{MergeOptions, merge_in_memory, merge_to_disk};
    let recipe = evomerge::recipe::Recipe::from_path(yaml_path)?;
    let mut models = evomerge::store::ModelSet::new();
    merge_in_memory(&recipe, &mut models, seed)?; // open + warm the maps
    let reps = 5;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(merge_in_memory(&recipe, &mut models, seed)?);
    }
    let mem = t.elapsed().as_secs_f64() / reps as f64;
    let t = std::time::Instant::now();
    for k in 0..reps {
        let target = out.join(format!("bench-model-{k}"));
        let options = MergeOptions {
            seed,
            ..Default::default()
        };
        merge_to_disk(&recipe, &mut models, &target, &options)?;
    }
    let disk = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "  best recipe: in memory {:.2} ms, to disk {:.2} ms → {:.1}× faster in memory",
        1e3 * mem,
        1e3 * disk,
        disk / mem
    );
    Ok(())
}
