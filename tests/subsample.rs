//! Integration tests: cheaper fitness by racing (`[evaluator] subsample`,
//! `evomerge::eval::subsample`). The candidates are bigram "language models" built from the
//! decoded recipe's values, scored by the real LM evaluator, so a search runs in well under a
//! second per generation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use evomerge::candidate::{Candidate, CandidateBody};
use evomerge::eval::Split;
use evomerge::eval::double::{BigramLm, CharVocab, bigram_builder};
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::subsample::{BOUND_KEY, EXAMPLES_KEY, STOPPED_KEY, TOTAL_KEY, UPPER_KEY};
use evomerge::eval::tasks::{Example, Metric, Task, TaskSpec};
use evomerge::merge::{ParamDecl, ParamKind, Scope};
use evomerge::search::SearchDef;
use evomerge::search::def::{
    EvaluatorDef, Granularity, OptimizerDef, ParallelismDef, PsDef, Restarts, SpaceDef,
};
use evomerge::search::history::{self, Record};
use evomerge::search::run::{CandidateBuilder, RunOptions, RunSummary, Search};
use evomerge::search::space::{Decoded, PsModels, PsSpace, Space};

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

/// Prompt characters; every example asks for `Z` after one of them.
const PROMPTS: &str = "abcdefghijklmnopqrstuvwxyz012345";
/// The vocabulary: EOS, the prompts, then the wrong answer `Y` and the right one `Z`.
fn vocab() -> CharVocab {
    CharVocab::new(&format!("{PROMPTS}YZ"))
}

/// Every per-source parameter value of a decoded recipe, in order (8 here: 2 layers × 2 models
/// × weight, density).
fn recipe_values(yaml: &str) -> Vec<f64> {
    let v: serde_json::Value = yaml_serde::from_str(yaml).unwrap();
    let mut out = Vec::new();
    for slice in v["slices"].as_array().unwrap() {
        for src in slice["sources"].as_array().unwrap() {
            if let Some(ps) = src["parameters"].as_object() {
                out.extend(ps.values().map(|x| x.as_f64().unwrap()));
            }
        }
    }
    out
}

/// A bigram model whose answer after prompt character i is right when recipe value `i mod 8`
/// is below the character's threshold (0.15 … 0.95, rising with i): the fitness is a staircase
/// that rises as the values fall, with many levels, so candidates of one generation differ.
struct BigramFromRecipe;

impl CandidateBuilder for BigramFromRecipe {
    fn build(&self, decoded: &Decoded) -> evomerge::Result<Candidate> {
        let values = recipe_values(&decoded.text());
        let voc = vocab();
        let v = voc.len();
        let (y, z) = (voc.id('Y') as usize, voc.id('Z') as usize);
        let mut table = vec![-10.0f32; v * v];
        for (i, c) in PROMPTS.chars().enumerate() {
            let row = voc.id(c) as usize * v;
            let threshold = 0.15 + 0.8 * i as f64 / (PROMPTS.len() - 1) as f64;
            table[row + y] = 0.0;
            table[row + z] = (threshold - values[i % values.len()]) as f32;
        }
        Ok(Candidate {
            body: CandidateBody::Merged(Arc::new(BigramLm::mem_model(v, table))),
            recipe: Some(decoded.text()),
        })
    }
}

/// Three examples per prompt character on dev (96), one on test.
fn evaluator() -> Arc<LmEvaluator> {
    let ex = |c: char| Example::Generation {
        prompt: c.to_string(),
        target: "Z".into(),
    };
    let dev: Vec<Example> = (0..3).flat_map(|_| PROMPTS.chars().map(ex)).collect();
    let test: Vec<Example> = PROMPTS.chars().map(ex).collect();
    let mut spec = TaskSpec::new("z", "-", Metric::ExactMatch);
    spec.max_new_tokens = 1;
    let task = Task::from_examples(spec, dev, test).unwrap();
    let cfg = LmConfig {
        batch_size: 8,
        ..LmConfig::default()
    };
    Arc::new(
        LmEvaluator::try_new(vec![task], Arc::new(vocab()), cfg)
            .unwrap()
            .with_builder(bigram_builder()),
    )
}

const DEV_EXAMPLES: usize = 96;
const POPULATION: usize = 8;
const GENERATIONS: usize = 12;

fn search(subsample: Option<f64>, confidence: Option<f64>, slots: usize) -> Search {
    let ps = PsDef {
        granularity: Granularity::PerLayer,
        split_attn_mlp: false,
        embeddings: false,
        params: None,
        ranges: Default::default(),
        defaults: Default::default(),
    };
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
    let def = SearchDef {
        name: "race".into(),
        models: vec!["a".into(), "b".into()],
        base_model: Some("base".into()),
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
            fitness_split: Split::Dev,
            subsample,
            subsample_confidence: confidence,
        },
        optimizer: OptimizerDef {
            sigma0: 0.3,
            population: Some(POPULATION),
            generations: Some(GENERATIONS),
            max_evaluations: None,
            seed: 5,
            restarts: Restarts::None,
        },
        parallelism: ParallelismDef {
            slots,
            ..ParallelismDef::default()
        },
    };
    Search {
        def,
        space,
        builder: Arc::new(BigramFromRecipe),
        evaluator: evaluator(),
        sources: Vec::new(),
        pool_names: Vec::new(),
        merge_models: None,
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        write_model: false,
        report: false,
        plots: false,
        stop_after_evals: None,
        device: None,
        finish: None,
    }
}

fn run(s: &Search, dir: &Path) -> RunSummary {
    s.run(dir, &quiet()).unwrap()
}

type Key = (usize, Vec<u64>);

/// The history as a map from (generation, genome bits) to the record.
fn by_key(dir: &Path) -> BTreeMap<Key, Record> {
    history::load(dir)
        .unwrap()
        .into_iter()
        .map(|r| (history::key(r.generation, &r.genome), r))
        .collect()
}

/// A record's fitness bits and every metric's bits.
type Outcome = (Key, Option<u64>, Vec<(String, u64)>);

/// What must be identical between two runs: fitness bits and every metric.
fn outcome(h: &BTreeMap<Key, Record>) -> Vec<Outcome> {
    h.iter()
        .map(|(k, r)| {
            (
                k.clone(),
                r.fitness.map(f64::to_bits),
                r.metrics
                    .iter()
                    .map(|(m, v)| (m.clone(), v.to_bits()))
                    .collect(),
            )
        })
        .collect()
}

fn examples(h: &BTreeMap<Key, Record>) -> usize {
    h.values().map(|r| r.metrics[EXAMPLES_KEY] as usize).sum()
}

/// The candidate of a record scored whole, by the evaluator itself.
fn whole_fitness(s: &Search, r: &Record) -> f64 {
    let decoded = s.space.decode(&r.genome).unwrap();
    let c = s.builder.build(&decoded).unwrap();
    s.evaluator.evaluate(&c, Split::Dev).unwrap().primary
}

#[test]
fn a_subsampled_search_scores_fewer_examples_and_its_result_is_exact() {
    let full_dir = tempfile::tempdir().unwrap();
    let sub_dir = tempfile::tempdir().unwrap();
    let full = search(None, None, 2);
    let sub = search(Some(0.125), None, 2);
    let a = run(&full, full_dir.path());
    let b = run(&sub, sub_dir.path());
    assert_eq!(a.evaluated, POPULATION * GENERATIONS);
    assert_eq!(b.evaluated, POPULATION * GENERATIONS);

    // Without `subsample` nothing is raced or recorded.
    let hf = by_key(full_dir.path());
    assert!(hf.values().all(|r| !r.metrics.contains_key(EXAMPLES_KEY)));

    let h = by_key(sub_dir.path());
    assert_eq!(h.len(), POPULATION * GENERATIONS);
    let scored = examples(&h);
    let all = POPULATION * GENERATIONS * DEV_EXAMPLES;
    assert!(
        scored * 20 < all * 19,
        "racing saved under 5 %: {scored} of {all} examples"
    );
    let stopped: Vec<&Record> = h
        .values()
        .filter(|r| r.metrics[STOPPED_KEY] == 1.0)
        .collect();
    assert!(stopped.len() >= 10, "only {} stopped", stopped.len());

    for r in h.values() {
        let m = &r.metrics;
        assert_eq!(m[TOTAL_KEY], DEV_EXAMPLES as f64);
        let fitness = r.fitness.expect("no failures here");
        if r.generation == 0 {
            // the first generation has no bar: scored whole
            assert!(!m.contains_key(BOUND_KEY), "{m:?}");
        }
        if m[STOPPED_KEY] == 1.0 {
            let bar = m[BOUND_KEY];
            assert!(m[EXAMPLES_KEY] < DEV_EXAMPLES as f64);
            assert!(fitness <= m[UPPER_KEY] && m[UPPER_KEY] < bar, "{m:?}");
            // never stopped when it could have reached the bar: its whole score is below it
            assert!(whole_fitness(&sub, r) < bar, "{m:?}");
        } else {
            assert_eq!(m[EXAMPLES_KEY], DEV_EXAMPLES as f64);
            // scored to the end: exactly the whole evaluation's fitness
            assert_eq!(fitness, whole_fitness(&sub, r), "{m:?}");
        }
    }

    // The bar of generation g is the 4th best (μ = λ/2) of generation g − 1.
    for g in 1..GENERATIONS {
        let prev: Vec<Option<f64>> = h
            .values()
            .filter(|r| r.generation == g - 1)
            .map(|r| r.fitness)
            .collect();
        let mut sorted: Vec<f64> = prev.iter().flatten().copied().collect();
        sorted.sort_by(|x, y| y.total_cmp(x));
        for r in h.values().filter(|r| r.generation == g) {
            assert_eq!(r.metrics[BOUND_KEY], sorted[POPULATION / 2 - 1], "gen {g}");
        }
    }

    // The result is a fully scored candidate with its exact fitness.
    assert_eq!(b.best.metrics[STOPPED_KEY], 0.0);
    assert_eq!(b.best.fitness, Some(whole_fitness(&sub, &b.best)));
    assert!(b.best.fitness.unwrap() > 0.5, "{:?}", b.best.fitness);
    assert!(sub_dir.path().join("best_recipe.yaml").exists());

    // With a statistical bound (subsample_confidence) more is saved; the result is still a
    // fully scored candidate with its exact fitness, and stopped ones stay below their bar.
    let stat_dir = tempfile::tempdir().unwrap();
    let stat = search(Some(0.125), Some(0.9), 2);
    let c = run(&stat, stat_dir.path());
    let hs = by_key(stat_dir.path());
    let stat_scored = examples(&hs);
    assert!(
        stat_scored < scored,
        "statistical {stat_scored} vs exact {scored} examples"
    );
    for r in hs.values().filter(|r| r.metrics[STOPPED_KEY] == 1.0) {
        assert!(r.fitness.unwrap() < r.metrics[BOUND_KEY], "{:?}", r.metrics);
    }
    assert_eq!(c.best.metrics[STOPPED_KEY], 0.0);
    assert_eq!(c.best.fitness, Some(whole_fitness(&stat, &c.best)));
}

#[test]
fn a_subsampled_search_does_not_depend_on_slots_and_resumes_exactly() {
    let two = tempfile::tempdir().unwrap();
    let one = tempfile::tempdir().unwrap();
    let killed = tempfile::tempdir().unwrap();
    let a = run(&search(Some(0.125), None, 2), two.path());
    let ha = by_key(two.path());
    assert!(ha.values().any(|r| r.metrics[STOPPED_KEY] == 1.0));

    // One slot instead of two: other completion orders, the same decisions.
    let b = run(&search(Some(0.125), None, 1), one.path());
    assert_eq!(outcome(&ha), outcome(&by_key(one.path())));
    assert_eq!(a.best.genome, b.best.genome);

    // Killed in the middle of generation 5 (after 44 evaluations started), then resumed.
    let s = search(Some(0.125), None, 2);
    let opts = RunOptions {
        stop_after_evals: Some(5 * POPULATION + 4),
        ..quiet()
    };
    let k = s.run(killed.path(), &opts).unwrap();
    assert!(k.interrupted);
    let partial = history::load(killed.path()).unwrap().len();
    assert!(partial > 5 * POPULATION, "{partial}");
    let c = run(&s, killed.path());
    assert!(!c.interrupted);
    assert_eq!(c.replayed, partial);
    assert_eq!(c.evaluated + c.replayed, POPULATION * GENERATIONS);
    assert_eq!(outcome(&ha), outcome(&by_key(killed.path())));
    let bits = |g: &[f64]| g.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.best.genome), bits(&c.best.genome));
    assert_eq!(a.best.fitness, c.best.fitness);
    // generations.csv agrees (but for its timing columns)
    let rows = |d: &Path| -> Vec<_> {
        history::load_generations(d)
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.generation,
                    r.run,
                    r.evals,
                    [r.best, r.mean, r.worst, r.sigma].map(f64::to_bits),
                    r.failures,
                )
            })
            .collect()
    };
    assert_eq!(rows(two.path()), rows(killed.path()));
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
[evaluator]
kind = "lm"
subsample = 0.125
tasks = [{ name = "add", path = "../tasks/add", metric = "exact_match" }]
[optimizer]
generations = 3
"#;

#[test]
fn subsample_is_checked_with_its_key_and_line() {
    let d = load_str(MINIMAL).unwrap();
    assert_eq!(d.evaluator.subsample(), Some(0.125));
    // kept in the run's search.toml, so a resume races the same way
    let saved = toml::to_string(&d).unwrap();
    assert!(saved.contains("subsample = 0.125"), "{saved}");
    for (v, shown) in [
        ("1.0", "1.0"),
        ("0", "0.0"),
        ("-0.5", "-0.5"),
        ("nan", "NaN"),
    ] {
        let text = MINIMAL.replace("subsample = 0.125", &format!("subsample = {v}"));
        let e = load_str(&text).unwrap_err().to_string();
        assert!(e.contains("/x/searches/t.toml"), "{e}");
        assert!(
            e.contains(&format!(
                "line 10: evaluator.subsample = {shown} must be in (0, 1)"
            )),
            "{e}"
        );
    }
    let command = MINIMAL.replace(
        "kind = \"lm\"\nsubsample = 0.125\ntasks = [{ name = \"add\", path = \"../tasks/add\", \
         metric = \"exact_match\" }]",
        "kind = \"command\"\ncommand = [\"sh\", \"s.sh\", \"{recipe}\"]\nsubsample = 0.5",
    );
    assert_ne!(command, MINIMAL);
    let e = load_str(&command).unwrap_err().to_string();
    assert!(
        e.contains("line 11: evaluator.subsample needs kind = \"lm\""),
        "{e}"
    );
    // without it: no racing
    let plain = MINIMAL.replace("subsample = 0.125\n", "");
    assert_eq!(load_str(&plain).unwrap().evaluator.subsample(), None);

    // subsample_confidence: in (0, 1), and only with subsample
    let with =
        |c: &str| MINIMAL.replace("subsample = 0.125\n", &format!("subsample = 0.125\n{c}\n"));
    let d = load_str(&with("subsample_confidence = 0.95")).unwrap();
    let race = d.evaluator.race().unwrap();
    assert_eq!((race.fraction, race.confidence), (0.125, Some(0.95)));
    for (v, shown) in [("1.0", "1.0"), ("0", "0.0"), ("inf", "inf")] {
        let e = load_str(&with(&format!("subsample_confidence = {v}")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "line 11: evaluator.subsample_confidence = {shown} must be in (0, 1)"
            )),
            "{e}"
        );
    }
    let alone = plain.replace(
        "kind = \"lm\"\n",
        "kind = \"lm\"\nsubsample_confidence = 0.9\n",
    );
    let e = load_str(&alone).unwrap_err().to_string();
    assert!(
        e.contains("line 10: evaluator.subsample_confidence bounds the race of evaluator.subsample, which is not set"),
        "{e}"
    );
}
