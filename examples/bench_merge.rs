//! Merge throughput benchmark: a synthetic Llama family (base + 2 fine-tunes) generated from a
//! seed, then merges timed against a baseline measured in the same run — reading every input
//! byte once and writing the output bytes once, sequentially (the issue's baseline) and split
//! over as many threads as the merge uses. Each merge runs in a child process so its peak RSS
//! (VmHWM) is its own. By default `linear` and `ties`; `--methods all` times every method in
//! [`evomerge::merge::registry`], each with a recipe built from its declarations (see
//! `recipe_text`), skipping (with the reason) those that need files the family lacks.
//!
//! ```text
//! cargo run --release --example bench_merge                 # 0.5 B params, bf16 (issue 2's set)
//! cargo run --release --example bench_merge -- --size tiny  # seconds; what CI runs
//! cargo run --release --example bench_merge -- --dir /tmp/fam  # keep and reuse the family
//! cargo run --release --example bench_merge -- --methods all   # every registered method
//! cargo run --release --example bench_merge -- --methods linear,ties,dare_ties,slerp
//! ```
//!
//! Exits with status 1 when a merge fails (after timing the others).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use evomerge::merge::executor::{MergeOptions, merge_to_disk};
use evomerge::merge::{BaseUse, MergeMethod, ParamDecl, ParamKind, Scope};
use evomerge::recipe::Recipe;
use evomerge::store::ModelSet;
use evomerge::synth::{LlamaSpec, write_family};
use evomerge::tensor::DType;

fn spec(size: &str) -> LlamaSpec {
    if size == "0.5b" {
        return LlamaSpec::bench();
    }
    match size {
        "small" => LlamaSpec {
            hidden: 512,
            layers: 4,
            intermediate: 1408,
            vocab: 8000,
            heads: 8,
            kv_heads: 8,
            dtype: DType::BF16,
            tie_embeddings: false,
        },
        _ => LlamaSpec {
            hidden: 128,
            layers: 2,
            intermediate: 352,
            vocab: 1000,
            heads: 4,
            kv_heads: 4,
            dtype: DType::BF16,
            tie_embeddings: false,
        },
    }
}

/// Peak resident set size of this process, in bytes (Linux; 0 elsewhere).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("model dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

/// Flush every dirty page to disk (untimed, before each measurement), so no run pays for the
/// writeback of the one before. No measurement syncs its own output: neither does a merge.
fn settle_page_cache() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// The baseline: read every byte of the input models once, write as many bytes as the output.
fn read_write_baseline(models: &[PathBuf], out: &Path) -> f64 {
    settle_page_cache();
    let start = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let mut out_bytes = 0u64;
    for (i, m) in models.iter().enumerate() {
        for f in safetensors_files(m) {
            let mut file = File::open(&f).expect("open input");
            loop {
                let n = file.read(&mut buf).expect("read input");
                if n == 0 {
                    break;
                }
                if i == 0 {
                    out_bytes += n as u64;
                }
                std::hint::black_box(&buf[..n]);
            }
        }
    }
    let mut file = File::create(out).expect("create baseline output");
    let mut left = out_bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n]).expect("write baseline output");
        left -= n as u64;
    }
    drop(file);
    std::fs::remove_file(out).ok();
    start.elapsed().as_secs_f64()
}

/// The same bytes read and written by `threads` threads, each taking an equal share of every
/// input file and of the output (positioned reads and writes) — what the merges' two threads
/// could do at best with no arithmetic at all.
fn read_write_baseline_parallel(models: &[PathBuf], out: &Path, threads: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    settle_page_cache();
    let start = Instant::now();
    let files: Vec<(File, u64)> = models
        .iter()
        .flat_map(|m| safetensors_files(m))
        .map(|f| {
            let file = File::open(&f).expect("open input");
            let len = file.metadata().expect("input size").len();
            (file, len)
        })
        .collect();
    let out_bytes: u64 = models
        .first()
        .map(|m| {
            safetensors_files(m)
                .iter()
                .map(|f| f.metadata().expect("input size").len())
                .sum()
        })
        .unwrap_or(0);
    let output = File::create(out).expect("create baseline output");
    output.set_len(out_bytes).expect("size baseline output");
    let share = |len: u64, t: usize| {
        let per = len.div_ceil(threads as u64);
        (per * t as u64).min(len)..(per * (t as u64 + 1)).min(len)
    };
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (files, output) = (&files, &output);
            scope.spawn(move || {
                let mut buf = vec![0u8; 8 << 20];
                for (file, len) in files {
                    let r = share(*len, t);
                    let mut at = r.start;
                    while at < r.end {
                        let n = ((r.end - at) as usize).min(buf.len());
                        file.read_exact_at(&mut buf[..n], at).expect("read input");
                        std::hint::black_box(&buf[..n]);
                        at += n as u64;
                    }
                }
                let r = share(out_bytes, t);
                let mut at = r.start;
                while at < r.end {
                    let n = ((r.end - at) as usize).min(buf.len());
                    output
                        .write_all_at(&buf[..n], at)
                        .expect("write baseline output");
                    at += n as u64;
                }
            });
        }
    });
    drop(output);
    std::fs::remove_file(out).ok();
    start.elapsed().as_secs_f64()
}

/// How the bench builds a recipe for a method, from its declarations alone (no per-method
/// cases, so a newly registered method is timed as soon as it is registered):
///
/// - inputs: with a required base model, the base plus the two fine-tunes (fewer when the
///   method takes fewer: `slerp` one); with an optional base and no model limit, all three
///   family members as plain models and no base (`linear` reads each input once); with an
///   optional base and a limit, the fine-tunes up to the limit (`nuslerp` two, `passthrough`
///   one);
/// - parameters: every required one (no default) set to the middle of its declared range
///   (`weight` 0.5, `t` 0.5; a flag to false), per model or global as declared; `density`,
///   wherever declared, 0.5 so the sparsifiers drop half the entries (their default, 1,
///   keeps everything); everything else at its default.
///
/// A method that reads auxiliary files beside the models (Fisher, RegMean) is skipped: the
/// synthetic family has none. Returns the recipe and a few words on its inputs, or why not.
fn recipe_text(method: &dyn MergeMethod, family: &[PathBuf]) -> Result<(String, String), String> {
    if let Some(aux) = method.aux() {
        return Err(format!(
            "needs `{aux}` beside each model, which the synthetic family does not have"
        ));
    }
    let (min, max) = method.model_count();
    let (base, finetunes) = family.split_first().expect("a family");
    let (base, models): (Option<&PathBuf>, Vec<&PathBuf>) = match (method.base(), max) {
        (BaseUse::Required, _) => (
            Some(base),
            finetunes.iter().take(max.unwrap_or(usize::MAX)).collect(),
        ),
        (BaseUse::Optional | BaseUse::OptionalApart, None) => (None, family.iter().collect()),
        (BaseUse::Optional | BaseUse::OptionalApart, Some(max)) => {
            (None, finetunes.iter().take(max).collect())
        }
    };
    if models.len() < min {
        return Err(format!(
            "needs at least {min} models besides the base, the family has {}",
            finetunes.len()
        ));
    }
    let value = |d: &ParamDecl| -> Option<String> {
        match (d.name, d.default, d.kind) {
            ("density", _, _) => Some("0.5".into()),
            (_, Some(_), _) => None,
            (_, None, ParamKind::Float { min, max }) => Some(format!("{}", (min + max) / 2.0)),
            (_, None, ParamKind::Bool) => Some("false".into()),
        }
    };
    let set = |scope: Scope| -> Vec<String> {
        method
            .params()
            .iter()
            .filter(|d| d.scope == scope)
            .filter_map(|d| value(d).map(|v| format!("{}: {v}", d.name)))
            .collect()
    };
    let (per_model, global) = (set(Scope::PerModel), set(Scope::Global));
    let mut text = format!("merge_method: {}\n", method.name());
    if let Some(b) = base {
        text += &format!("base_model: {}\n", b.display());
    }
    text += "models:\n";
    for model in &models {
        text += &format!("  - model: {}\n", model.display());
        if !per_model.is_empty() {
            text += &format!("    parameters: {{{}}}\n", per_model.join(", "));
        }
    }
    if !global.is_empty() {
        text += &format!("parameters: {{{}}}\n", global.join(", "));
    }
    text += "dtype: bfloat16\n";
    let inputs = match base {
        Some(_) => format!("base + {}", models.len()),
        None if models.len() == 1 => "1 model".to_string(),
        None => format!("{} models", models.len()),
    };
    Ok((text, inputs))
}

/// Child mode: run one merge and print `seconds peak_rss_bytes`.
fn child(method: &str, root: &Path, family: &[PathBuf]) {
    let m = evomerge::merge::method(method).expect("a registered method");
    let (text, _) = recipe_text(m, family).expect("a recipe the bench can build");
    let recipe = Recipe::from_str(&text, None).expect("recipe");
    let out = root.join(format!("out-{method}"));
    let _ = std::fs::remove_dir_all(&out);
    settle_page_cache();
    let start = Instant::now();
    merge_to_disk(
        &recipe,
        &mut ModelSet::new(),
        &out,
        &MergeOptions::default(),
    )
    .expect("merge");
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&out).ok();
    println!("{secs} {}", peak_rss());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let root = PathBuf::from(&args[3]);
        let family: Vec<PathBuf> = args[4..].iter().map(PathBuf::from).collect();
        child(&args[2], &root, &family);
        return;
    }
    let size = args
        .iter()
        .position(|a| a == "--size")
        .and_then(|i| args.get(i + 1))
        .map_or("0.5b", String::as_str)
        .to_string();
    // `--dir DIR` keeps the generated family in DIR and reuses it on the next run.
    let keep = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let temp = tempfile::Builder::new()
        .prefix("evomerge-bench")
        .tempdir()
        .expect("temp dir");
    let root = keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let spec = spec(&size);
    let t = Instant::now();
    let family = if keep.is_some() && root.join("base").is_dir() {
        evomerge::synth::member_names(2)
            .iter()
            .map(|m| root.join(m))
            .collect()
    } else {
        std::fs::create_dir_all(&root).expect("bench dir");
        write_family(&root, &spec, 2, 7).expect("synthetic family")
    };
    eprintln!("{size} family ready in {:.1} s", t.elapsed().as_secs_f64());
    if size != "0.5b" {
        eprintln!(
            "note: the {size} family is a smoke test — its baseline takes milliseconds, so the \
             ratios mean little; the targets are for the default 0.5b family in a release build"
        );
    }

    // Warm the page cache the same way for every contender, then take the best of five baselines
    // (page-cache writeback makes single runs noisy).
    let baseline = (0..5)
        .map(|_| read_write_baseline(&family, &root.join("baseline.bin")))
        .fold(f64::INFINITY, f64::min);
    let threads = rayon::current_num_threads();
    let parallel = (0..5)
        .map(|_| read_write_baseline_parallel(&family, &root.join("baseline.bin"), threads))
        .fold(f64::INFINITY, f64::min);
    println!("family: {size}, base + 2 fine-tunes, bf16, {threads} threads");
    println!("read+write baseline: {baseline:.2} s ({threads} threads: {parallel:.2} s)");
    // `--methods a,b,c` times other registered methods too, `--methods all` every registered
    // one (default: the issue's two)
    let methods: Vec<&'static dyn MergeMethod> = match args
        .iter()
        .position(|a| a == "--methods")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        None => vec!["linear", "ties"]
            .into_iter()
            .map(|m| evomerge::merge::method(m).expect("registered"))
            .collect(),
        Some("all") => evomerge::merge::registry().to_vec(),
        Some(list) => list
            .split(',')
            .map(|m| evomerge::merge::method(m).unwrap_or_else(|e| panic!("--methods: {e}")))
            .collect(),
    };
    let mut failed = Vec::new();
    for m in methods {
        let method = m.name();
        let inputs = match recipe_text(m, &family) {
            Ok((_, inputs)) => inputs,
            Err(why) => {
                println!("{method:>16}: skipped: {why}");
                continue;
            }
        };
        // Best of two runs, as for the baseline; each run in a fresh process.
        let mut runs = Vec::new();
        for _ in 0..2 {
            let exe = std::env::current_exe().expect("current exe");
            let out = Command::new(exe)
                .arg("--child")
                .arg(method)
                .arg(&root)
                .args(&family)
                .output()
                .expect("run child");
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let why = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                println!("{method:>16}: FAILED ({inputs}): {why}");
                failed.push(method);
                break;
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut parts = text.split_whitespace();
            let secs: f64 = parts.next().and_then(|s| s.parse().ok()).expect("seconds");
            let rss: u64 = parts.next().and_then(|s| s.parse().ok()).expect("rss");
            runs.push((secs, rss));
        }
        if runs.len() < 2 {
            continue;
        }
        let (secs, rss) = runs
            .into_iter()
            .fold((f64::INFINITY, 0), |(s, r), (s2, r2)| {
                (s.min(s2), r.max(r2))
            });
        println!(
            "{method:>16}: {secs:.2} s = {:.2}x baseline ({:.2}x the {threads}-thread one), \
             peak RSS {:.0} MB ({inputs})",
            secs / baseline,
            secs / parallel,
            rss as f64 / 1e6
        );
    }
    if !failed.is_empty() {
        eprintln!("failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}
