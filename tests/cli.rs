//! Integration tests of whole commands run as processes: a search killed with SIGKILL in the
//! middle of a generation resumes to the same result as an uninterrupted run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// A small PS search over the shipped toy world (few examples, few evaluations); also the
/// search of [`crate::overnight`].
pub(crate) fn small_search(dir: &Path) -> PathBuf {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let text = format!(
        r#"name = "kill-test"
models = ["{toy}/add", "{toy}/cipher"]
base_model = "{toy}/base"
method = "ties"

[space]
kind = "ps"
granularity = "whole"
embeddings = true
params = ["weight", "density"]
defaults = {{ weight = 1.0, density = 0.5 }}

[evaluator]
kind = "lm"
fitness_split = "dev"
tasks = [
  {{ name = "add", path = "{toy}/tasks/add", metric = "exact_match", max_new_tokens = 4, limit = 12 }},
  {{ name = "cipher", path = "{toy}/tasks/cipher", metric = "exact_match", max_new_tokens = 8, limit = 12 }},
]

[optimizer]
sigma0 = 0.3
population = 4
generations = 4
seed = 3
restarts = "none"

[parallelism]
slots = 2
"#,
        toy = toy.display()
    );
    let path = dir.join("kill-test.toml");
    fs::write(&path, text).unwrap();
    path
}

fn best_genome(out: &Path) -> serde_json::Value {
    let text = fs::read_to_string(out.join("best_genome.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["genome"].clone()
}

fn history_lines(out: &Path) -> usize {
    fs::read_to_string(out.join("history.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_search_killed_mid_generation_resumes_to_the_same_best_genome() {
    let tmp = tempfile::tempdir().unwrap();
    let def = small_search(tmp.path());
    let full = tmp.path().join("full");
    let status = Command::new(bin())
        .args(["search", def.to_str().unwrap(), "--quiet", "--out"])
        .arg(&full)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(history_lines(&full), 16);

    // The same search, killed (SIGKILL) once the history holds 6 records: generation 2 of 4,
    // with the others of that generation in flight.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(bin())
        .args(["search", def.to_str().unwrap(), "--quiet", "--out"])
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while history_lines(&killed) < 6 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "search made no progress"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().ok();
    child.wait().unwrap();
    let at_kill = history_lines(&killed);
    assert!(
        at_kill < 16,
        "the search finished before it could be killed"
    );
    assert!(!killed.join("best_genome.json").exists());

    let out = Command::new(bin())
        .args(["resume", "--quiet"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("from history"),
        "resume should report replayed evaluations: {stderr}"
    );
    assert_eq!(best_genome(&killed), best_genome(&full));
    assert_eq!(history_lines(&killed), 16);
}

/// `evomerge fisher` on the toy experts, each on its own task: the file holds every tensor of
/// the model, non-negative, zero exactly on the embedding rows of characters no example feeds
/// in; and the Fisher merge of the two experts scores far above their plain average on the
/// test split (34.2 % there; the Fisher merge 45–68 % for 16–200 examples, raw or normalised,
/// when measured by hand).
#[test]
fn fisher_command_weights_the_toy_experts_better_than_the_average() {
    use std::sync::Arc;

    use evomerge::candidate::{Candidate, CandidateBody};
    use evomerge::eval::lm::{LmConfig, LmEvaluator};
    use evomerge::eval::{Evaluator, Split};
    use evomerge::merge::executor::merge_in_memory;
    use evomerge::recipe::Recipe;
    use evomerge::store::ModelSet;
    use evomerge::tokenizer::{CharTokenizer, TextTokenizer};

    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tmp = tempfile::tempdir().unwrap();
    for (expert, max_new) in [("add", 5), ("cipher", 14)] {
        let dir = tmp.path().join(expert);
        fs::create_dir(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            fs::copy(toy.join(expert).join(f), dir.join(f)).unwrap();
        }
        let tasks = tmp.path().join(format!("{expert}.toml"));
        fs::write(
            &tasks,
            format!(
                "[[tasks]]\nname = \"{expert}\"\npath = \"{}\"\nmetric = \"exact_match\"\nmax_new_tokens = {max_new}\n",
                toy.join("tasks").join(expert).display()
            ),
        )
        .unwrap();
        let out = Command::new(bin())
            .args(["fisher", dir.to_str().unwrap(), "--tasks"])
            .arg(&tasks)
            .args(["--max-examples", "32", "--normalize"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // the add expert's Fisher: every tensor; embedding rows of unseen characters exactly 0
    let fisher =
        evomerge::model::mlp::load_tensors(&tmp.path().join("add/fisher.safetensors")).unwrap();
    let model =
        evomerge::model::mlp::load_tensors(&tmp.path().join("add/model.safetensors")).unwrap();
    assert_eq!(
        fisher.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>()
    );
    assert!(
        fisher
            .values()
            .all(|t| t.values().iter().all(|&v| v >= 0.0))
    );
    let embed = &fisher["model.embed_tokens.weight"];
    let hidden = embed.shape[1];
    let row = |c: char| {
        let id = CharTokenizer.encode(&c.to_string()).unwrap()[0] as usize;
        embed.values()[id * hidden..(id + 1) * hidden]
            .iter()
            .map(|v| f64::from(*v))
            .sum::<f64>()
    };
    assert_eq!(row('q'), 0.0, "no add example contains `q`");
    assert!(row('+') > 0.0, "every add example contains `+`");

    let recipe = |method: &str, params: &str| {
        let yaml = format!(
            "merge_method: {method}\nmodels:\n  - model: {}\n    parameters: {{{params}}}\n  - model: {}\n    parameters: {{{params}}}\ndtype: float32\n",
            tmp.path().join("add").display(),
            tmp.path().join("cipher").display()
        );
        let recipe = Recipe::from_str(&yaml, None).unwrap();
        Candidate {
            body: CandidateBody::Merged(Arc::new(
                merge_in_memory(&recipe, &mut ModelSet::new(), 0).unwrap(),
            )),
            recipe: None,
        }
    };
    let tasks = evomerge::eval::tasks::load_task_file(&toy.join("tasks.toml")).unwrap();
    let eval = LmEvaluator::try_new(tasks, Arc::new(CharTokenizer), LmConfig::default()).unwrap();
    let fisher = eval
        .evaluate(&recipe("fisher", "weight: 1.0"), Split::Test)
        .unwrap();
    let average = eval
        .evaluate(&recipe("linear", "weight: 1.0"), Split::Test)
        .unwrap();
    assert!(
        fisher.primary > average.primary + 0.1,
        "Fisher {:?} vs average {:?}",
        fisher.metrics,
        average.metrics
    );
}

/// A tasks file in `dir` with the toy world's `add` task, `limit` examples per split.
fn add_tasks(dir: &Path, limit: usize) -> PathBuf {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tasks = dir.join("tasks.toml");
    fs::write(
        &tasks,
        format!(
            "[[tasks]]\nname = \"add\"\npath = \"{}\"\nmetric = \"exact_match\"\nmax_new_tokens = 4\nlimit = {limit}\n",
            toy.join("tasks/add").display()
        ),
    )
    .unwrap();
    tasks
}

/// `eval` prints a failing model's row as `error` and goes on; when every model fails it exits
/// non-zero with the first error.
#[test]
fn eval_fails_only_when_every_model_fails() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let dir = tempfile::tempdir().unwrap();
    let tasks = add_tasks(dir.path(), 4);
    // A model directory with a config but no weights.
    let broken = dir.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::copy(toy.join("add/config.json"), broken.join("config.json")).unwrap();
    let run = |models: &[&Path]| {
        Command::new(bin())
            .args(["eval", "--split", "dev", "--tasks"])
            .arg(&tasks)
            .args(models)
            .output()
            .unwrap()
    };
    let mixed = run(&[&toy.join("add"), &broken]);
    assert!(mixed.status.success(), "{mixed:?}");
    let table = String::from_utf8_lossy(&mixed.stdout);
    assert!(table.contains("error"), "{table}");
    let all_bad = run(&[&broken]);
    assert!(!all_bad.status.success(), "{all_bad:?}");
    let stderr = String::from_utf8_lossy(&all_bad.stderr);
    assert!(
        stderr.contains("every model failed to evaluate; the first (broken)"),
        "{stderr}"
    );
}

/// `eval` runs on the device and in the compute dtype asked for; `cuda` in a build without the
/// `cuda` feature is an error naming the flag and the build option.
#[test]
fn eval_takes_device_dtype_and_batch_flags() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let dir = tempfile::tempdir().unwrap();
    let tasks = add_tasks(dir.path(), 8);
    let run = |extra: &[&str]| {
        Command::new(bin())
            .arg("eval")
            .arg("--tasks")
            .arg(&tasks)
            .arg(toy.join("add"))
            .args(extra)
            .output()
            .unwrap()
    };
    let f32_run = run(&["--split", "dev"]);
    assert!(f32_run.status.success(), "{f32_run:?}");
    let bf16 = run(&[
        "--split",
        "dev",
        "--dtype",
        "bf16",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(bf16.status.success(), "{bf16:?}");
    let table = String::from_utf8_lossy(&bf16.stdout);
    assert!(table.contains("| add "), "{table}");
    let too_long = run(&["--max-length", "4"]);
    assert!(!too_long.status.success());
    let err = String::from_utf8_lossy(&too_long.stderr);
    assert!(err.contains("max_length 4"), "{err}");
    if cfg!(not(feature = "cuda")) {
        let gpu = run(&["--device", "cuda:0"]);
        assert!(!gpu.status.success());
        let err = String::from_utf8_lossy(&gpu.stderr);
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
    let bad = run(&["--device", "gpu"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cpu, cuda or cuda:N"));
}

/// `evomerge --help` lists every subcommand with its own description (a doc comment once sat
/// on the wrong variant: `eval` had none and `fisher` showed eval's).
#[test]
fn help_gives_each_subcommand_its_own_description() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    for line in &lines {
        let line = line.trim();
        let (name, desc) = line.split_once(' ').unwrap_or((line, ""));
        let desc = desc.trim();
        assert!(!desc.is_empty(), "`{name}` has no description:\n{text}");
        if let Some(other) = seen.insert(desc.to_string(), name.to_string()) {
            panic!("`{name}` and `{other}` share the description {desc:?}");
        }
    }
    let names: Vec<&String> = seen.values().collect();
    for want in [
        "merge",
        "search",
        "resume",
        "report",
        "plot",
        "methods",
        "inspect",
        "import-gguf",
        "align",
        "soup",
        "fisher",
        "finetune",
        "eval",
        "help",
    ] {
        assert!(
            names.iter().any(|n| *n == want),
            "`{want}` missing:\n{text}"
        );
    }
    let desc_of = |name: &str| {
        seen.iter()
            .find(|(_, n)| *n == name)
            .map(|(d, _)| d.clone())
            .unwrap()
    };
    assert!(
        desc_of("eval").starts_with("Score model directories"),
        "{text}"
    );
    assert!(desc_of("fisher").contains("diagonal Fisher"), "{text}");
}

/// `--threads` takes 1 to 1024: 2,000 threads once turned a 0.02 s merge into 12 s.
#[test]
fn threads_are_capped_at_1024() {
    for n in ["2000", "0", "-1", "x"] {
        let out = Command::new(bin())
            .args([&format!("--threads={n}"), "methods"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--threads {n} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--threads"), "{err}");
    }
    let out = Command::new(bin())
        .args(["--threads", "2000", "methods"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2000 is outside 1..=1024"), "{err}");
    let out = Command::new(bin())
        .args(["--threads", "1024", "methods"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `report` on a directory whose search has not finished names it and says how to finish.
#[test]
fn report_on_an_unfinished_run_suggests_resume() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("history.jsonl"), "").unwrap();
    let out = Command::new(bin())
        .arg("report")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let d = dir.path().display();
    assert!(
        err.contains(&format!("{d}: the search has not finished"))
            && err.contains(&format!("evomerge resume {d}")),
        "{err}"
    );
    assert!(!err.contains("No such file"), "{err}");
}

/// A linear recipe over the two toy experts with the given weight, written into `dir`.
fn linear_recipe(dir: &Path, weight: &str) -> PathBuf {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let text = format!(
        "merge_method: linear\nmodels:\n  - model: {toy}/add\n    parameters: {{weight: {weight}}}\n  - model: {toy}/cipher\n    parameters: {{weight: {weight}}}\nparameters: {{normalize: false}}\ndtype: float32\n",
        toy = toy.display()
    );
    let path = dir.join("r.yml");
    fs::write(&path, text).unwrap();
    path
}

/// Issue 13: weight 1e308 gave an all-NaN model with exit 0. The merge fails, naming a tensor,
/// and leaves nothing at OUT; `--allow-nonfinite` writes it anyway.
#[test]
fn merge_producing_nonfinite_values_fails_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = linear_recipe(tmp.path(), "1e308");
    let out = tmp.path().join("out");
    let o = Command::new(bin())
        .args(["merge", "--quiet"])
        .arg(&recipe)
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: merging {}: tensor `", recipe.display()))
            && stderr.contains("`: the merge produced a non-finite value (")
            && stderr.contains("pass --allow-nonfinite"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "only the recipe is left"
    );

    let o = Command::new(bin())
        .args(["merge", "--quiet", "--allow-nonfinite"])
        .arg(&recipe)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = evomerge::store::Model::open(&out).unwrap();
    let name = m.tensors()[0].name.clone();
    assert!(
        m.read(&name)
            .unwrap()
            .to_f32_vec()
            .iter()
            .any(|v| !v.is_finite())
    );
}

/// Issue 13: `evomerge inspect MODEL | head -1` panicked (exit 101) on the broken pipe. A closed
/// stdout ends the command quietly; a full disk (`> /dev/full`) is an error, not a panic.
#[test]
fn no_panic_on_epipe_or_enospc_on_stdout() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy/add");
    // stdout is a pipe whose reading end is closed before the command writes.
    for args in [vec!["inspect", toy.to_str().unwrap()], vec!["methods"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(bin())
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
    // `| head -1`: the reader takes one line, then closes the pipe.
    let mut child = Command::new(bin())
        .args(["methods"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let o = child.wait_with_output().unwrap();
    assert!(first.starts_with("| method |"), "{first}");
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    // stdout is /dev/full: every write fails with ENOSPC.
    if Path::new("/dev/full").exists() {
        for args in [vec!["inspect", toy.to_str().unwrap()], vec!["methods"]] {
            let full = fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            let o = Command::new(bin())
                .args(&args)
                .stdout(full)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
            assert_eq!(
                stderr, "error: writing to stdout: No space left on device (os error 28)\n",
                "{args:?}"
            );
        }
    }
}

/// A fake Hugging Face cache in `root/hub` holding the toy base as `org/name` (default branch at
/// commit `abc123`).
fn fake_hub_cache(root: &Path) -> PathBuf {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy/base");
    let cache = root.join("hub");
    let repo = cache.join("models--org--name");
    let snap = repo.join("snapshots/abc123");
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(toy.join(f), snap.join(f)).unwrap();
    }
    cache
}

#[test]
fn hub_ids_resolve_from_the_local_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = fake_hub_cache(tmp.path());
    let work = tmp.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(&work)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HOME")
            .output()
            .unwrap()
    };
    // `inspect org/name`: no such directory here, so the cached snapshot of main.
    let o = run(&["inspect", "org/name"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("llama") || stdout.contains("Llama"),
        "{stdout}"
    );
    // In a recipe: `org/name` is not under the recipe's folder either, so the cache again.
    fs::write(
        work.join("r.yaml"),
        "models:\n  - model: org/name\n    parameters: {weight: 1.0}\nmerge_method: linear\n",
    )
    .unwrap();
    let o = run(&["merge", "r.yaml", "out", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(work.join("out/model.safetensors").exists());
    // Not cached: the error names the id, says why, and where it looked.
    for args in [
        vec!["inspect", "org/missing"],
        vec!["merge", "r2.yaml", "out2", "--quiet"],
    ] {
        fs::write(
            work.join("r2.yaml"),
            "models:\n  - model: org/missing\n    parameters: {weight: 1.0}\nmerge_method: linear\n",
        )
        .unwrap();
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr.contains("`org/missing`"), "{args:?}: {stderr}");
        assert!(stderr.contains("Hugging Face hub id"), "{stderr}");
        assert!(
            stderr.contains("must be local directories or already in the Hugging Face cache"),
            "{stderr}"
        );
        assert!(
            stderr.contains(
                &cache
                    .join("models--org--missing/refs/main")
                    .display()
                    .to_string()
            ),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A PS search (`p.toml`) and a PS+DFS search over it (`pd.toml`) under `root/searches`, over a
/// synthetic family in `root/fam`, scored by a command that prints a constant.
fn ps_dfs_searches(root: &Path) -> (PathBuf, PathBuf) {
    let fam =
        evomerge::synth::write_family(&root.join("fam"), &evomerge::synth::LlamaSpec::tiny(), 2, 5)
            .unwrap();
    let searches = root.join("searches");
    fs::create_dir_all(&searches).unwrap();
    let eval = r#"
[evaluator]
kind = "command"
command = ["sh", "-c", "echo '{\"primary\": 0.5}'"]
write_model = false
timeout_s = 60

[optimizer]
population = 2
generations = 1
seed = 1
"#;
    let ps = format!(
        "name = \"p\"\nmodels = [\"../fam/ft1\", \"../fam/ft2\"]\nbase_model = \"../fam/base\"\n\
         method = \"ties\"\n[space]\nkind = \"ps\"\ngranularity = \"whole\"\n{eval}"
    );
    let pd = format!(
        "name = \"pd\"\nmodels = [\"../fam/ft1\", \"../fam/ft2\"]\n[space]\nkind = \"ps_dfs\"\n\
         ps_search = \"p.toml\"\nrepeats = 1\n{eval}"
    );
    assert_eq!(fam.len(), 3);
    fs::write(searches.join("p.toml"), ps).unwrap();
    fs::write(searches.join("pd.toml"), pd).unwrap();
    (searches.join("p.toml"), searches.join("pd.toml"))
}

fn evomerge_in(cwd: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn ps_dfs_keeps_its_ps_run_under_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (p, pd) = ps_dfs_searches(root);
    let out = root.join("elsewhere/o");
    let pd_s = pd.to_str().unwrap();
    let o = evomerge_in(
        root,
        &["search", pd_s, "--out", out.to_str().unwrap(), "--quiet"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("running it into"), "{stderr}");
    // The PS run lives in <out>/ps; nothing under the definitions' default `runs/`.
    assert!(out.join("ps/best_recipe.yaml").exists());
    assert!(out.join("ps/history.jsonl").exists());
    assert!(out.join("best_route.json").exists());
    assert!(
        !root.join("runs").exists(),
        "a PS run was written outside --out"
    );
    let route = fs::read_to_string(out.join("best_route.json")).unwrap();
    assert!(route.contains("\"ps:ps/best_recipe.yaml\""), "{route}");
    // Resuming reuses it and says so.
    let o = evomerge_in(root, &["resume", out.to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("reusing the PS run's best recipe"),
        "{stderr}"
    );
    assert!(!root.join("runs").exists());
    // A finished run of the PS file in its own output directory is reused (copied), untouched.
    evomerge_in(root, &["search", p.to_str().unwrap(), "--quiet"]);
    let theirs = root.join("runs/p");
    let history = fs::read_to_string(theirs.join("history.jsonl")).unwrap();
    let out2 = root.join("o2");
    let o = evomerge_in(
        root,
        &["search", pd_s, "--out", out2.to_str().unwrap(), "--quiet"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("reusing the finished PS run of p"),
        "{stderr}"
    );
    assert!(out2.join("ps/best_recipe.yaml").exists());
    assert!(!out2.join("ps/history.jsonl").exists());
    assert!(!root.join("runs/pd").exists());
    assert_eq!(
        fs::read_to_string(theirs.join("history.jsonl")).unwrap(),
        history
    );
    // the copy names the models relative to its new folder and still merges
    let copy = fs::read_to_string(out2.join("ps/best_recipe.yaml")).unwrap();
    assert!(copy.contains("../../fam/ft1"), "{copy}");
    evomerge_in(root, &["merge", "o2/ps/best_recipe.yaml", "m2", "--quiet"]);
}

#[test]
fn shareable_run_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let (p, _) = ps_dfs_searches(&a);
    evomerge_in(&a, &["search", p.to_str().unwrap(), "--quiet"]);
    let run = a.join("runs/p");
    let root = tmp.path().display().to_string();
    for f in ["best_recipe.yaml", "best_genome.json", "model/README.md"] {
        let text = fs::read_to_string(run.join(f)).unwrap();
        assert!(!text.contains(&root), "{f} holds an absolute path:\n{text}");
    }
    let recipe = fs::read_to_string(run.join("best_recipe.yaml")).unwrap();
    assert!(recipe.contains("model: ../../fam/ft1"), "{recipe}");
    assert!(recipe.contains("base_model: ../../fam/base"), "{recipe}");
    let card = fs::read_to_string(run.join("model/README.md")).unwrap();
    assert!(card.contains("../../../fam/ft1"), "{card}");
    // Moved together with its inputs, it still merges, from any working directory.
    let b = tmp.path().join("b");
    fs::rename(&a, &b).unwrap();
    let recipe = b.join("runs/p/best_recipe.yaml");
    for cwd in [tmp.path(), &b.join("runs/p"), Path::new("/")] {
        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("m");
        evomerge_in(
            cwd,
            &[
                "merge",
                recipe.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        assert!(out.join("model.safetensors").exists());
    }
    // `merge runs/p/best_recipe.yaml` relative to the working directory, too.
    evomerge_in(&b, &["merge", "runs/p/best_recipe.yaml", "m", "--quiet"]);
}

#[test]
fn shareable_run_directories_keep_base_plus_adapter_relative() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x/y");
    fs::create_dir_all(&dir).unwrap();
    let base = tmp.path().join("m/base");
    let adapter = tmp.path().join("m/lora");
    fs::create_dir_all(&base).unwrap();
    fs::create_dir_all(&adapter).unwrap();
    fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
    let r = evomerge::recipe::Recipe::from_str(
        &format!(
            "models:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\n",
            base.display(),
            adapter.display()
        ),
        None,
    )
    .unwrap();
    let yaml = r.relative_to(&dir).to_yaml();
    assert!(yaml.contains("model: ../../m/base+../../m/lora"), "{yaml}");
    // read back from a file in `dir`, both sides resolve to the same directories
    let back = evomerge::recipe::Recipe::from_str(&yaml, Some(&dir.join("r.yaml"))).unwrap();
    let evomerge::recipe::Inputs::Models(ms) = &back.inputs else {
        panic!()
    };
    match evomerge::store::lora::parse_ref(&ms[0].model.path).unwrap() {
        evomerge::store::lora::ModelRefKind::Lora {
            base: b,
            adapter: a,
        } => {
            assert_eq!(
                fs::canonicalize(b).unwrap(),
                fs::canonicalize(&base).unwrap()
            );
            assert_eq!(
                fs::canonicalize(a).unwrap(),
                fs::canonicalize(&adapter).unwrap()
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Issue 13: bad values in an input's config.json were copied into the merge's output. Each is
/// refused when the model is opened — the error names the config.json and the key — with a
/// non-zero exit and nothing written at OUT; `eval` refuses to score such a model.
#[test]
fn bad_config_values_are_refused_naming_file_and_key() {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let members = evomerge::synth::write_family(
        &tmp.path().join("fam"),
        &evomerge::synth::LlamaSpec::tiny(),
        1,
        3,
    )
    .unwrap();
    let (good, bad) = (&members[0], &members[1]);
    let config_path = bad.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let recipe = tmp.path().join("r.yml");
    fs::write(
        &recipe,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
            good.display(),
            bad.display()
        ),
    )
    .unwrap();
    let cases: &[(&str, serde_json::Value)] = &[
        ("num_hidden_layers", json!(0)),
        ("num_hidden_layers", json!(-2)),
        ("num_hidden_layers", json!("2")),
        ("hidden_size", json!(0)),
        ("hidden_size", json!(16.5)),
        ("hidden_size", json!(1u64 << 40)),
        ("num_attention_heads", json!(0)),
        ("num_attention_heads", json!(5)), // does not divide hidden_size 16 (no head_dim)
        ("num_key_value_heads", json!(3)), // does not divide 4 heads
        ("vocab_size", json!(-1)),
        ("vocab_size", json!(null)), // null is "absent": accepted below
        ("intermediate_size", json!([])),
        ("intermediate_size", json!(1e300)),
        ("rms_norm_eps", json!(-1e-5)),
        ("rms_norm_eps", json!(2.0)),
        ("rms_norm_eps", json!(1e300)),
        ("rms_norm_eps", json!("1e-5")),
        ("rope_theta", json!(0)),
        ("rope_theta", json!(-10000.0)),
        ("rope_theta", json!([10000])),
        ("max_position_embeddings", json!(0)),
        ("max_position_embeddings", json!(1e20)),
        ("tie_word_embeddings", json!("false")),
        ("tie_word_embeddings", json!(0)),
    ];
    for (key, value) in cases {
        let mut config = original.clone();
        if key == &"num_attention_heads" || key == &"hidden_size" {
            config.as_object_mut().unwrap().remove("head_dim");
        }
        config[*key] = value.clone();
        fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let out = tmp.path().join("out");
        let o = Command::new(bin())
            .args(["merge", "--quiet"])
            .arg(&recipe)
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        if value.is_null() {
            assert!(o.status.success(), "{key} = null: {stderr}");
            fs::remove_dir_all(&out).unwrap();
            continue;
        }
        assert_eq!(o.status.code(), Some(1), "{key} = {value}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: ", config_path.display()))
                && stderr.contains(&format!("`{key}` = ")),
            "{key} = {value}: {stderr}"
        );
        assert!(!out.exists(), "{key} = {value}: output written");
    }

    // `eval` opens the model the same way.
    let mut config = original.clone();
    config["rms_norm_eps"] = json!(-1.0);
    config["evomerge_tokenizer"] = json!("char");
    fs::write(&config_path, config.to_string()).unwrap();
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let o = Command::new(bin())
        .arg("eval")
        .arg("--tasks")
        .arg(toy.join("tasks.toml"))
        .arg(bad)
        .output()
        .unwrap();
    // `eval` reports a model that fails as an `error` row with its message, as it does for
    // any failing model.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("error |")
            && stdout.contains(&format!(
                "{}: `rms_norm_eps` = -1.0 must be a number in [0, 1]",
                config_path.display()
            )),
        "{stdout}"
    );
}

#[test]
fn hub_ids_in_search_files_are_refused_when_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = fake_hub_cache(tmp.path());
    let (p, _) = ps_dfs_searches(tmp.path());
    let text = fs::read_to_string(&p)
        .unwrap()
        .replace("\"../fam/ft2\"", "\"org/missing\"");
    fs::write(&p, text).unwrap();
    let o = Command::new(bin())
        .args(["search", p.to_str().unwrap(), "--quiet"])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("`org/missing` looks like a Hugging Face hub id"),
        "{stderr}"
    );
    assert!(!tmp.path().join("runs").exists());
}

/// `eval` takes a DFS route file (a search's best_route.json, pool paths relative to the file):
/// the route through every layer of the toy `add` expert, in order, scale 1, scores exactly as
/// the `add` directory itself; a file that is not a route is refused naming it.
#[test]
fn eval_scores_a_route_file_like_the_model_it_routes_through() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let add = root.join("assets/toy/add");
    let cipher = root.join("assets/toy/cipher");
    let hops: Vec<serde_json::Value> = (0..4)
        .map(|l| serde_json::json!({ "model": 0, "layer": l, "scale": 1.0 }))
        .collect();
    let route = serde_json::json!({
        "models": [add.to_str().unwrap(), cipher.to_str().unwrap()],
        "route": { "embed_model": 0, "hops": hops },
    });
    let file = tmp.path().join("best_route.json");
    fs::write(&file, route.to_string()).unwrap();
    let tasks = root.join("assets/toy/tasks.toml");
    let table = |model: &Path| {
        let o = Command::new(bin())
            .args(["eval", "--split", "dev", "--tasks"])
            .arg(&tasks)
            .arg(model)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8(o.stdout).unwrap();
        // The one result row, without its label.
        let row = out.lines().filter(|l| l.starts_with('|')).nth(2).unwrap();
        row.split('|')
            .skip(2)
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("|")
    };
    assert_eq!(table(&file), table(&add));
    let bad = tmp.path().join("x.json");
    fs::write(&bad, "{}").unwrap();
    let o = Command::new(bin())
        .args(["eval", "--tasks"])
        .arg(&tasks)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("x.json") && err.contains("not a route file"),
        "{err}"
    );
}
