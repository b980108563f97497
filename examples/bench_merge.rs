//! Merge throughput benchmark: a synthetic Llama family (base + 2 fine-tunes) generated from a
//! seed, then `linear` and `ties` merges timed against a baseline measured in the same run —
//! reading every input byte once and writing the output bytes once, sequentially (the issue's
//! baseline) and split over as many threads as the merge uses. Each merge runs in a child
//! process so its peak RSS (VmHWM) is its own.
//!
//! ```text
//! cargo run --release --example bench_merge                 # 0.5 B params, bf16 (issue 2's set)
//! cargo run --release --example bench_merge -- --size tiny  # seconds; what CI runs
//! cargo run --release --example bench_merge -- --dir /tmp/fam  # keep and reuse the family
//! cargo run --release --example bench_merge -- --methods linear,ties,dare_ties,slerp
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use evomerge::merge::executor::{MergeOptions, merge_to_disk};
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

/// The recipe timed for `method`: `linear` averages all three models (no base model, so each
/// input is read once); a method with a required base model merges the two fine-tunes onto it
/// (slerp takes one); nuslerp takes the two fine-tunes, passthrough one. Per-model `weight` 0.5,
/// `density` 0.5, the other parameters at their defaults (`t` 0.5).
fn recipe_text(method: &str, family: &[PathBuf]) -> String {
    use evomerge::merge::{BaseUse, Scope};
    let m = evomerge::merge::method(method).expect("a registered method");
    let per_model: Vec<String> = m
        .params()
        .iter()
        .filter(|d| d.scope == Scope::PerModel)
        .filter_map(|d| match d.name {
            "weight" => Some("weight: 0.5".to_string()),
            "density" => Some("density: 0.5".to_string()),
            _ => None,
        })
        .collect();
    let global: Vec<String> = m
        .params()
        .iter()
        .filter(|d| d.scope == Scope::Global && d.default.is_none())
        .map(|d| format!("{}: 0.5", d.name))
        .collect();
    let (base, models): (Option<&PathBuf>, &[PathBuf]) = match (method, m.base()) {
        ("linear", _) => (None, family),
        ("passthrough", _) => (None, &family[1..2]),
        (_, BaseUse::Required) => {
            let max = m.model_count().1.unwrap_or(usize::MAX);
            (
                Some(&family[0]),
                &family[1..max.saturating_add(1).min(family.len())],
            )
        }
        _ => (None, &family[1..]),
    };
    let mut text = format!("merge_method: {method}\n");
    if let Some(b) = base {
        text += &format!("base_model: {}\n", b.display());
    }
    text += "models:\n";
    for model in models {
        text += &format!("  - model: {}\n", model.display());
        if !per_model.is_empty() {
            text += &format!("    parameters: {{{}}}\n", per_model.join(", "));
        }
    }
    if !global.is_empty() {
        text += &format!("parameters: {{{}}}\n", global.join(", "));
    }
    text + "dtype: bfloat16\n"
}

/// Child mode: run one merge and print `seconds peak_rss_bytes`.
fn child(method: &str, root: &Path, family: &[PathBuf]) {
    let recipe = Recipe::from_str(&recipe_text(method, family), None).expect("recipe");
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
    // `--methods a,b,c` times other registered methods too (default: the issue's two)
    let methods: Vec<String> = args
        .iter()
        .position(|a| a == "--methods")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || vec!["linear".to_string(), "ties".to_string()],
            |list| list.split(',').map(str::to_string).collect(),
        );
    for method in &methods {
        let method = method.as_str();
        // Best of two runs, as for the baseline; each run in a fresh process.
        let mut runs = (0..2).map(|_| {
            let exe = std::env::current_exe().expect("current exe");
            let out = Command::new(exe)
                .arg("--child")
                .arg(method)
                .arg(&root)
                .args(&family)
                .output()
                .expect("run child");
            assert!(
                out.status.success(),
                "{method} merge failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut parts = text.split_whitespace();
            let secs: f64 = parts.next().and_then(|s| s.parse().ok()).expect("seconds");
            let rss: u64 = parts.next().and_then(|s| s.parse().ok()).expect("rss");
            (secs, rss)
        });
        let first = runs.next().expect("a run");
        let (secs, rss) = runs.fold(first, |(s, r), (s2, r2)| (s.min(s2), r.max(r2)));
        println!(
            "{method:>16}: {secs:.2} s = {:.2}x baseline ({:.2}x the {threads}-thread one), \
             peak RSS {:.0} MB",
            secs / baseline,
            secs / parallel,
            rss as f64 / 1e6
        );
    }
}
