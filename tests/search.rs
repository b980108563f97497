//! Integration tests: search (definitions, the loop, resume after a kill, failures, plots,
//! report). Candidates are test doubles: the PS "model" is the decoded recipe itself, scored by a
//! quadratic with a known optimum, so no merge or forward pass is needed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use evomerge::candidate::{Candidate, CandidateBody, Hop, MemModel, Route};
use evomerge::eval::{EvalError, Evaluator, Score, Split};
use evomerge::merge::{ParamDecl, ParamKind, Scope};
use evomerge::search::def::{
    DfsDef, EvaluatorDef, Granularity, OptimizerDef, ParallelismDef, PsDef, Restarts, SearchDef,
    SpaceDef,
};
use evomerge::search::history;
use evomerge::search::run::{CandidateBuilder, RunOptions, Search};
use evomerge::search::space::{Decoded, DfsSpace, PsModels, PsSpace, Space};

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

/// Builds a candidate that carries only its recipe text.
struct RecipeOnly;

impl CandidateBuilder for RecipeOnly {
    fn build(&self, decoded: &Decoded) -> evomerge::Result<Candidate> {
        let body = match decoded {
            Decoded::Recipe(_) => CandidateBody::Merged(Arc::new(MemModel {
                config: serde_json::json!({}),
                tensors: Default::default(),
            })),
            Decoded::Route(r) => CandidateBody::Routed {
                models: Vec::new(),
                route: r.clone(),
            },
        };
        Ok(Candidate {
            body,
            recipe: Some(decoded.text()),
        })
    }
}

/// Every per-source parameter value in the recipe, in order.
fn recipe_values(yaml: &str) -> Vec<f64> {
    let v: serde_json::Value = yaml_serde::from_str(yaml).unwrap();
    let mut out = Vec::new();
    for slice in v["slices"].as_array().unwrap() {
        for src in slice["sources"].as_array().unwrap() {
            if let Some(ps) = src["parameters"].as_object() {
                for val in ps.values() {
                    out.push(val.as_f64().unwrap());
                }
            }
        }
    }
    out
}

/// fitness = −Σ (v − 0.3)² over the recipe's values; optimum 0. Fails (or panics) on chosen
/// call numbers. `split` is recorded so tests can check the search used dev.
struct Quadratic {
    calls: AtomicUsize,
    fail_on: Vec<usize>,
    panic_on: Vec<usize>,
}

impl Quadratic {
    fn new() -> Self {
        Quadratic {
            calls: AtomicUsize::new(0),
            fail_on: Vec::new(),
            panic_on: Vec::new(),
        }
    }
}

impl Evaluator for Quadratic {
    fn name(&self) -> &str {
        "quadratic"
    }
    fn evaluate(&self, c: &Candidate, split: Split) -> Result<Score, EvalError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_on.contains(&n) {
            return Err(EvalError::Candidate(format!(
                "injected failure on call {n}"
            )));
        }
        if self.panic_on.contains(&n) {
            panic!("injected panic on call {n}");
        }
        let vals = recipe_values(c.recipe.as_deref().unwrap());
        let loss: f64 = vals.iter().map(|v| (v - 0.3) * (v - 0.3)).sum();
        let offset = if split == Split::Test { 0.5 } else { 0.0 };
        Ok(Score {
            primary: -loss - offset,
            metrics: [
                ("quad/score".to_string(), -loss - offset),
                ("quad/loss".to_string(), loss),
            ]
            .into(),
        })
    }
}

fn def(space: SpaceDef, slots: usize, generations: usize) -> SearchDef {
    SearchDef {
        name: "test".into(),
        models: vec!["a".into(), "b".into()],
        base_model: Some("base".into()),
        method: Some("ties".into()),
        output: None,
        merge_seed: 0,
        space,
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
            population: Some(6),
            generations: Some(generations),
            max_evaluations: None,
            seed: 11,
            restarts: Restarts::None,
        },
        parallelism: ParallelismDef {
            slots,
            ..ParallelismDef::default()
        },
    }
}

fn ps_def() -> PsDef {
    PsDef {
        granularity: Granularity::PerLayer,
        split_attn_mlp: false,
        embeddings: false,
        params: None,
        ranges: Default::default(),
        defaults: Default::default(),
    }
}

fn ps_search(slots: usize, generations: usize, eval: Arc<dyn Evaluator>) -> Search {
    let ps = ps_def();
    let info = PsModels {
        method: "ties".into(),
        decls: DECLS.to_vec(),
        models: vec!["a".into(), "b".into()],
        base: Some("base".into()),
        n_layers: 2,
        pre_tensors: vec!["model.embed_tokens.weight".into()],
        post_tensors: vec!["lm_head.weight".into()],
    };
    let space = Space::Ps(PsSpace::new(info, &ps).unwrap());
    Search {
        def: def(SpaceDef::Ps(ps), slots, generations),
        space,
        builder: Arc::new(RecipeOnly),
        evaluator: eval,
        sources: Vec::new(),
        pool_names: Vec::new(),
        merge_models: None,
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        write_model: false,
        report: true,
        plots: false,
        stop_after_evals: None,
        device: None,
        finish: Some(evomerge::pipeline::report_hook()),
    }
}

#[test]
fn ps_search_approaches_a_known_optimum() {
    let dir = tempfile::tempdir().unwrap();
    let s = ps_search(2, 60, Arc::new(Quadratic::new()));
    let sum = s.run(dir.path(), &quiet()).unwrap();
    // 8 genes (2 layers × 2 params × 2 models); default (all 1.0) has loss 8·0.49 = 3.92.
    assert_eq!(s.space.dim(), 8);
    let best = sum.best.fitness.unwrap();
    assert!(best > -0.01, "best fitness {best}");
    assert_eq!(sum.evaluated, 360);
    assert_eq!(sum.generations, 60);
    let records = history::load(dir.path()).unwrap();
    assert_eq!(records.len(), 360);
    assert!(
        records
            .iter()
            .all(|r| r.recipe.contains("merge_method: ties"))
    );
    let rows = history::load_generations(dir.path()).unwrap();
    assert_eq!(rows.len(), 60);
    assert!(rows.last().unwrap().best > rows[0].best);
    // outputs
    let yaml = std::fs::read_to_string(dir.path().join("best_recipe.yaml")).unwrap();
    for v in recipe_values(&yaml) {
        assert!((v - 0.3).abs() < 0.06, "{v} in\n{yaml}");
    }
    // report: default merge on test = −3.92 − 0.5; evolved ≈ −0.5
    let report = evomerge::report::report(dir.path()).unwrap();
    assert!(
        report.contains("| default merge | -442.0 | **-442.0** |"),
        "{report}"
    );
    assert!(report.contains("| evolved (PS) |"), "{report}");
}

#[test]
fn resume_after_a_kill_reaches_the_identical_best_genome() {
    let full = tempfile::tempdir().unwrap();
    let killed = tempfile::tempdir().unwrap();
    let s = ps_search(2, 8, Arc::new(Quadratic::new()));
    let a = s.run(full.path(), &quiet()).unwrap();

    // Killed in the middle of generation 2 (population 6): 15 evaluations started.
    let opts = RunOptions {
        stop_after_evals: Some(15),
        ..quiet()
    };
    let k = s.run(killed.path(), &opts).unwrap();
    assert!(k.interrupted);
    let partial = history::load(killed.path()).unwrap();
    assert!((14..=15).contains(&partial.len()), "{}", partial.len());
    // and the kill tore the last line in half
    let h = killed.path().join(history::HISTORY_FILE);
    let mut text = std::fs::read_to_string(&h).unwrap();
    text.push_str("{\"run\":0,\"generation\":2,\"ind");
    std::fs::write(&h, text).unwrap();

    let b = s.run(killed.path(), &quiet()).unwrap();
    assert!(!b.interrupted);
    assert_eq!(b.replayed, partial.len());
    assert_eq!(b.evaluated + b.replayed, 48);
    let bits = |g: &[f64]| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.best.genome), bits(&b.best.genome));
    assert_eq!(a.best.fitness, b.best.fitness);
    // the same history (as a set) and the same per-generation table
    let mut ha: Vec<_> = history::load(full.path())
        .unwrap()
        .into_iter()
        .map(|r| (r.generation, bits(&r.genome)))
        .collect();
    let mut hb: Vec<_> = history::load(killed.path())
        .unwrap()
        .into_iter()
        .map(|r| (r.generation, bits(&r.genome)))
        .collect();
    ha.sort();
    hb.sort();
    assert_eq!(ha, hb);
    // (slot utilisation is a timing, not part of the result)
    let table = |dir: &Path| {
        let mut rows = history::load_generations(dir).unwrap();
        for r in &mut rows {
            assert!(r.utilisation.is_some_and(|u| u > 0.0), "{r:?}");
            r.utilisation = None;
        }
        rows
    };
    assert_eq!(table(full.path()), table(killed.path()));
}

#[test]
fn failing_evaluations_are_logged_and_the_search_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Quadratic::new();
    q.fail_on = vec![3, 10];
    q.panic_on = vec![7];
    // one slot: call numbers are deterministic
    let s = ps_search(1, 4, Arc::new(q));
    let sum = s.run(dir.path(), &quiet()).unwrap();
    assert!(!sum.interrupted);
    assert_eq!(sum.failures, 3);
    let records = history::load(dir.path()).unwrap();
    assert_eq!(records.len(), 24);
    let errors: Vec<&str> = records.iter().filter_map(|r| r.error.as_deref()).collect();
    assert_eq!(errors.len(), 3);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("injected failure on call 3")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("panicked: injected panic on call 7")),
        "{errors:?}"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.error.is_some())
            .all(|r| r.fitness.is_none())
    );
    let rows = history::load_generations(dir.path()).unwrap();
    assert_eq!(rows.iter().map(|r| r.failures).sum::<usize>(), 3);
    assert!(dir.path().join("best_recipe.yaml").exists());
}

#[test]
fn dfs_search_finds_a_target_route_and_plots_it() {
    let dir = tempfile::tempdir().unwrap();
    let dfs = DfsDef {
        repeats: 2,
        scale_range: [0.5, 1.5],
        indicator_threshold: 0.0,
        embed_model: Some(0),
    };
    let space = DfsSpace::new(vec![3, 3], 0, &dfs).unwrap();
    let target = Route {
        embed_model: 0,
        hops: vec![
            Hop {
                model: 0,
                layer: 0,
                scale: 1.0,
            },
            Hop {
                model: 1,
                layer: 1,
                scale: 1.0,
            },
            Hop {
                model: 0,
                layer: 2,
                scale: 1.0,
            },
        ],
    };
    let eval = evomerge::eval::double::RouteMatch::new(target.clone());
    let mut d = def(SpaceDef::Dfs(dfs), 2, 40);
    d.optimizer.population = Some(10);
    let s = Search {
        def: d,
        space: Space::Dfs(space),
        builder: Arc::new(RecipeOnly),
        evaluator: Arc::new(eval),
        sources: Vec::new(),
        pool_names: vec!["a".into(), "b".into()],
        merge_models: None,
    };
    let opts = RunOptions {
        plots: true,
        ..quiet()
    };
    let sum = s.run(dir.path(), &opts).unwrap();
    // default route (model 0's layers 0,1,2) has one mismatch; the target is reachable
    let best = sum.best.fitness.unwrap();
    assert!(best > -0.05, "best {best}");
    let file: evomerge::search::run::RouteFile =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("best_route.json")).unwrap())
            .unwrap();
    let got: Vec<(usize, usize)> = file.route.hops.iter().map(|h| (h.model, h.layer)).collect();
    assert_eq!(got, vec![(0, 0), (1, 1), (0, 2)]);
    for f in ["fitness.png", "fitness.svg", "route.png", "route.svg"] {
        let p = dir.path().join("plots").join(f);
        assert!(
            std::fs::metadata(&p).unwrap().len() > 1000,
            "{}",
            p.display()
        );
    }
}

#[test]
fn plots_redraw_from_the_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = ps_search(1, 3, Arc::new(Quadratic::new()));
    s.run(dir.path(), &quiet()).unwrap();
    let files = evomerge::report::plots::plot(dir.path()).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "fitness.png",
            "fitness.svg",
            "coefficients.png",
            "coefficients.svg"
        ]
    );
    let svg = std::fs::read_to_string(dir.path().join("plots/coefficients.svg")).unwrap();
    assert!(svg.contains("weight · a"), "row label missing");
    assert!(svg.contains("L1"), "column label missing");
}

fn load_str(text: &str) -> evomerge::Result<SearchDef> {
    SearchDef::from_toml(
        text,
        Path::new("/x/searches"),
        Path::new("/x/searches/t.toml"),
    )
}

const MINIMAL: &str = r#"
name = "t"
models = ["../m/a", "../m/b"]
base_model = "../m/base"
method = "ties"
[space]
kind = "ps"
granularity = "every:2"
[evaluator]
kind = "lm"
tasks = [{ name = "add", path = "../tasks/add", metric = "exact_match" }]
[optimizer]
generations = 3
"#;

#[test]
fn definitions_resolve_paths_and_refuse_mistakes() {
    let d = load_str(MINIMAL).unwrap();
    assert_eq!(d.models[0], Path::new("/x/searches/../m/a"));
    assert_eq!(d.output_dir(), Path::new("/x/runs/t"));
    let SpaceDef::Ps(ps) = &d.space else { panic!() };
    assert_eq!(ps.granularity, Granularity::Every(2));
    assert!(ps.embeddings);
    let EvaluatorDef::Lm { tasks, .. } = &d.evaluator else {
        panic!()
    };
    assert_eq!(tasks[0].path, Path::new("/x/searches/../tasks/add"));

    let typo = MINIMAL.replace("generations = 3", "generations = 3\nsigma = 0.3");
    let e = load_str(&typo).unwrap_err().to_string();
    assert!(e.contains("sigma"), "{e}");
    let test_split = MINIMAL.replace("kind = \"lm\"", "kind = \"lm\"\nfitness_split = \"test\"");
    let e = load_str(&test_split).unwrap_err().to_string();
    assert!(e.contains("test split"), "{e}");
    let no_budget = MINIMAL.replace("generations = 3", "seed = 1");
    assert!(
        load_str(&no_budget)
            .unwrap_err()
            .to_string()
            .contains("budget")
    );
    let bad_gran = MINIMAL.replace("every:2", "every:0");
    assert!(load_str(&bad_gran).is_err());
    let unknown_space_key = MINIMAL.replace("granularity", "repeats = 2\ngranularity");
    assert!(load_str(&unknown_space_key).is_err());
    let ps_dfs = MINIMAL.replace(
        "kind = \"ps\"\ngranularity = \"every:2\"",
        "kind = \"ps_dfs\"\nps_search = \"p.toml\"\nrepeats = 3",
    );
    let d = load_str(&ps_dfs).unwrap();
    let SpaceDef::PsDfs { ps_search, dfs } = &d.space else {
        panic!()
    };
    assert_eq!(ps_search, Path::new("/x/searches/p.toml"));
    assert_eq!(dfs.repeats, 3);
    let e = load_str(&ps_dfs.replace("repeats", "repeat"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("repeat"), "{e}");
    let cmd = MINIMAL.replace(
        "kind = \"lm\"\ntasks = [{ name = \"add\", path = \"../tasks/add\", metric = \"exact_match\" }]",
        "kind = \"command\"\ncommand = [\"python3\", \"score.py\", \"{model_dir}\"]\ntimeout_s = 60.0",
    );
    let d = load_str(&cmd).unwrap();
    let EvaluatorDef::Command { spec, .. } = &d.evaluator else {
        panic!("{cmd}")
    };
    assert_eq!(spec.timeout_s, 60.0);
    let e = load_str(&cmd.replace("timeout_s", "timeout"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("timeout"), "{e}");
}

#[test]
fn every_shipped_search_definition_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("searches");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let d = SearchDef::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(d.evaluator.fitness_split(), Split::Dev);
            // a PS space must fit the method's current declarations (ranges, parameter names)
            if let SpaceDef::Ps(ps) = &d.space {
                let method = evomerge::merge::method(d.method.as_deref().unwrap()).unwrap();
                let info = PsModels {
                    method: method.name().into(),
                    decls: method.params().to_vec(),
                    models: vec!["a".into(), "b".into()],
                    base: Some("base".into()),
                    n_layers: 4,
                    pre_tensors: vec!["model.embed_tokens.weight".into()],
                    post_tensors: vec!["lm_head.weight".into()],
                };
                PsSpace::new(info, ps).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
            n += 1;
        }
    }
    assert!(n >= 3, "expected the three toy searches, found {n}");
}

fn family(dir: &Path) -> Vec<std::path::PathBuf> {
    evomerge::synth::write_family(&dir.join("fam"), &evomerge::synth::LlamaSpec::tiny(), 2, 5)
        .unwrap()
}

#[test]
fn dfs_search_over_model_directories() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(dir.path());
    let toml = format!(
        r#"
name = "dfs"
models = [{:?}, {:?}]
output = "out"
[space]
kind = "dfs"
repeats = 1
[evaluator]
kind = "lm"
tasks = []
[optimizer]
population = 8
generations = 25
seed = 2
"#,
        fam[1], fam[2]
    );
    let def = SearchDef::from_toml(&toml, dir.path(), &dir.path().join("dfs.toml")).unwrap();
    // tiny models have 2 layers; target: model 0 layer 0, model 1 layer 1 (the fixed last hop
    // is model 0's layer 1), scales from W.
    let target = Route {
        embed_model: 0,
        hops: vec![
            Hop {
                model: 0,
                layer: 0,
                scale: 1.0,
            },
            Hop {
                model: 1,
                layer: 1,
                scale: 1.0,
            },
            Hop {
                model: 0,
                layer: 1,
                scale: 1.0,
            },
        ],
    };
    let opts = RunOptions {
        plots: true,
        ..quiet()
    };
    let s = Search::prepare_with(
        &def,
        Arc::new(evomerge::eval::double::RouteMatch::new(target)),
        &opts,
    )
    .unwrap();
    // slots: (1,0) (1,1) → 2 indicators (model 0's layers 0 and 1 are fixed), W 2×2
    assert_eq!(s.space.dim(), 6);
    let out = def.output_dir();
    let sum = s.run(&out, &opts).unwrap();
    assert!(sum.best.fitness.unwrap() > -0.02, "{:?}", sum.best.fitness);
    let file: evomerge::search::run::RouteFile =
        serde_json::from_str(&std::fs::read_to_string(out.join("best_route.json")).unwrap())
            .unwrap();
    assert_eq!(file.models.len(), 2);
    assert!(file.models[0].ends_with("ft1"));
    assert_eq!(file.route.hops.len(), 3);
    assert!(out.join("plots/route.png").exists());
}

/// The PS decoder's YAML is accepted by our recipe reader for every registered method with a
/// Float parameter (layer slices, filters for attention / MLP / embeddings, global parameters
/// at slice level).
#[test]
fn decoded_recipes_parse_for_every_registered_method() {
    let mut checked = 0;
    for m in evomerge::merge::registry() {
        let floats = m
            .params()
            .iter()
            .any(|d| matches!(d.kind, ParamKind::Float { .. }));
        if !floats || m.aux().is_some() {
            continue;
        }
        let (min, _) = m.model_count();
        let models: Vec<String> = (0..min.max(2).min(m.model_count().1.unwrap_or(2)))
            .map(|i| format!("/m/ft{i}"))
            .collect();
        let base = match m.base() {
            evomerge::merge::BaseUse::Required => Some("/m/base".to_string()),
            evomerge::merge::BaseUse::Optional | evomerge::merge::BaseUse::OptionalApart => None,
        };
        let info = PsModels {
            method: m.name().into(),
            decls: m.params().to_vec(),
            models,
            base,
            n_layers: 3,
            pre_tensors: vec!["model.embed_tokens.weight".into()],
            post_tensors: vec!["lm_head.weight".into(), "model.norm.weight".into()],
        };
        let mut ps = ps_def();
        ps.split_attn_mlp = true;
        ps.embeddings = true;
        let space = match PsSpace::new(info, &ps) {
            Ok(s) => s,
            // a Float parameter without a finite range needs `ranges` in a real definition
            Err(e) if e.to_string().contains("unbounded") => continue,
            Err(e) => panic!("{}: {e}", m.name()),
        };
        let yaml = space.decode(&space.default_genome()).unwrap();
        evomerge::recipe::Recipe::from_str(&yaml, None)
            .unwrap_or_else(|e| panic!("{}: {e}\n{yaml}", m.name()));
        checked += 1;
    }
    assert!(checked >= 1, "no registered method with Float parameters");
}

#[test]
fn ps_search_merges_model_directories_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(dir.path());
    let toml = format!(
        r#"
name = "ps"
models = [{:?}, {:?}]
base_model = {:?}
method = "ties"
output = "out"
[space]
kind = "ps"
granularity = "whole"
embeddings = false
params = ["weight", "density"]
defaults = {{ weight = 1.0, density = 0.5 }}
[evaluator]
kind = "lm"
tasks = []
[optimizer]
population = 6
generations = 8
seed = 3
"#,
        fam[1], fam[2], fam[0]
    );
    let def = SearchDef::from_toml(&toml, dir.path(), &dir.path().join("ps.toml")).unwrap();
    // The target is ft1 itself: TIES reaches it with weight(ft2) = 0 and density(ft1) = 1.
    let mem = evomerge::synth::mem_family(&evomerge::synth::LlamaSpec::tiny(), 2, 5);
    let eval = Arc::new(evomerge::eval::double::TargetDistance::new(Arc::new(
        mem[1].clone(),
    )));
    let opts = RunOptions {
        write_model: true,
        ..quiet()
    };
    let s = Search::prepare_with(&def, eval.clone(), &opts).unwrap();
    assert_eq!(s.space.dim(), 4);
    let out = def.output_dir();
    let sum = s.run(&out, &opts).unwrap();
    assert_eq!(
        sum.failures,
        0,
        "{:?}",
        history::load(&out).unwrap()[0].error
    );
    let r = evomerge::report::load(&out).unwrap();
    let row = |n: &str| {
        let row = r.rows.iter().find(|x| x.name == n);
        row.and_then(|x| x.primary)
            .unwrap_or_else(|| panic!("row {n}: {row:?}\n{}", r.markdown()))
    };
    // (target_distance scores in-memory candidates only: the source rows are failures)
    assert!(r.rows[0].error.is_some());
    assert!(
        row("evolved (PS)") > row("default merge"),
        "{}",
        r.markdown()
    );
    // the model written to disk is the best recipe's merge
    let written = evomerge::store::Model::open(out.join("model")).unwrap();
    let mut tensors = evomerge::candidate::TensorMap::new();
    for info in written.tensors() {
        tensors.insert(info.name.clone(), written.read(&info.name).unwrap());
    }
    let mse = eval.mse(&tensors).unwrap();
    assert!((-mse - row("evolved (PS)")).abs() < 1e-9, "{mse}");
}

/// Scores a PS candidate by the recipe (as [`Quadratic`]) and records the dtype of every tensor
/// of every in-memory candidate it sees.
struct DtypeProbe {
    seen: std::sync::Mutex<std::collections::HashSet<evomerge::tensor::DType>>,
    bytes: std::sync::Mutex<Vec<usize>>,
}

impl Evaluator for DtypeProbe {
    fn name(&self) -> &str {
        "dtype-probe"
    }
    fn evaluate(&self, c: &Candidate, _: Split) -> Result<Score, EvalError> {
        let CandidateBody::Merged(m) = &c.body else {
            return Err(EvalError::Candidate("not in memory".into()));
        };
        self.seen
            .lock()
            .unwrap()
            .extend(m.tensors.values().map(|t| t.dtype()));
        self.bytes.lock().unwrap().push(m.nbytes());
        let vals = recipe_values(c.recipe.as_deref().unwrap());
        Ok(Score {
            primary: -vals.iter().map(|v| (v - 0.3) * (v - 0.3)).sum::<f64>(),
            metrics: Default::default(),
        })
    }
}

/// Regression (issue 9): a search over bf16 checkpoints built f32 candidates and wrote an f32
/// model (twice the inputs' size) whose config.json said `torch_dtype: float32` next to the
/// base's `dtype: bfloat16`. Now candidates, the best model and its config all stay bf16.
#[test]
fn a_search_over_bf16_inputs_stays_bf16_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = evomerge::synth::LlamaSpec::tiny();
    spec.dtype = evomerge::tensor::DType::BF16;
    let fam = evomerge::synth::write_family(&dir.path().join("fam"), &spec, 2, 5).unwrap();
    // transformers ≥ 4.56 writes `dtype` beside `torch_dtype`
    let cfg_path = fam[0].join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["dtype"] = "bfloat16".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let toml = format!(
        r#"
name = "bf16"
models = [{:?}, {:?}]
base_model = {:?}
method = "ties"
output = "out"
[space]
kind = "ps"
granularity = "whole"
embeddings = false
params = ["weight"]
[evaluator]
kind = "lm"
tasks = []
dtype = "bf16"
[optimizer]
population = 4
generations = 2
seed = 3
"#,
        fam[1], fam[2], fam[0]
    );
    let def = SearchDef::from_toml(&toml, dir.path(), &dir.path().join("bf16.toml")).unwrap();
    let probe = Arc::new(DtypeProbe {
        seen: Default::default(),
        bytes: Default::default(),
    });
    let opts = RunOptions {
        write_model: true,
        report: false,
        ..quiet()
    };
    let s = Search::prepare_with(&def, probe.clone(), &opts).unwrap();
    let out = def.output_dir();
    let sum = s.run(&out, &opts).unwrap();
    assert_eq!(
        sum.failures,
        0,
        "{:?}",
        history::load(&out).unwrap()[0].error
    );
    // every candidate was held in bf16: the checkpoint's size
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(seen, [evomerge::tensor::DType::BF16].into());
    let want_bytes = spec.parameters() as usize * 2;
    assert!(probe.bytes.lock().unwrap().iter().all(|&b| b == want_bytes));
    // the recipe merges in f32 and stores bf16 (what mergekit reads the same way)
    let yaml = std::fs::read_to_string(out.join("best_recipe.yaml")).unwrap();
    assert!(yaml.contains("out_dtype: bfloat16"), "{yaml}");
    assert!(yaml.contains("dtype: float32"), "{yaml}");
    // the best model on disk: bf16 tensors, one dtype in config.json, the inputs' size
    let model = evomerge::store::Model::open(out.join("model")).unwrap();
    assert!(
        model
            .tensors()
            .iter()
            .all(|t| t.dtype == evomerge::tensor::DType::BF16)
    );
    assert_eq!(model.config()["torch_dtype"], "bfloat16");
    assert_eq!(model.config()["dtype"], "bfloat16");
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(size(&out.join("model")) <= size(&fam[0]) + 4096);
    // the saved definition keeps the evaluator settings
    let saved = evomerge::search::run::load_saved_def(&out).unwrap();
    let EvaluatorDef::Lm { dtype, .. } = &saved.evaluator else {
        panic!()
    };
    assert_eq!(*dtype, Some(evomerge::tensor::DType::BF16));
}

/// The DFS pool is read in its stored dtype.
#[test]
fn model_directories_read_into_memory_keep_their_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = evomerge::synth::LlamaSpec::tiny();
    spec.dtype = evomerge::tensor::DType::BF16;
    let fam = evomerge::synth::write_family(&dir.path().join("fam"), &spec, 1, 2).unwrap();
    let mem = MemModel::read_dir(&fam[1]).unwrap();
    let disk = evomerge::store::Model::open(&fam[1]).unwrap();
    assert_eq!(mem.nbytes() as u64, spec.parameters() * 2);
    for info in disk.tensors() {
        let t = &mem.tensors[&info.name];
        assert_eq!(t.dtype(), evomerge::tensor::DType::BF16);
        assert_eq!(t.shape, info.shape);
        assert_eq!(t.to_f32_vec(), disk.read(&info.name).unwrap().to_f32_vec());
    }
}

/// Answers with its own index, so a test can see which evaluator a slot reached.
struct Tagged(f64);

impl Evaluator for Tagged {
    fn name(&self) -> &str {
        "tagged"
    }
    fn evaluate(&self, _: &Candidate, _: Split) -> Result<Score, EvalError> {
        Ok(Score {
            primary: self.0,
            metrics: Default::default(),
        })
    }
}

/// Slot i of the evaluation pool goes to evaluator (GPU) i mod n.
#[test]
fn each_slot_uses_the_evaluator_of_its_device() {
    use evomerge::search::run::PerSlot;
    let per_slot = PerSlot::try_new(vec![Arc::new(Tagged(0.0)), Arc::new(Tagged(1.0))]).unwrap();
    let candidate = Candidate {
        body: CandidateBody::Dir("unused".into()),
        recipe: None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(5)
        .build()
        .unwrap();
    let seen = pool.broadcast(|ctx| {
        let score = per_slot.evaluate(&candidate, Split::Dev).unwrap();
        (ctx.index(), score.primary)
    });
    assert_eq!(
        seen,
        [(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0), (4, 0.0)],
        "slot → evaluator"
    );
    // off any pool: the first
    assert_eq!(
        per_slot.evaluate(&candidate, Split::Dev).unwrap().primary,
        0.0
    );
    assert!(PerSlot::try_new(Vec::new()).is_err());
}

/// `[evaluator]` device / dtype / max_length: parsed, validated, and reaching the evaluator.
#[test]
fn evaluator_settings_parse_and_reach_the_lm_evaluator() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let text = |extra: &str| {
        format!(
            r#"
name = "t"
models = ["{toy}/add", "{toy}/cipher"]
base_model = "{toy}/base"
method = "ties"
[space]
kind = "ps"
[evaluator]
kind = "lm"
tasks = [{{ name = "add", path = "{toy}/tasks/add", metric = "exact_match", max_new_tokens = 4, limit = 4 }}]
{extra}
[optimizer]
generations = 1
[parallelism]
slots = 2
"#,
            toy = toy.display()
        )
    };
    let d = load_str(&text(
        "device = \"cuda:1\"\ndtype = \"bf16\"\nmax_length = 48",
    ))
    .unwrap();
    let EvaluatorDef::Lm {
        device,
        dtype,
        max_length,
        ..
    } = &d.evaluator
    else {
        panic!()
    };
    assert_eq!(*device, Some("cuda:1".parse().unwrap()));
    assert_eq!(*dtype, Some(evomerge::tensor::DType::BF16));
    assert_eq!(*max_length, Some(48));
    // round trip through search.toml
    let back: SearchDef = toml::from_str(&toml::to_string(&d).unwrap()).unwrap();
    assert_eq!(back, d);

    for (extra, needle) in [
        ("device = \"gpu\"", "unknown device `gpu`"),
        ("dtype = \"int8\"", "int8"),
        ("max_length = 0", "max_length"),
        ("batch_size = 0", "batch_size"),
    ] {
        let e = load_str(&text(extra)).unwrap_err().to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }

    // max_length defaults to the base's max_position_embeddings
    assert_eq!(
        evomerge::search::run::model_max_length(&toy.join("base")),
        Some(64)
    );
    // a CPU evaluator builds; max_length reaches it (the add prompts need more than 3 tokens)
    let cpu = load_str(&text("dtype = \"bf16\"")).unwrap();
    evomerge::search::run::build_evaluator(&cpu).unwrap();
    let short = load_str(&text("max_length = 3")).unwrap();
    let e = evomerge::search::run::build_evaluator(&short)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("max_length 3"), "{e}");
    // `cuda` without the feature: an error naming the key and the build flag
    #[cfg(not(feature = "cuda"))]
    {
        let gpu = load_str(&text("device = \"cuda\"")).unwrap();
        let e = evomerge::search::run::build_evaluator(&gpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("[evaluator] device"), "{e}");
        assert!(e.contains("--features cuda"), "{e}");
    }
    // --device overrides an lm evaluator's device, and is refused for a command evaluator
    let mut d = cpu.clone();
    d.evaluator.set_device("cuda:0".parse().unwrap()).unwrap();
    let EvaluatorDef::Lm { device, .. } = &d.evaluator else {
        panic!()
    };
    assert_eq!(
        device.as_ref().map(|d| d.to_string()).as_deref(),
        Some("cuda:0")
    );
}

/// `load_str(MINIMAL with `from` replaced by `to`)`'s error text.
fn refusal(from: &str, to: &str) -> String {
    let text = MINIMAL.replace(from, to);
    assert_ne!(text, MINIMAL, "`{from}` not in MINIMAL");
    match load_str(&text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn assert_refused(from: &str, to: &str, want: &str) {
    let e = refusal(from, to);
    assert!(e.contains(want), "expected `{want}` in: {e}");
    assert!(e.contains("/x/searches/t.toml"), "no file in: {e}");
}

// MINIMAL's lines: 8 `granularity`, 9 `[evaluator]`, 12 `[optimizer]`, 13 `generations = 3`.

#[test]
fn population_repeats_slots_and_budgets_are_bounded_with_key_and_line() {
    let gen3 = "generations = 3";
    assert_refused(
        gen3,
        "generations = 3\npopulation = 1000000000",
        "line 14: optimizer.population = 1000000000 must be in 2..=10000",
    );
    assert_refused(
        gen3,
        "generations = 3\npopulation = 1",
        "line 14: optimizer.population = 1 must be in 2..=10000",
    );
    assert_refused(
        gen3,
        "generations = 2000000",
        "line 13: optimizer.generations = 2000000 must be in 1..=1000000",
    );
    assert_refused(
        gen3,
        "generations = 3\npopulation = 8\nmax_evaluations = 7",
        "line 15: optimizer.max_evaluations = 7 must be in 8..=100000000",
    );
    assert_refused(
        gen3,
        "generations = 3\n[parallelism]\nslots = 5000",
        "line 15: parallelism.slots = 5000 must be in 1..=1024",
    );
    assert_refused(
        gen3,
        "generations = 3\n[parallelism]\nslots = 0",
        "line 15: parallelism.slots = 0 must be in 1..=1024",
    );
    let dfs = "kind = \"dfs\"\nrepeats = 1000000";
    assert_refused(
        "kind = \"ps\"\ngranularity = \"every:2\"",
        dfs,
        "line 8: space.repeats = 1000000 must be in 1..=16",
    );
    assert_refused(
        "kind = \"ps\"\ngranularity = \"every:2\"",
        "kind = \"dfs\"\nscale_range = [0.5, 1e300]",
        "line 8: space.scale_range [0.5, 1e300] must lie within [-100, 100]",
    );
    assert_refused(
        "kind = \"lm\"",
        "kind = \"lm\"\nbatch_size = 100000000",
        "line 11: evaluator.batch_size = 100000000 must be in 1..=65536",
    );
    // the bounds themselves are accepted
    let edge = MINIMAL.replace(
        gen3,
        "generations = 1000000\npopulation = 10000\nsigma0 = 10.0\n[parallelism]\nslots = 1024",
    );
    load_str(&edge).unwrap();
}

#[test]
fn generations_zero_is_refused() {
    assert_refused(
        "generations = 3",
        "generations = 0",
        "line 13: optimizer.generations = 0 must be in 1..=1000000",
    );
    assert_refused(
        "generations = 3",
        "max_evaluations = 0",
        "line 13: optimizer.max_evaluations = 0 must be in 2..=100000000",
    );
}

#[test]
fn non_finite_or_huge_sigma0_and_defaults_are_refused_with_key_and_line() {
    for (v, shown) in [
        ("nan", "NaN"),
        ("inf", "inf"),
        ("1e308", "1e308"),
        ("0.0", "0.0"),
        ("-0.2", "-0.2"),
    ] {
        assert_refused(
            "generations = 3",
            &format!("generations = 3\nsigma0 = {v}"),
            &format!("line 14: optimizer.sigma0 = {shown} must be > 0 and ≤ 10"),
        );
    }
    let gran = "granularity = \"every:2\"";
    assert_refused(
        gran,
        "granularity = \"every:2\"\ndefaults = { weight = nan }",
        "line 9: space.defaults.weight = NaN is not a finite number",
    );
    assert_refused(
        gran,
        "granularity = \"every:2\"\ndefaults = { weight = -inf, density = 0.5 }",
        "line 9: space.defaults.weight = -inf is not a finite number",
    );
    assert_refused(
        gran,
        "granularity = \"every:2\"\nranges = { density = [0.1, nan] }",
        "line 9: space.ranges.density: [0.1, NaN] is not a range",
    );
    assert_refused(
        "kind = \"ps\"\ngranularity = \"every:2\"",
        "kind = \"dfs\"\nindicator_threshold = nan",
        "line 8: space.indicator_threshold = NaN is not a finite number",
    );
}

#[test]
fn command_timeout_is_finite_and_at_most_30_days() {
    let lm = "kind = \"lm\"\ntasks = [{ name = \"add\", path = \"../tasks/add\", metric = \"exact_match\" }]";
    for (v, shown) in [
        ("1e300", "1e300"),
        ("nan", "NaN"),
        ("inf", "inf"),
        ("0", "0.0"),
    ] {
        assert_refused(
            lm,
            &format!(
                "kind = \"command\"\ncommand = [\"sh\", \"s.sh\", \"{{recipe}}\"]\ntimeout_s = {v}"
            ),
            &format!("line 12: evaluator.timeout_s = {shown} must be > 0 and ≤ 2592000 (30 days)"),
        );
    }
    let ok = MINIMAL.replace(
        lm,
        "kind = \"command\"\ncommand = [\"sh\", \"s.sh\", \"{recipe}\"]\ntimeout_s = 2592000",
    );
    load_str(&ok).unwrap();
    // an unknown placeholder is refused when the file is read, not when the search starts
    assert_refused(
        lm,
        "kind = \"command\"\ncommand = [\"sh\", \"{modeldir}\"]",
        "line 11: evaluator.command: unknown placeholder `{modeldir}`",
    );
}

#[test]
fn every_evaluation_failed_prints_the_first_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Quadratic::new();
    q.fail_on = (0..1000).collect();
    let s = ps_search(1, 2, Arc::new(q));
    let e = s.run(dir.path(), &quiet()).unwrap_err().to_string();
    assert!(e.contains("every evaluation failed (12 of 12)"), "{e}");
    assert!(
        e.contains("the first candidate's error: ") && e.contains("injected failure on call 0"),
        "{e}"
    );
    assert!(!e.contains("call 1"), "{e}");
    assert!(e.contains("history.jsonl"), "{e}");
}

#[test]
fn report_on_an_unfinished_run_says_the_search_has_not_finished() {
    let dir = tempfile::tempdir().unwrap();
    let s = ps_search(1, 4, Arc::new(Quadratic::new()));
    let opts = RunOptions {
        stop_after_evals: Some(8),
        ..quiet()
    };
    assert!(s.run(dir.path(), &opts).unwrap().interrupted);
    let e = evomerge::report::report(dir.path())
        .unwrap_err()
        .to_string();
    let d = dir.path().display();
    assert_eq!(
        e,
        format!(
            "search: {d}: the search has not finished (no report.json yet); run `evomerge \
             resume {d}` to finish it and write the report"
        )
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = evomerge::report::report(&empty).unwrap_err().to_string();
    assert!(e.contains("not a search's output directory"), "{e}");
    let e = evomerge::report::report(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such directory"), "{e}");
}

/// Two synthetic families: `n` layers and hidden `hidden`.
fn family_with(dir: &Path, layers: usize, hidden: usize) -> Vec<std::path::PathBuf> {
    let spec = evomerge::synth::LlamaSpec {
        layers,
        hidden,
        ..evomerge::synth::LlamaSpec::tiny()
    };
    evomerge::synth::write_family(&dir.join(format!("fam{layers}x{hidden}")), &spec, 1, 5).unwrap()
}

#[test]
fn ps_search_refuses_models_of_different_layer_counts() {
    let dir = tempfile::tempdir().unwrap();
    let two = family_with(dir.path(), 2, 16);
    let three = family_with(dir.path(), 3, 16);
    let toml = format!(
        r#"
name = "ps"
models = [{:?}, {:?}]
base_model = {:?}
method = "ties"
[space]
kind = "ps"
[evaluator]
kind = "lm"
tasks = []
[optimizer]
generations = 1
"#,
        two[1], three[1], two[0]
    );
    let def = SearchDef::from_toml(&toml, dir.path(), &dir.path().join("ps.toml")).unwrap();
    let eval = Arc::new(Quadratic::new());
    let e = Search::prepare_with(&def, eval.clone(), &quiet())
        .err()
        .expect("different layer counts accepted")
        .to_string();
    assert!(
        e.contains(&format!(
            "`{}` has 3 layers but `{}` has 2",
            three[1].display(),
            two[0].display()
        )),
        "{e}"
    );
    assert!(e.contains("needs equal layer counts"), "{e}");
    // equal counts are fine
    let same = toml.replace(&format!("{:?}", three[1]), &format!("{:?}", two[0]));
    let def = SearchDef::from_toml(&same, dir.path(), &dir.path().join("ps.toml")).unwrap();
    assert!(Search::prepare_with(&def, eval, &quiet()).is_ok());
}

/// Decision: a DFS route may run layers of models of different depth (each hop runs a layer of
/// its own model), so such a pool is accepted; models of different hidden size cannot pass the
/// hidden state between them and are refused up front.
#[test]
fn dfs_search_accepts_models_of_different_depth_but_not_width() {
    let dir = tempfile::tempdir().unwrap();
    let two = family_with(dir.path(), 2, 16);
    let three = family_with(dir.path(), 3, 16);
    let wide = family_with(dir.path(), 2, 32);
    let toml = |a: &Path, b: &Path| {
        format!(
            r#"
name = "dfs"
models = [{a:?}, {b:?}]
[space]
kind = "dfs"
repeats = 1
[evaluator]
kind = "lm"
tasks = []
[optimizer]
generations = 1
"#
        )
    };
    let eval = Arc::new(Quadratic::new());
    let def = SearchDef::from_toml(
        &toml(&two[1], &three[1]),
        dir.path(),
        &dir.path().join("d.toml"),
    )
    .unwrap();
    let s = Search::prepare_with(&def, eval.clone(), &quiet()).unwrap();
    let Space::Dfs(space) = &s.space else {
        panic!()
    };
    assert_eq!(space.layers, vec![2, 3]);
    let def = SearchDef::from_toml(
        &toml(&two[1], &wide[1]),
        dir.path(),
        &dir.path().join("d.toml"),
    )
    .unwrap();
    let e = Search::prepare_with(&def, eval, &quiet())
        .err()
        .expect("different widths accepted")
        .to_string();
    assert!(e.contains("has hidden_size 32 but"), "{e}");
}

/// The fenced TOML blocks of README.md's section that starts with `heading` (up to the next
/// heading of the same or a higher level).
fn readme_toml_blocks(heading: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = readme.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "README has no `{heading}`");
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    let mut other_fence = false;
    for line in lines {
        let fence = line.trim_start().starts_with("```");
        if let Some(b) = block.as_mut() {
            if fence {
                blocks.push(block.take().unwrap());
            } else {
                b.push_str(line);
                b.push('\n');
            }
            continue;
        }
        if other_fence {
            other_fence = !fence;
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        if line.trim() == "```toml" {
            block = Some(String::new());
        } else if fence {
            other_fence = true;
        }
    }
    blocks
}

/// The README's search-file example parses, validates and builds its PS space against the
/// method's current declarations (so it narrows, never widens, a declared range); its command
/// evaluator examples, put in the place of its `[evaluator]` section, parse and validate too.
/// Paths need not exist: nothing here opens them.
#[test]
fn readme_search_file_and_command_evaluator_examples_parse_and_validate() {
    let search = readme_toml_blocks("## Search files");
    assert_eq!(search.len(), 1, "{search:?}");
    let example = &search[0];
    let d = load_str(example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    let SpaceDef::Ps(ps) = &d.space else {
        panic!("the example is a PS search")
    };
    let method = evomerge::merge::method(d.method.as_deref().unwrap()).unwrap();
    let info = PsModels {
        method: method.name().into(),
        decls: method.params().to_vec(),
        models: vec!["a".into(), "b".into()],
        base: Some("base".into()),
        n_layers: 4,
        pre_tensors: vec!["model.embed_tokens.weight".into()],
        post_tensors: vec!["lm_head.weight".into()],
    };
    PsSpace::new(info, ps).unwrap_or_else(|e| panic!("{e}"));

    let start = example.find("[evaluator]").unwrap();
    let end = start + example[start..].find("\n[optimizer]").unwrap();
    let commands = readme_toml_blocks("### External command (`command`)");
    assert!(commands.len() >= 2, "{commands:?}");
    for block in &commands {
        assert!(block.starts_with("[evaluator]"), "{block}");
        let text = format!("{}{block}{}", &example[..start], &example[end..]);
        let d = load_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let EvaluatorDef::Command { spec, .. } = &d.evaluator else {
            panic!("not a command evaluator:\n{block}")
        };
        evomerge::eval::command::CommandEvaluator::try_new(spec.clone()).unwrap();
    }
}

/// Rewrites every other PS candidate's recipe to `lambda: 1e300` (a non-finite merge).
struct Blowup {
    inner: Arc<dyn CandidateBuilder>,
    calls: AtomicUsize,
}

impl CandidateBuilder for Blowup {
    fn build(&self, decoded: &Decoded) -> evomerge::Result<Candidate> {
        if self.calls.fetch_add(1, Ordering::SeqCst) % 2 == 1
            && let Decoded::Recipe(yaml) = decoded
        {
            let mut r = evomerge::search::run::parse_recipe(yaml)?;
            r.parameters.insert(
                "lambda".into(),
                evomerge::recipe::ParamSetting::number(1e300),
            );
            return self.inner.build(&Decoded::Recipe(r.to_yaml()));
        }
        self.inner.build(decoded)
    }
}

/// Issue 13: a candidate whose merge produces non-finite weights is a logged, penalised failed
/// candidate naming the tensor, not the end of the search.
#[test]
fn nonfinite_candidate_is_a_logged_failure_not_the_end_of_the_search() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family(dir.path());
    let toml = format!(
        r#"
name = "ps"
models = [{:?}, {:?}]
base_model = {:?}
method = "ties"
output = "out"
[space]
kind = "ps"
granularity = "whole"
embeddings = false
params = ["weight", "density"]
[evaluator]
kind = "lm"
tasks = []
[optimizer]
population = 4
generations = 2
seed = 3
[parallelism]
slots = 1
"#,
        fam[1], fam[2], fam[0]
    );
    let def = SearchDef::from_toml(&toml, dir.path(), &dir.path().join("ps.toml")).unwrap();
    let mem = evomerge::synth::mem_family(&evomerge::synth::LlamaSpec::tiny(), 2, 5);
    let eval = Arc::new(evomerge::eval::double::TargetDistance::new(Arc::new(
        mem[1].clone(),
    )));
    let opts = RunOptions {
        report: false,
        ..quiet()
    };
    let mut s = Search::prepare_with(&def, eval, &opts).unwrap();
    s.builder = Arc::new(Blowup {
        inner: s.builder.clone(),
        calls: AtomicUsize::new(0),
    });
    let out = def.output_dir();
    let sum = s.run(&out, &opts).unwrap();
    assert!(!sum.interrupted);
    assert_eq!(sum.evaluated, 8);
    assert_eq!(sum.failures, 4);
    let records = history::load(&out).unwrap();
    assert_eq!(records.len(), 8);
    for r in records.iter().filter(|r| r.error.is_some()) {
        let e = r.error.as_deref().unwrap();
        assert!(r.fitness.is_none());
        assert!(
            e.starts_with("building the candidate: tensor `")
                && e.contains("the merge produced a non-finite value"),
            "{e}"
        );
    }
    assert!(sum.best.fitness.is_some_and(f64::is_finite));
    assert!(out.join("best_recipe.yaml").exists());
}

#[test]
fn report_md_carries_the_search_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Quadratic::new();
    q.fail_on = vec![1, 4];
    let s = ps_search(1, 3, Arc::new(q));
    let sum = s.run(dir.path(), &quiet()).unwrap();
    assert_eq!(sum.failures, 2);
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    let best = sum.best.fitness.unwrap();
    assert!(
        md.contains(&format!("- best dev fitness: {:.1}", best * 100.0)),
        "{md}"
    );
    assert!(md.contains("- evaluations: 18 (2 failed)"), "{md}");
    assert!(md.contains("- generations: 3"), "{md}");
    assert!(md.contains("- wall time: "), "{md}");
    assert!(md.contains("- result: `best_recipe.yaml`"), "{md}");
    // `report` prints the same, scores in % as `eval` shows them
    let printed = evomerge::report::report(dir.path()).unwrap();
    assert_eq!(printed, md);
    assert!(printed.contains("Accuracy and fitness in %"), "{printed}");
    let saved = evomerge::report::load(dir.path()).unwrap();
    assert_eq!(saved.summary.unwrap().evaluations, 18);
}

#[test]
fn the_search_returns_the_report_rows_and_the_pipeline_writes_the_report() {
    let s = ps_search(1, 2, Arc::new(Quadratic::new()));
    // Without the hook the search writes its own outputs but no report or plots ...
    let bare = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        finish: None,
        plots: true,
        ..quiet()
    };
    let sum = s.run(bare.path(), &opts).unwrap();
    assert!(bare.path().join("best_recipe.yaml").exists());
    assert!(!bare.path().join("report.md").exists());
    assert!(!bare.path().join("plots").exists());
    // ... and returns what the report needs.
    let rows = sum.test_rows.as_ref().unwrap();
    assert_eq!(
        rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["default merge", "evolved (PS)"]
    );
    assert_eq!(sum.result_file.as_deref(), Some("best_recipe.yaml"));
    let report = evomerge::report::from_run(&sum).unwrap();
    assert_eq!(report.rows, *rows);
    assert_eq!(
        report.summary.as_ref().unwrap().result_file,
        "best_recipe.yaml"
    );
    // The pipeline runs the report after the search.
    let full = tempfile::tempdir().unwrap();
    let sum = evomerge::pipeline::run(&s, full.path(), &opts).unwrap();
    let saved = evomerge::report::load(full.path()).unwrap();
    assert_eq!(saved.rows, *sum.test_rows.as_ref().unwrap());
    assert!(full.path().join("report.md").exists());
    assert!(full.path().join("plots").exists());
}
