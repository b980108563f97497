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
        doc: "",
    },
    ParamDecl {
        name: "density",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1.0),
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
        parallelism: ParallelismDef { slots },
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
        report.contains("| default merge | -4.420 | **-4.420** |"),
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
    let ga = history::load_generations(full.path()).unwrap();
    let gb = history::load_generations(killed.path()).unwrap();
    assert_eq!(ga, gb);
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
            evomerge::merge::BaseUse::Optional => None,
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
