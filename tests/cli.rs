//! Integration tests of whole commands run as processes: a search killed with SIGKILL in the
//! middle of a generation resumes to the same result as an uninterrupted run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// A small PS search over the shipped toy world (few examples, few evaluations).
fn small_search(dir: &Path) -> PathBuf {
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

/// `eval` runs on the device and in the compute dtype asked for; `cuda` in a build without the
/// `cuda` feature is an error naming the flag and the build option.
#[test]
fn eval_takes_device_dtype_and_batch_flags() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks.toml");
    fs::write(
        &tasks,
        format!(
            "[[tasks]]\nname = \"add\"\npath = \"{}\"\nmetric = \"exact_match\"\nmax_new_tokens = 4\nlimit = 8\n",
            toy.join("tasks/add").display()
        ),
    )
    .unwrap();
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
