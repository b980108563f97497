//! Integration tests: `arcee_fusion`, `ram` and `ramplus_tl` against mergekit 0.1.5 (f32 and
//! bf16 inputs), and the TIES / Breadcrumbs tie rule on bf16 inputs.
//!
//! Golden files are in `tests/golden/<case>/` (made by `tests/golden/make_golden.py`; the bf16
//! cases read `tests/golden/models_bf16`, the f32 models rounded to bfloat16). mergekit computes
//! in the recipe's dtype; evomerge computes in `f32` — so the f32 cases must agree to float
//! rounding, while the bf16 cases are compared in bf16 ulps of mergekit's value, with the
//! entries whose decision (a threshold compare) came out the other way counted separately.
//!
//! The tie cases (`ties_bf16`, `breadcrumbs_bf16`, `breadcrumbs_ties_bf16`) merge one model of
//! weight 1, so `merged − base` shows which task-vector entries mergekit kept. bf16 task vectors
//! take few distinct magnitudes, so many entries tie at a cut; mergekit keeps whichever tied
//! entries torch's unstable sort puts first, evomerge those with the larger indices above a cut
//! (ranks ascend by (|δ|, index)). What can be checked exactly is checked: kept counts, every
//! entry strictly inside the kept magnitude range kept and every one strictly outside dropped,
//! and the kept values equal.
//!
//! DELLA has no bf16 case: its kept set is a random draw per entry, and a tie at equal
//! magnitudes only permutes the keep probabilities among the tied entries of a row, so nothing
//! exact can be compared — and that permutation is far below the seed-to-seed spread the della
//! statistics cases of `tests/methods.rs` allow.

use std::collections::BTreeMap;

use evomerge::merge::{self, MergeInput, MergeMethod, Params, Scope, tensor_seed};

use crate::methods_more::{Tensors, golden, load};

/// The golden models: `models` (f32) or `models_bf16`.
fn models(dir: &str) -> BTreeMap<&'static str, Tensors> {
    ["base", "ft_a", "ft_b"]
        .into_iter()
        .map(|m| {
            let path = golden().join(dir).join(m).join("model.safetensors");
            (m, load(&path))
        })
        .collect()
}

/// `f32` → bf16 → `f32`, round to nearest even (as torch casts).
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// One bf16 ulp at `x` (the spacing of bf16 values of `x`'s binade; normal numbers).
fn bf16_ulp(x: f32) -> f32 {
    let exp = (x.abs().to_bits() >> 23) as i32 - 127;
    2f32.powi(exp.max(-126) - 7)
}

/// A golden case with only scalar parameters.
struct Case {
    dir: &'static str,
    method: &'static str,
    bf16: bool,
    models: &'static [&'static str],
    global: &'static [(&'static str, f64)],
    per_model: &'static [(&'static str, f64)],
}

/// Parameters with the method's declared defaults filled in.
fn with_defaults(method: &dyn MergeMethod, scope: Scope, pairs: &[(&str, f64)]) -> Params {
    let mut p = Params::default();
    for d in method.params().iter().filter(|d| d.scope == scope) {
        if let Some(v) = d.default {
            p.set(d.name, v);
        }
    }
    for (k, v) in pairs {
        assert!(
            method
                .params()
                .iter()
                .any(|d| d.name == *k && d.scope == scope),
            "{} does not declare {k} as {scope:?}",
            method.name()
        );
        p.set(k, *v);
    }
    p
}

/// Merge every tensor as `case` says (method math only; the base is always the recipe's
/// `base_model`).
fn merge_case(case: &Case, models: &BTreeMap<&str, Tensors>) -> Tensors {
    let method = merge::method(case.method).unwrap();
    models["base"]
        .iter()
        .map(|(name, (shape, base))| {
            let input = MergeInput {
                tensor: name,
                shape,
                base: Some(base),
                models: case
                    .models
                    .iter()
                    .map(|m| models[m][name].1.as_slice())
                    .collect(),
                model_params: case
                    .models
                    .iter()
                    .map(|_| with_defaults(method, Scope::PerModel, case.per_model))
                    .collect(),
                global: with_defaults(method, Scope::Global, case.global),
                aux: Vec::new(),
                seed: tensor_seed(0, name),
            };
            let out = method
                .merge(&input)
                .unwrap_or_else(|e| panic!("{}: {name}: {e}", case.dir));
            (name.clone(), (shape.clone(), out))
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let f32_case = |dir, method, models, global| Case {
        dir,
        method,
        bf16: false,
        models,
        global,
        per_model: &[],
    };
    vec![
        f32_case("arcee_fusion", "arcee_fusion", &["ft_a"], &[]),
        f32_case("ram", "ram", &["ft_a", "ft_b"], &[("epsilon", 0.04)]),
        f32_case(
            "ramplus_tl",
            "ramplus_tl",
            &["ft_a", "ft_b"],
            &[("r", 0.3), ("alpha", 0.5), ("epsilon", 0.1)],
        ),
        Case {
            dir: "arcee_fusion_bf16",
            bf16: true,
            ..f32_case("", "arcee_fusion", &["ft_a"], &[])
        },
        Case {
            dir: "ram_bf16",
            bf16: true,
            ..f32_case("", "ram", &["ft_a", "ft_b"], &[])
        },
        Case {
            dir: "ramplus_tl_bf16",
            bf16: true,
            ..f32_case(
                "",
                "ramplus_tl",
                &["ft_a", "ft_b"],
                &[("r", 0.3), ("alpha", 0.5), ("epsilon", 0.1)],
            )
        },
    ]
}

fn check_names(case: &str, got: &Tensors, want: &Tensors) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
}

/// On f32 inputs the three methods equal mergekit's output to float rounding (relative to each
/// tensor's largest magnitude, as `tests/methods.rs` measures).
#[test]
fn f32_cases_match_mergekit() {
    let models = models("models");
    for case in cases().iter().filter(|c| !c.bf16) {
        let want = load(&golden().join(case.dir).join("merged.safetensors"));
        let got = merge_case(case, &models);
        check_names(case.dir, &got, &want);
        let mut worst = 0.0f64;
        for (name, (shape, w)) in &want {
            let (gshape, g) = &got[name];
            assert_eq!(gshape, shape, "{}: {name} shape", case.dir);
            let scale = w.iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-6);
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                let rel = f64::from((a - b).abs() / scale);
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-5,
                    "{}: {name}[{i}]: got {a}, mergekit {b} (relative error {rel:.2e})",
                    case.dir
                );
            }
        }
        println!("{}: max relative error {worst:.2e}", case.dir);
    }
}

/// On bf16 inputs (mergekit computing in bf16, evomerge in f32): every entry within 2 bf16 ulps
/// (of the entry's largest input or output) of mergekit's value but for those whose threshold decision differs — `|δ| > ε` for RAM,
/// `importance ≥ fence` for Arcee Fusion, both computed from bf16-rounded values by mergekit —
/// each then equal (to 2 ulps) to a value the other decision gives; at most 1 % of the entries
/// for RAM, 6 % for Arcee Fusion (see below).
#[test]
fn bf16_cases_match_mergekit_within_bf16_rounding() {
    let models = models("models_bf16");
    for case in cases().iter().filter(|c| c.bf16) {
        let want = load(&golden().join(case.dir).join("merged.safetensors"));
        let got = merge_case(case, &models);
        check_names(case.dir, &got, &want);
        let (mut total, mut flipped, mut worst) = (0usize, 0usize, 0.0f32);
        for (name, (_, w)) in &want {
            let g = &got[name].1;
            let base = &models["base"][name].1;
            for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                total += 1;
                // ulps at the entry's largest input or output: mergekit rounds every step
                // (task vector, quotient, sum) to bf16, so a result that cancels to near zero
                // carries the absolute error of its inputs
                let scale = case
                    .models
                    .iter()
                    .map(|m| models[m][name].1[i].abs())
                    .fold(base[i].abs().max(b.abs()), f32::max);
                let ulp = bf16_ulp(scale);
                let ulps = (a - b).abs() / ulp;
                if ulps <= 2.0 {
                    worst = worst.max(ulps);
                    continue;
                }
                flipped += 1;
                // a decision the other way: mergekit's value is what the other outcome gives
                let outcomes: Vec<f32> = match case.method {
                    // mergekit adds the bf16-rounded task vector to the base in f32
                    "arcee_fusion" => {
                        let m = models["ft_a"][name].1[i];
                        vec![base[i], m, base[i] + bf16(m - base[i])]
                    }
                    _ => ram_outcomes(case, &models, name, i),
                };
                assert!(
                    outcomes.iter().any(|&o| (o - b).abs() <= 2.0 * ulp),
                    "{}: {name}[{i}]: got {a}, mergekit {b} ({ulps:.1} ulps), \
                     no outcome {outcomes:?} matches",
                    case.dir
                );
            }
        }
        println!(
            "{}: {total} entries, largest difference {worst:.2} bf16 ulps; \
             {flipped} decided the other way",
            case.dir
        );
        // Arcee Fusion's fence decision is noisy in bf16: mergekit's bf16 per-row KL is mostly
        // rounding (p/q rounds to a multiple of 2⁻⁸ near 1, so ln(p/q) takes few values) —
        // mergekit's own formula evaluated in f64 on these bf16 inputs decides 113 of the 2232
        // entries differently from its bf16 run. RAM's `|δ| > ε` differs only at ε itself.
        let percent = if case.method == "arcee_fusion" { 6 } else { 1 };
        assert!(
            flipped * 100 <= percent * total,
            "{}: {flipped} of {total} entries differ",
            case.dir
        );
    }
}

/// The values RAM can give entry `i` for every set of contributors (a model whose |δ| is near
/// ε may count in one implementation and not in the other).
fn ram_outcomes(case: &Case, models: &BTreeMap<&str, Tensors>, name: &str, i: usize) -> Vec<f32> {
    let b = models["base"][name].1[i];
    let d: Vec<f32> = case
        .models
        .iter()
        .map(|m| models[m][name].1[i] - b)
        .collect();
    let k = d.len();
    let mut out = Vec::new();
    for set in 0u32..(1 << k) {
        let c = set.count_ones() as f32;
        // ramplus_tl scales a lone contributor by λ ∈ [1, 1 + r·α]: allow both ends
        let lambdas: &[f32] = if case.method == "ramplus_tl" {
            &[1.0, 1.15]
        } else {
            &[1.0]
        };
        for &l in lambdas {
            let sum: f32 = (0..k)
                .filter(|j| set >> j & 1 == 1)
                .map(|j| if c == 1.0 { d[j] * l } else { d[j] / c })
                .sum();
            out.push(b + sum);
        }
    }
    out
}

/// A one-model tie case: the kept window of ascending |δ| ranks `[lo, hi)` per tensor.
struct TieCase {
    dir: &'static str,
    method: &'static str,
    /// The one model (a slice, as [`Case`] takes).
    model: &'static [&'static str],
    per_model: &'static [(&'static str, f64)],
    global: &'static [(&'static str, f64)],
    /// `(lo, hi)` from the element count, as mergekit 0.1.5's `sparsify.py` computes them.
    window: fn(usize) -> (usize, usize),
}

fn tie_cases() -> Vec<TieCase> {
    vec![
        TieCase {
            dir: "ties_bf16",
            method: "ties",
            model: &["ft_a"],
            per_model: &[("weight", 1.0), ("density", 0.5)],
            global: &[],
            window: |n| (n - ((0.5 * n as f64) as usize).max(1), n),
        },
        TieCase {
            dir: "breadcrumbs_bf16",
            method: "breadcrumbs",
            model: &["ft_a"],
            per_model: &[("weight", 1.0), ("density", 0.6), ("gamma", 0.1)],
            global: &[],
            window: |n| breadcrumbs_window(n, 0.6, 0.1),
        },
        TieCase {
            dir: "breadcrumbs_ties_bf16",
            method: "breadcrumbs_ties",
            model: &["ft_b"],
            per_model: &[("weight", 1.0), ("density", 0.5), ("gamma", 0.05)],
            global: &[("normalize", 1.0)],
            window: |n| breadcrumbs_window(n, 0.5, 0.05),
        },
    ]
}

fn breadcrumbs_window(n: usize, density: f64, gamma: f64) -> (usize, usize) {
    let target = (density * n as f64) as usize;
    let top = (gamma * n as f64) as usize;
    let bot = n.saturating_sub(target + top);
    (bot, bot + target)
}

/// TIES / Breadcrumbs on bf16 inputs: the same kept count per tensor as mergekit, every entry
/// strictly inside the kept magnitude range kept and strictly outside dropped by both, the kept
/// values equal; entries tied at a cut may be kept by one and not the other (mergekit: torch's
/// unstable sort order; evomerge: by index, documented in `select.rs`), and evomerge's choice
/// among them is the documented one.
#[test]
fn bf16_ties_at_the_cut_differ_only_among_equal_magnitudes() {
    let models = models("models_bf16");
    for tc in tie_cases() {
        let case = Case {
            dir: tc.dir,
            method: tc.method,
            bf16: true,
            models: tc.model,
            global: tc.global,
            per_model: tc.per_model,
        };
        let want = load(&golden().join(tc.dir).join("merged.safetensors"));
        let got = merge_case(&case, &models);
        check_names(tc.dir, &got, &want);
        let (mut total, mut tied, mut differ, mut kept_total) = (0, 0, 0, 0);
        let mut inexact = 0;
        for (name, (_, theirs)) in &want {
            let ours = &got[name].1;
            let base = &models["base"][name].1;
            let m = &models[tc.model[0]][name].1;
            let n = base.len();
            // the task vector, exact in f32; mergekit's is rounded to bf16 (a few entries
            // whose model and base lie in different binades), so mergekit ranks the rounded
            // magnitudes — rounding is monotone, so ranking the exact ones refines that order
            let delta: Vec<f32> = m.iter().zip(base).map(|(x, y)| x - y).collect();
            let inexact_here = delta.iter().filter(|&&d| bf16(d) != d).count();
            inexact += inexact_here;
            let mag = |i: usize| delta[i].abs();
            let rounded = |i: usize| bf16(delta[i]).abs();
            let (lo, hi) = (tc.window)(n);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| mag(a).total_cmp(&mag(b)).then(a.cmp(&b)));
            // mergekit's magnitudes at the lowest and highest kept rank
            let (c_lo, c_hi) = (rounded(order[lo]), rounded(order[hi - 1]));
            // kept by each: visible as merged ≠ base (δ = 0 entries change nothing either way)
            let kept_ours: Vec<bool> = (0..n).map(|i| ours[i] != base[i]).collect();
            let kept_theirs: Vec<bool> = (0..n).map(|i| theirs[i] != base[i]).collect();
            let count = |k: &[bool]| k.iter().filter(|&&x| x).count();
            let zeros_kept = order[lo..hi].iter().filter(|&&i| delta[i] == 0.0).count();
            assert_eq!(
                count(&kept_ours),
                hi - lo - zeros_kept,
                "{}: {name}",
                tc.dir
            );
            assert_eq!(
                count(&kept_theirs),
                count(&kept_ours),
                "{}: {name}: kept count",
                tc.dir
            );
            for i in 0..n {
                let (v, at) = (rounded(i), format!("{}: {name}[{i}]", tc.dir));
                if v > c_lo && v < c_hi {
                    assert!(
                        kept_ours[i] && kept_theirs[i],
                        "{at}: |δ| {v} inside the cuts"
                    );
                }
                if v < c_lo || v > c_hi {
                    assert!(!kept_ours[i] && !kept_theirs[i], "{at}: |δ| {v} outside");
                }
                if kept_ours[i] && kept_theirs[i] {
                    // both give base + δ: the model's value (ours exactly; mergekit's too when
                    // δ is a bf16 value, else within an ulp of the larger of base and model: it
                    // adds the rounded δ in bf16)
                    if bf16(delta[i]) == delta[i] {
                        assert_eq!(bf16(ours[i]), theirs[i], "{at}: kept value");
                    } else {
                        let diff = (bf16(ours[i]) - theirs[i]).abs();
                        let ulp = bf16_ulp(base[i].abs().max(m[i].abs()));
                        assert!(diff <= ulp, "{at}: kept value {} vs {}", ours[i], theirs[i]);
                    }
                }
                if v == c_lo || v == c_hi {
                    tied += 1;
                }
                differ += usize::from(kept_ours[i] != kept_theirs[i]);
            }
            // evomerge's tie rule: exactly the ranks [lo, hi) of (|δ|, index)
            let mut want_ours = vec![false; n];
            for &i in &order[lo..hi] {
                want_ours[i] = delta[i] != 0.0;
            }
            assert_eq!(kept_ours, want_ours, "{}: {name}: tie rule", tc.dir);
            total += n;
            kept_total += count(&kept_ours);
        }
        println!(
            "{}: {total} entries ({inexact} with a task vector that rounds in bf16), \
             {kept_total} kept, {tied} tied at a cut magnitude, {differ} kept by only one of \
             evomerge / mergekit ({:.1} %)",
            tc.dir,
            100.0 * differ as f64 / total as f64
        );
        // the differences are confined to the ties
        assert!(differ <= tied, "{}", tc.dir);
    }
}

/// The recipe layer end to end: `evomerge methods` lists the three methods, `evomerge merge`
/// runs the golden `ramplus_tl` and `arcee_fusion` recipes and writes mergekit's tensors, and a
/// recipe with a wrong model count or without a base model fails naming the method.
#[test]
fn recipes_run_end_to_end_and_refuse_bad_inputs() {
    let evomerge = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_evomerge"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = evomerge(&["methods"]);
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    for row in [
        "| `arcee_fusion` | required | 1 | — | — |",
        "| `ram` | required | ≥ 1 | `epsilon` = 0.00001 in [0, 0.01] | — |",
        "| `ramplus_tl` | required | ≥ 1 | `r` = 0.1 in [0, 1], `alpha` = 0.2 in [0, 1], \
         `epsilon` = 0.00001 in [0, 0.01] | — |",
    ] {
        assert!(listing.contains(row), "{row} not in\n{listing}");
    }

    let tmp = tempfile::tempdir().unwrap();
    for case in ["ramplus_tl", "arcee_fusion"] {
        let dir = golden().join(case);
        let out_dir = tmp.path().join(case);
        let out = evomerge(&[
            "merge",
            dir.join("recipe.yml").to_str().unwrap(),
            out_dir.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = load(&dir.join("merged.safetensors"));
        let model = evomerge::store::Model::open(&out_dir).unwrap();
        for (name, (_, w)) in &want {
            let got = model.read(name).unwrap().to_f32_vec();
            assert_eq!(&got, w, "{case}: {name}");
        }
    }

    let models = golden().join("models");
    let path = |m: &str| models.join(m).to_str().unwrap().to_string();
    let bad = [
        (
            format!(
                "merge_method: arcee_fusion\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n",
                path("base"),
                path("ft_a"),
                path("ft_b")
            ),
            "`arcee_fusion` takes exactly 1 model(s) besides the base model, got 2",
        ),
        (
            format!(
                "merge_method: ram\nmodels:\n  - model: {}\n  - model: {}\n",
                path("ft_a"),
                path("ft_b")
            ),
            "merge method `ram` needs a `base_model`",
        ),
        (
            format!(
                "merge_method: ramplus_tl\nbase_model: {}\nmodels:\n  - model: {}\n    \
                 parameters: {{r: 0.5}}\n",
                path("base"),
                path("ft_a")
            ),
            "`r` is a global parameter of `ramplus_tl`",
        ),
    ];
    for (k, (yaml, needle)) in bad.iter().enumerate() {
        let recipe = tmp.path().join(format!("bad{k}.yml"));
        std::fs::write(&recipe, yaml).unwrap();
        let out = evomerge(&[
            "merge",
            recipe.to_str().unwrap(),
            tmp.path().join(format!("bad{k}")).to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
}
