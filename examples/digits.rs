//! The digits world (issue 5): trains small MLPs on the UCI handwritten digits and compares the
//! data-aware and alignment merges on the held-out test split.
//!
//! ```text
//! cargo run --release --example digits [-- --seed 0 --out target/digits-world]
//! ```
//!
//! It builds every model the comparisons need and writes them (config.json + model.safetensors,
//! plus fisher.safetensors / regmean.safetensors beside the experts) under `--out`, with recipes
//! (`experts-fisher.yaml`, `experts-regmean.yaml`, `swa-lr0.1.yaml`, `rebasin-aligned.yaml`, ...)
//! so the same merges can be redone with `evomerge merge` (the Fisher recipe saves the raw Fisher
//! beside each expert, i.e. the "raw Fisher" row), and `evomerge align` can redo the alignment. Then it prints a Markdown table of test
//! accuracies:
//!
//! 1. **Git Re-Basin**: two MLPs from different initialisations; naive average vs weight matching
//!    then average.
//! 2. **Soups**: fine-tunes of one base with different hyper-parameters; best single (by dev) vs
//!    uniform soup vs greedy soup.
//! 3. **SWA**: checkpoints of the last epochs of one SGD run vs the final iterate.
//! 4. **Experts**: a weak base fine-tuned on classes 0–4 and on 5–9; simple average, Fisher,
//!    RegMean, task arithmetic (λ = 1), and task arithmetic with per-layer λ evolved by CMA-ES on
//!    the dev split.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use evomerge::align::{MatchConfig, align};
use evomerge::candidate::{Candidate, CandidateBody, MemModel, TensorMap};
use evomerge::eval::classify::{ClassifyEvaluator, Dataset, Splits};
use evomerge::eval::{Evaluator, Split};
use evomerge::merge::fisher::{FisherLabels, mlp_fisher, normalize_fisher};
use evomerge::merge::regmean::mlp_grams;
use evomerge::merge::soup::{greedy_soup, merge_mem, swa, uniform_soup};
use evomerge::merge::{Params, fisher, regmean};
use evomerge::model::mlp::{Mlp, MlpConfig, Optim, TrainConfig, save_mem, save_tensors};
use evomerge::tensor::TensorBuf;

struct Args {
    seed: u64,
    out: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seed: 0,
        out: PathBuf::from("target/digits-world"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => args.seed = it.next().context("--seed needs a value")?.parse()?,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            other => bail!("unknown argument `{other}` (expected --seed N, --out DIR)"),
        }
    }
    Ok(args)
}

/// One row of the results table.
struct Row {
    section: &'static str,
    name: String,
    dev: f64,
    test: f64,
}

struct World {
    eval: ClassifyEvaluator,
    rows: Vec<Row>,
    out: PathBuf,
}

impl World {
    fn score(&self, model: &MemModel, split: Split) -> anyhow::Result<f64> {
        let c = Candidate {
            body: CandidateBody::Merged(Arc::new(model.clone())),
            recipe: None,
        };
        Ok(self.eval.evaluate(&c, split)?.primary)
    }

    fn report(
        &mut self,
        section: &'static str,
        name: &str,
        model: &MemModel,
    ) -> anyhow::Result<()> {
        let dev = self.score(model, Split::Dev)?;
        let test = self.score(model, Split::Test)?;
        println!(
            "  {section:<10} {name:<34} dev {:6.2} %  test {:6.2} %",
            dev * 100.0,
            test * 100.0
        );
        self.rows.push(Row {
            section,
            name: name.to_string(),
            dev,
            test,
        });
        Ok(())
    }

    fn save(&self, name: &str, model: &MemModel) -> anyhow::Result<PathBuf> {
        let dir = self.out.join(name);
        save_mem(model, &dir)?;
        Ok(dir)
    }
}

fn train(cfg: &MlpConfig, init: u64, data: &Dataset, tc: &TrainConfig) -> anyhow::Result<Mlp> {
    let device = Device::Cpu;
    let mut mlp = Mlp::init(cfg, init, &device)?;
    mlp.train(&data.x_tensor(&device)?, &data.y, tc, |_, _| Ok(()))?;
    Ok(mlp)
}

/// Write a mergekit-style recipe over model directories under `out` (absolute paths), so the
/// same merge can be redone with `evomerge merge RECIPE OUT`.
fn write_recipe(
    out: &std::path::Path,
    file: &str,
    method: &str,
    models: &[&str],
) -> anyhow::Result<()> {
    let root = std::fs::canonicalize(out)?;
    let mut text = format!("merge_method: {method}\nmodels:\n");
    for m in models {
        let dir = root.join(m);
        text += &format!("  - model: {}\n", dir.display());
        // RegMean declares no per-model parameters.
        if method != "regmean" {
            text += "    parameters:\n      weight: 1.0\n";
        }
    }
    text += "dtype: float32\n";
    std::fs::write(out.join(file), text)?;
    Ok(())
}

fn fine_tune(base: &Mlp, data: &Dataset, tc: &TrainConfig) -> anyhow::Result<Mlp> {
    let mut mlp = base.snapshot()?;
    mlp.train(&data.x_tensor(&Device::Cpu)?, &data.y, tc, |_, _| Ok(()))?;
    Ok(mlp)
}

fn adam(epochs: usize, lr: f64, weight_decay: f64, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr,
        optim: Optim::AdamW { weight_decay },
        seed,
    }
}

/// `base + Σ λ[k][layer] (model_k − base)`, λ per model and per layer (weight and bias share it).
fn task_arithmetic(base: &MemModel, models: &[&MemModel], lambdas: &[Vec<f64>]) -> MemModel {
    let mut tensors = TensorMap::new();
    for (name, b) in &base.tensors {
        let layer: usize = name
            .split('.')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut data = b.to_f32_vec();
        let bv = b.values();
        for (m, lam) in models.iter().zip(lambdas) {
            let l = lam[layer.min(lam.len() - 1)] as f32;
            for (d, (x, y)) in data
                .iter_mut()
                .zip(m.tensors[name].values().iter().zip(bv.iter()))
            {
                *d += l * (x - y);
            }
        }
        tensors.insert(name.clone(), TensorBuf::new(b.shape.clone(), data));
    }
    MemModel {
        config: base.config.clone(),
        tensors,
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let splits = Splits::digits(args.seed)?;
    println!(
        "digits: {} train / {} dev / {} test (seed {}), models under {}",
        splits.train.len(),
        splits.dev.len(),
        splits.test.len(),
        args.seed,
        args.out.display()
    );
    let mut w = World {
        eval: ClassifyEvaluator::new("digits", splits.dev.clone(), splits.test.clone()),
        rows: Vec::new(),
        out: args.out.clone(),
    };
    let cfg = MlpConfig::relu(vec![64, 128, 128, 10]);
    let s = args.seed * 1000;

    // 1. Git Re-Basin: two models from different initialisations.
    let a = train(&cfg, s + 1, &splits.train, &adam(30, 1e-3, 0.0, s + 1))?.to_mem()?;
    let b = train(&cfg, s + 2, &splits.train, &adam(30, 1e-3, 0.0, s + 2))?.to_mem()?;
    w.save("rebasin-a", &a)?;
    w.save("rebasin-b", &b)?;
    w.report("re-basin", "model A (init 1)", &a)?;
    w.report("re-basin", "model B (init 2)", &b)?;
    w.report("re-basin", "naive average", &uniform_soup(&[&a, &b])?)?;
    let (b_aligned, matching) = align(&a, &b, &MatchConfig::default())?;
    println!(
        "  weight matching: {} sweeps, Σ⟨W_A, W_B⟩ {:.2} → {:.2}",
        matching.sweeps, matching.before, matching.after
    );
    w.save("rebasin-b-aligned", &b_aligned)?;
    w.report(
        "re-basin",
        "weight matching + average",
        &uniform_soup(&[&a, &b_aligned])?,
    )?;

    // 2. Soups: fine-tunes of one base with different hyper-parameters.
    let base = train(&cfg, s + 3, &splits.train, &adam(5, 1e-3, 0.0, s + 3))?;
    let hps = [
        (10, 1e-3, 0.0),
        (10, 3e-4, 0.0),
        (20, 3e-4, 0.01),
        (10, 1e-3, 0.1),
        (15, 5e-4, 0.0),
        (5, 3e-3, 0.0),
    ];
    let mut fine_tunes = Vec::new();
    for (k, (epochs, lr, wd)) in hps.iter().enumerate() {
        let ft = fine_tune(
            &base,
            &splits.train,
            &adam(*epochs, *lr, *wd, s + 10 + k as u64),
        )?;
        fine_tunes.push(ft.to_mem()?);
    }
    let refs: Vec<&MemModel> = fine_tunes.iter().collect();
    let greedy = greedy_soup(&refs, &w.eval)?;
    let best = (0..refs.len())
        .max_by(|&i, &j| greedy.individual[i].total_cmp(&greedy.individual[j]))
        .unwrap_or(0);
    for (k, ft) in fine_tunes.iter().enumerate() {
        let (e, lr, wd) = hps[k];
        w.save(&format!("soup-ft{k}"), ft)?;
        w.report(
            "soups",
            &format!("fine-tune {k} (ep {e}, lr {lr}, wd {wd})"),
            ft,
        )?;
    }
    w.report(
        "soups",
        &format!("best single by dev (fine-tune {best})"),
        refs[best],
    )?;
    w.report("soups", "uniform soup", &uniform_soup(&refs)?)?;
    let members: Vec<String> = greedy.members.iter().map(|m| m.to_string()).collect();
    w.report(
        "soups",
        &format!("greedy soup ({{{}}})", members.join(", ")),
        &greedy.model,
    )?;

    // 3. SWA: the last 10 epoch-end checkpoints of one constant-lr SGD run, at two rates.
    let device = Device::Cpu;
    let x_train = splits.train.x_tensor(&device)?;
    for lr in [0.1, 0.3] {
        let mut run = Mlp::init(&cfg, s + 4, &device)?;
        let sgd = TrainConfig {
            epochs: 40,
            batch_size: 16,
            lr,
            optim: Optim::Sgd,
            seed: s + 4,
        };
        let mut checkpoints = Vec::new();
        run.train(&x_train, &splits.train.y, &sgd, |epoch, m| {
            if epoch > sgd.epochs - 10 {
                checkpoints.push(m.to_mem()?);
            }
            Ok(())
        })?;
        let ck: Vec<&MemModel> = checkpoints.iter().collect();
        let final_iterate = run.to_mem()?;
        w.save(&format!("swa-lr{lr}-final"), &final_iterate)?;
        for (k, c) in checkpoints.iter().enumerate() {
            w.save(&format!("swa-lr{lr}-epoch{}", sgd.epochs - 9 + k), c)?;
        }
        w.report(
            "swa",
            &format!("final iterate (SGD lr {lr}, 40 ep)"),
            &final_iterate,
        )?;
        w.report("swa", &format!("SWA of epochs 31–40 (lr {lr})"), &swa(&ck)?)?;
        let names: Vec<String> = (31..=40).map(|e| format!("swa-lr{lr}-epoch{e}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        write_recipe(&w.out, &format!("swa-lr{lr}.yaml"), "linear", &names)?;
    }

    // 4. Experts from one weak base on disjoint classes.
    let small = splits.train.sample(100, s + 5);
    let weak = train(&cfg, s + 5, &small, &adam(10, 1e-3, 0.0, s + 5))?;
    let low = splits.train.with_classes(&[0, 1, 2, 3, 4]);
    let high = splits.train.with_classes(&[5, 6, 7, 8, 9]);
    let ea = fine_tune(&weak, &low, &adam(10, 1e-3, 0.0, s + 6))?;
    let eb = fine_tune(&weak, &high, &adam(10, 1e-3, 0.0, s + 7))?;
    let fa = mlp_fisher(&ea, &low, FisherLabels::Sampled(s + 8), 1000)?;
    let fb = mlp_fisher(&eb, &high, FisherLabels::Sampled(s + 9), 1000)?;
    let ga = mlp_grams(&ea, &low)?;
    let gb = mlp_grams(&eb, &high)?;
    let (weak, ea, eb) = (weak.to_mem()?, ea.to_mem()?, eb.to_mem()?);
    w.save("experts-base", &weak)?;
    for (name, m, f, g) in [
        ("experts-0-4", &ea, &fa, &ga),
        ("experts-5-9", &eb, &fb, &gb),
    ] {
        let dir = w.save(name, m)?;
        save_tensors(&dir.join(fisher::FISHER_FILE), f)?;
        save_tensors(&dir.join(regmean::REGMEAN_FILE), g)?;
    }
    let pair = ["experts-0-4", "experts-5-9"];
    write_recipe(&w.out, "experts-average.yaml", "linear", &pair)?;
    write_recipe(&w.out, "experts-fisher.yaml", "fisher", &pair)?;
    write_recipe(&w.out, "experts-regmean.yaml", "regmean", &pair)?;
    write_recipe(
        &w.out,
        "rebasin-naive.yaml",
        "linear",
        &["rebasin-a", "rebasin-b"],
    )?;
    write_recipe(
        &w.out,
        "rebasin-aligned.yaml",
        "linear",
        &["rebasin-a", "rebasin-b-aligned"],
    )?;
    w.report("experts", "base (100 examples)", &weak)?;
    w.report("experts", "expert 0–4", &ea)?;
    w.report("experts", "expert 5–9", &eb)?;
    let none = Params::default();
    w.report("experts", "simple average", &uniform_soup(&[&ea, &eb])?)?;
    let fisher_merge = merge_mem(&fisher::Fisher, &[&ea, &eb], &[&fa, &fb], &none, &[], 0)?;
    w.report("experts", "Fisher merging (raw Fisher)", &fisher_merge)?;
    let (mut fa_n, mut fb_n) = (fa.clone(), fb.clone());
    normalize_fisher(&mut fa_n);
    normalize_fisher(&mut fb_n);
    let fisher_norm = merge_mem(&fisher::Fisher, &[&ea, &eb], &[&fa_n, &fb_n], &none, &[], 0)?;
    w.report(
        "experts",
        "Fisher merging (each Fisher mean 1)",
        &fisher_norm,
    )?;
    let regmean_merge = merge_mem(&regmean::RegMean, &[&ea, &eb], &[&ga, &gb], &none, &[], 0)?;
    w.report("experts", "RegMean (α 0.95)", &regmean_merge)?;
    let n_layers = cfg.n_layers();
    let ta = task_arithmetic(
        &weak,
        &[&ea, &eb],
        &[vec![1.0; n_layers], vec![1.0; n_layers]],
    );
    w.report("experts", "task arithmetic (λ = 1)", &ta)?;
    // CMA-ES over per-layer λ of both task vectors, fitness = dev accuracy.
    let dim = 2 * n_layers;
    let objective = |x: &cmaes::DVector<f64>| -> f64 {
        let l: Vec<f64> = x.iter().map(|v| v.clamp(0.0, 2.0)).collect();
        let m = task_arithmetic(
            &weak,
            &[&ea, &eb],
            &[l[..n_layers].to_vec(), l[n_layers..].to_vec()],
        );
        match w.score(&m, Split::Dev) {
            Ok(acc) => -acc,
            Err(_) => 1.0,
        }
    };
    let mut es = cmaes::CMAESOptions::new(vec![1.0; dim], 0.3)
        .seed(s + 11)
        .max_function_evals(300)
        .build(objective)
        .map_err(|e| anyhow::anyhow!("cmaes: {e:?}"))?;
    es.run();
    let best_l: Vec<f64> = es
        .overall_best_individual()
        .context("CMA-ES evaluated nothing")?
        .point
        .iter()
        .map(|v| v.clamp(0.0, 2.0))
        .collect();
    drop(es);
    let evolved = task_arithmetic(
        &weak,
        &[&ea, &eb],
        &[best_l[..n_layers].to_vec(), best_l[n_layers..].to_vec()],
    );
    let shown: Vec<String> = best_l.iter().map(|v| format!("{v:.2}")).collect();
    println!(
        "  evolved λ (0–4 layers, then 5–9 layers): [{}]",
        shown.join(", ")
    );
    w.report(
        "experts",
        "task arithmetic, λ by CMA-ES (300 evals)",
        &evolved,
    )?;

    println!("\n| world | model | dev acc. | test acc. |\n|---|---|---:|---:|");
    for r in &w.rows {
        println!(
            "| {} | {} | {:.2} % | {:.2} % |",
            r.section,
            r.name,
            r.dev * 100.0,
            r.test * 100.0
        );
    }
    println!("\n({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
