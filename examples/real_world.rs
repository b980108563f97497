//! Write the task files of the real-model world (`assets/real/tasks/`): two skills SmolLM2-135M-
//! Instruct is weak at, and a held-out task that needs both at once — the analogue of Sakana's
//! Japanese math (Akiba et al. 2024), here "arithmetic word problems answered in Roman numerals".
//!
//! ```text
//! cargo run --release --example real_world              # → assets/real/tasks/
//! cargo run --release --example real_world -- --out /tmp/real-tasks
//! ```
//!
//! - `arith`: `Question: Mia has 23 apples. Mia gets 18 more apples. How many apples does Mia
//!   have now?\nAnswer:` → `41` (addition or subtraction, every result in 1..=`MAX`).
//! - `roman`: `Question: Write the number 41 in Roman numerals.\nAnswer:` → `XLI` (five
//!   phrasings, numbers 1..=`ROMAN_MAX`).
//! - `arith_roman`: an `arith` problem followed by `Answer in Roman numerals.` → `XLI` (dev and
//!   test only: nothing trains on it).
//! - `arith_roman_mc`: the same problems as multiple choice — ` XLI` against the answer in digits
//!   and the operands (or neighbours) in Roman numerals: a fitness with a gradient, where exact
//!   match is 0 for every merge near the default.
//!
//! Splits are disjoint: every word problem (the text before the question's suffix) is drawn once
//! across all three tasks and all splits, so no `arith_roman` problem, not even in its plain-
//! digit form, is in `arith`'s train split; `roman` prompts are distinct across its splits.
//! Everything comes from one seeded `StdRng` (`SEED`): a re-run writes the same files.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

const SEED: u64 = 2024;
/// Largest answer of every task.
const MAX: u32 = 60;
const TRAIN: usize = 3000;
const DEV: usize = 64;
const TEST: usize = 200;
/// `roman` covers 1..=ROMAN_MAX (more than the answers of `arith_roman`), in `PHRASINGS` ways.
const ROMAN_MAX: u32 = 199;
const PHRASINGS: usize = 5;

const NAMES: &[&str] = &[
    "Mia", "Tom", "Ava", "Leo", "Sam", "Zoe", "Ben", "Lily", "Noah", "Emma", "Omar", "Nina",
];
const THINGS: &[&str] = &[
    "apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "shells", "cards",
    "stamps",
];

/// Roman numeral of `n` in 1..=3999 (subtractive notation).
fn roman(mut n: u32) -> String {
    const TABLE: &[(u32, &str)] = &[
        (1000, "M"),
        (900, "CM"),
        (500, "D"),
        (400, "CD"),
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ];
    let mut s = String::new();
    for &(v, c) in TABLE {
        while n >= v {
            s.push_str(c);
            n -= v;
        }
    }
    s
}

/// A word problem (without its question suffix), its answer in 1..=MAX, and its two operands.
fn word_problem(rng: &mut StdRng) -> (String, u32, [u32; 2]) {
    let n = NAMES.choose(rng).unwrap();
    let o = THINGS.choose(rng).unwrap();
    if rng.random_bool(0.5) {
        let a = rng.random_range(1..MAX);
        let b = rng.random_range(1..=MAX - a);
        let verb = ["gets", "finds", "buys"].choose(rng).unwrap();
        (
            format!("{n} has {a} {o}. {n} {verb} {b} more {o}. How many {o} does {n} have now?"),
            a + b,
            [a, b],
        )
    } else {
        let a = rng.random_range(2..=MAX + 20);
        let b = rng.random_range(a.saturating_sub(MAX).max(1)..a);
        let verb = ["gives away", "loses", "sells"].choose(rng).unwrap();
        (
            format!("{n} has {a} {o}. {n} {verb} {b} {o}. How many {o} does {n} have left?"),
            a - b,
            [a, b],
        )
    }
}

/// The `k`-th phrasing (0..PHRASINGS) of "write `v` in Roman numerals".
fn roman_question(k: usize, v: u32) -> String {
    match k {
        0 => format!("Write the number {v} in Roman numerals."),
        1 => format!("What is {v} in Roman numerals?"),
        2 => format!("Convert {v} to Roman numerals."),
        3 => format!("How is {v} written in Roman numerals?"),
        _ => format!("What number is {v}? Answer in Roman numerals."),
    }
}

fn line(question: &str, target: &str) -> String {
    serde_json::json!({ "prompt": format!("Question: {question}\nAnswer:"), "target": target })
        .to_string()
}

type Problem = (String, u32, [u32; 2]);

/// `count` distinct word problems, none drawn before (`seen`).
fn problems(rng: &mut StdRng, seen: &mut HashSet<String>, count: usize) -> Vec<Problem> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let p = word_problem(rng);
        if seen.insert(p.0.clone()) {
            out.push(p);
        }
    }
    out
}

/// The multiple-choice form of an `arith_roman` problem: the answer in Roman numerals (index 0)
/// against the answer in digits and the two operands in Roman numerals (what an expert alone
/// tends to answer), each a continuation of `Answer:`.
fn choice_line(question: &str, v: u32, [a, b]: [u32; 2]) -> String {
    let mut choices = vec![format!(" {}", roman(v)), format!(" {v}")];
    for n in [a, b, v + 1, v.saturating_sub(1).max(2)] {
        let c = format!(" {}", roman(n));
        if choices.len() < 4 && !choices.contains(&c) {
            choices.push(c);
        }
    }
    serde_json::json!({
        "prompt": format!("Question: {question}\nAnswer:"),
        "choices": choices,
        "answer": 0,
    })
    .to_string()
}

fn write(dir: &std::path::Path, split: &str, lines: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{split}.jsonl"));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--out needs a directory")?),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/real/tasks"),
    };
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut seen = HashSet::new();

    // The held-out combination first, so its problems are reserved before anything else.
    for (split, n) in [("dev", DEV), ("test", TEST)] {
        let drawn = problems(&mut rng, &mut seen, n);
        let question = |q: &str| format!("{q} Answer in Roman numerals.");
        let lines: Vec<String> = drawn
            .iter()
            .map(|(q, v, _)| line(&question(q), &roman(*v)))
            .collect();
        write(&out.join("arith_roman"), split, &lines)?;
        let lines: Vec<String> = drawn
            .iter()
            .map(|(q, v, ab)| choice_line(&question(q), *v, *ab))
            .collect();
        write(&out.join("arith_roman_mc"), split, &lines)?;
    }
    for (split, n) in [("train", TRAIN), ("dev", DEV), ("test", TEST)] {
        let lines: Vec<String> = problems(&mut rng, &mut seen, n)
            .iter()
            .map(|(q, v, _)| line(q, &v.to_string()))
            .collect();
        write(&out.join("arith"), split, &lines)?;
    }
    // Roman: PHRASINGS × ROMAN_MAX distinct prompts, shuffled once and cut into disjoint
    // splits; train draws `TRAIN` lines (with repeats) from what dev and test leave.
    let mut all: Vec<(String, u32)> = (1..=ROMAN_MAX)
        .flat_map(|v| (0..PHRASINGS).map(move |k| (roman_question(k, v), v)))
        .collect();
    all.shuffle(&mut rng);
    let (dev, rest) = all.split_at(DEV);
    let (test, train_pool) = rest.split_at(TEST);
    let mut train = Vec::with_capacity(TRAIN);
    while train.len() < TRAIN {
        let (q, v) = train_pool.choose(&mut rng).unwrap();
        train.push(line(q, &roman(*v)));
    }
    write(&out.join("roman"), "train", &train)?;
    let as_lines = |s: &[(String, u32)]| -> Vec<String> {
        s.iter().map(|(q, v)| line(q, &roman(*v))).collect()
    };
    write(&out.join("roman"), "dev", &as_lines(dev))?;
    write(&out.join("roman"), "test", &as_lines(test))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn roman_numerals() {
        assert_eq!(super::roman(4), "IV");
        assert_eq!(super::roman(49), "XLIX");
        assert_eq!(super::roman(60), "LX");
        assert_eq!(super::roman(1994), "MCMXCIV");
    }
}
