//! Issue 13: a seeded mutation fuzzer over everything a user (or a damaged disk) hands us —
//! safetensors headers, sharded indexes, recipes, search files and task files — driving the
//! library directly and the CLI for a smaller share of the cases.
//!
//! Asserted for every case: no panic (`catch_unwind`; for the CLI: exit code not 101 and no
//! "panicked" on stderr), no hang (a watchdog per case), and no exit-0-with-garbage: a
//! corrupted checkpoint that is accepted reads exactly the original bytes (a mutation that
//! changes nothing that matters, such as a metadata string, is fine); a merge that succeeds
//! is all finite; a failed CLI merge leaves nothing at OUT.
//!
//! Deterministic: every case is generated from `SEED` and its index. A failure prints the case
//! (`FUZZ_CASE=<family>:<index>`); set that environment variable to replay one case alone.
//! The case counts are sized to keep the whole file well under 60 s in a debug build on two
//! cores.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use evomerge::recipe::Recipe;
use evomerge::search::SearchDef;
use evomerge::store::{Model, ModelSet, WriteConfig};
use evomerge::synth::{LlamaSpec, write_family, write_family_with};
use evomerge::tensor::DType;

const SEED: u64 = 0x13_f022;
/// A library case taking longer than this is a hang.
const CASE_LIMIT: Duration = Duration::from_secs(10);
/// A CLI run taking longer than this is killed and fails the test.
const CLI_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Harness

/// SplitMix64: small, seedable, no dependencies.
struct Rng(u64);

impl Rng {
    fn new(family: &str, case: u64) -> Rng {
        let mut h = SEED;
        for b in family.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut r = Rng(h ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// `FUZZ_CASE=family:index` replays one case.
fn only_case(family: &str) -> Option<Option<u64>> {
    let spec = std::env::var("FUZZ_CASE").ok()?;
    let (f, i) = spec.split_once(':')?;
    Some((f == family).then(|| i.parse().ok()).flatten())
}

/// Run `cases` cases of `family` on a worker thread, each inside `catch_unwind`; a panic fails
/// with the case, and a case running past [`CASE_LIMIT`] fails as a hang. `run` returns
/// whether the input was accepted, or `Err(msg)` for garbage (an oracle violation). At least
/// `min_accepted` inputs must be accepted (else the mutations only test the first check).
fn fuzz<S: Send + 'static>(
    family: &'static str,
    cases: u64,
    min_accepted: usize,
    state: S,
    run: impl Fn(&mut S, u64, &mut Rng) -> Result<bool, String> + Send + 'static,
) {
    let start = Instant::now();
    let selected: Vec<u64> = match only_case(family) {
        None => (0..cases).collect(),
        Some(Some(i)) => vec![i],
        Some(None) => return,
    };
    let (tx, rx) = mpsc::channel::<(u64, bool, Result<bool, String>)>();
    let list = selected.clone();
    std::thread::spawn(move || {
        let mut state = state;
        for case in list {
            tx.send((case, false, Ok(false))).ok();
            let mut rng = Rng::new(family, case);
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&mut state, case, &mut rng)));
            let result = match outcome {
                Ok(Ok(accepted)) => Ok(accepted),
                Ok(Err(msg)) => Err(format!("garbage: {msg}")),
                Err(p) => Err(format!(
                    "panic: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
            };
            tx.send((case, true, result)).ok();
        }
    });
    let mut current = None;
    let mut failures = Vec::new();
    let mut accepted = 0;
    loop {
        match rx.recv_timeout(CASE_LIMIT) {
            Ok((case, false, _)) => current = Some(case),
            Ok((case, true, Err(msg))) => {
                failures.push(format!("FUZZ_CASE={family}:{case}: {msg}"));
                if failures.len() >= 5 {
                    break;
                }
            }
            Ok((_, true, Ok(a))) => accepted += usize::from(a),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failures.push(format!(
                    "FUZZ_CASE={family}:{}: hang: no result after {CASE_LIMIT:?}",
                    current.unwrap_or(0)
                ));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "fuzz {family}: {} cases, {accepted} accepted, {:.1} s",
        selected.len(),
        start.elapsed().as_secs_f64()
    );
    if selected.len() as u64 == cases {
        assert!(
            accepted >= min_accepted,
            "{family}: only {accepted} of {cases} mutated inputs accepted"
        );
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// Run the CLI with a time guard: returns (exit code, stderr); fails on a hang (killed after
/// [`CLI_LIMIT`]), exit code 101 or a "panicked" message.
fn cli(args: &[&std::ffi::OsStr], what: &str) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > CLI_LIMIT {
            child.kill().ok();
            child.wait().ok();
            panic!("{what}: hang: `evomerge {args:?}` still running after {CLI_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let err = reader.join().unwrap();
    let code = status.code().unwrap_or(-1);
    assert!(
        code != 101 && !err.contains("panicked"),
        "{what}: `evomerge {args:?}` panicked (exit {code}): {err}"
    );
    (code, err)
}

// ---------------------------------------------------------------------------------------------
// Byte- and text-level mutations

fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, range: std::ops::Range<usize>) {
    if range.is_empty() {
        return;
    }
    let at = range.start + rng.below(range.len());
    match rng.below(4) {
        0 => bytes[at] ^= 1 << rng.below(8),
        1 => bytes[at] = rng.next() as u8,
        2 => bytes.insert(at, *rng.pick(b" {}[],:\"0123456789-.eE\\\x00\xff")),
        _ => {
            bytes.remove(at);
        }
    }
}

/// Values that break numbers: non-finite, huge, tiny, negative, wrong type, nested.
const HOSTILE_VALUES: &[&str] = &[
    "nan",
    ".nan",
    "NaN",
    "inf",
    ".inf",
    "-.inf",
    "1e308",
    "-1e308",
    "1e309",
    "1e-320",
    "-1",
    "0",
    "-0.0",
    "1.7",
    "-0.5",
    "2",
    "1000000000",
    "18446744073709551616",
    "99999999999999999999999",
    "-9223372036854775808",
    "0x10",
    "1_000",
    "abc",
    "\"1\"",
    "true",
    "null",
    "~",
    "[]",
    "{}",
    "[1, 2, 3, 4, 5, 6, 7]",
    "[[[[[[[[1]]]]]]]]",
    "{a: 1}",
    "[nan, inf]",
];

/// Mutate structured text (YAML / TOML / JSON): numbers, keys, lines, nesting, bytes.
fn mutate_text(rng: &mut Rng, text: &str, keys: &[&str]) -> String {
    let mut text = text.to_string();
    for _ in 0..1 + rng.below(3) {
        text = match rng.below(9) {
            // a number → a hostile value
            0 | 1 => {
                let spans = number_spans(&text);
                if spans.is_empty() {
                    text
                } else {
                    let (a, b) = *rng.pick(&spans);
                    format!("{}{}{}", &text[..a], rng.pick(HOSTILE_VALUES), &text[b..])
                }
            }
            // a key → another known key, or a typo
            2 => {
                let present: Vec<&&str> = keys.iter().filter(|k| text.contains(**k)).collect();
                if present.is_empty() {
                    text
                } else {
                    let from = **rng.pick(&present);
                    let to = if rng.chance(70) {
                        rng.pick(keys).to_string()
                    } else {
                        format!("{from}x")
                    };
                    let hits: Vec<usize> = text.match_indices(from).map(|(i, _)| i).collect();
                    let at = *rng.pick(&hits);
                    format!("{}{to}{}", &text[..at], &text[at + from.len()..])
                }
            }
            // delete / duplicate / swap lines, re-indent one
            3 | 4 => {
                let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                if lines.is_empty() {
                    text
                } else {
                    let i = rng.below(lines.len());
                    match rng.below(4) {
                        0 => {
                            lines.remove(i);
                        }
                        1 => {
                            let l = lines[i].clone();
                            lines.insert(i, l);
                        }
                        2 => {
                            let j = rng.below(lines.len());
                            lines.swap(i, j);
                        }
                        _ => {
                            if rng.chance(50) {
                                lines[i].insert_str(0, "  ");
                            } else if lines[i].starts_with("  ") {
                                lines[i].drain(..2);
                            }
                        }
                    }
                    lines.join("\n") + "\n"
                }
            }
            // wrap a value in brackets
            5 => {
                let spans = number_spans(&text);
                if spans.is_empty() {
                    text
                } else {
                    let (a, b) = *rng.pick(&spans);
                    let depth = 1 + rng.below(4);
                    format!(
                        "{}{}{}{}{}",
                        &text[..a],
                        "[".repeat(depth),
                        &text[a..b],
                        "]".repeat(depth),
                        &text[b..]
                    )
                }
            }
            // a string value → something else
            6 => {
                let quoted: Vec<(usize, usize)> = quoted_spans(&text);
                if quoted.is_empty() {
                    text
                } else {
                    let (a, b) = *rng.pick(&quoted);
                    let repl = *rng.pick(&[
                        "\"\"",
                        "\"../../x\"",
                        "\"org/name\"",
                        "\"/nonexistent\"",
                        "1",
                        "[]",
                        "\"\u{0}\"",
                    ]);
                    format!("{}{repl}{}", &text[..a], &text[b..])
                }
            }
            // raw bytes (kept as UTF-8 by lossy conversion)
            _ => {
                let mut bytes = text.into_bytes();
                let n = bytes.len();
                mutate_bytes(rng, &mut bytes, 0..n);
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
    }
    text
}

/// Byte spans of the numbers in `text` (a digit run with sign, point and exponent).
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = b[i].is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let mut a = i;
            if a > 0 && b[a - 1] == b'-' {
                a -= 1;
            }
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b"._eE".contains(&b[j])) {
                j += 1;
            }
            out.push((a, j));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Byte spans of double-quoted strings in `text`, quotes included.
fn quoted_spans(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c == '"' {
            match start {
                None => start = Some(i),
                Some(a) => {
                    out.push((a, i + 1));
                    start = None;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// What an accepted model must read back: every tensor's stored bytes and decoded values.
#[derive(Clone)]
struct Original {
    raw: BTreeMap<String, (DType, Vec<u8>)>,
    values: BTreeMap<String, Vec<u32>>,
}

fn snapshot(model: &Model) -> Original {
    let mut raw = BTreeMap::new();
    let mut values = BTreeMap::new();
    for info in model.tensors() {
        let (i, bytes) = model.raw(&info.name).unwrap();
        raw.insert(info.name.clone(), (i.dtype, bytes.to_vec()));
        let v = model.read(&info.name).unwrap().to_f32_vec();
        values.insert(info.name.clone(), v.iter().map(|x| x.to_bits()).collect());
    }
    Original { raw, values }
}

/// The oracle: an accepted corrupted checkpoint holds the original's tensors (a name changed by
/// a byte flip may hold any original tensor's bytes, a shape may be permuted), reads every one
/// without error, and reads the original values wherever the dtype is unchanged.
fn check_accepted(model: &Model, original: &Original) -> Result<(), String> {
    if model.tensors().len() != original.raw.len() {
        return Err(format!(
            "accepted with {} tensors, the original has {}",
            model.tensors().len(),
            original.raw.len()
        ));
    }
    for info in model.tensors() {
        let (_, bytes) = model.raw(&info.name).map_err(|e| e.to_string())?;
        let values = model
            .read(&info.name)
            .map_err(|e| format!("`{}` listed but unreadable: {e}", info.name))?
            .to_f32_vec();
        // Two same-sized tensors trading offsets make a valid file that reads the other's
        // bytes; a tensor read shifted, or from outside the data, holds bytes no tensor holds.
        if !original.raw.values().any(|(_, b)| b.as_slice() == bytes) {
            return Err(format!(
                "`{}` reads bytes that no original tensor holds",
                info.name
            ));
        }
        if let Some((dtype, orig)) = original.raw.get(&info.name)
            && orig.as_slice() == bytes
            && *dtype == info.dtype
        {
            let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            if bits != original.values[&info.name] {
                return Err(format!("`{}` decodes to other values", info.name));
            }
        }
    }
    Ok(())
}

/// Rebuild a safetensors file with a new header (padded with spaces to 8 bytes, as writers do)
/// and the same data region.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Mutate one field of one tensor's header entry.
fn mutate_header_json(rng: &mut Rng, header: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let obj = header.as_object_mut().unwrap();
    // Entries still well-formed (an earlier mutation of this case may have broken one).
    let names: Vec<String> = obj
        .iter()
        .filter(|(k, v)| {
            *k != "__metadata__"
                && v["shape"].is_array()
                && v["data_offsets"].as_array().is_some_and(|a| a.len() == 2)
        })
        .map(|(k, _)| k.clone())
        .collect();
    if names.is_empty() {
        return;
    }
    let name = rng.pick(&names).clone();
    let hostile = |rng: &mut Rng| -> Value {
        rng.pick(&[
            json!(-1),
            json!(0),
            json!(1.5),
            json!(u64::MAX),
            json!(1u64 << 63),
            json!(1u64 << 40),
            json!("8"),
            json!(null),
            json!([]),
        ])
        .clone()
    };
    match rng.below(10) {
        0 | 1 => {
            // offsets nudged, swapped with another tensor's, or hostile
            let e = &mut obj[&name]["data_offsets"];
            let which = rng.below(2);
            if rng.chance(60) {
                let v = e[which].as_u64().unwrap_or(0) as i64 + rng.below(17) as i64 - 8;
                e[which] = json!(v);
            } else {
                e[which] = hostile(rng);
            }
        }
        2 => {
            // two tensors trade offsets (a valid file when their sizes match)
            let other = rng.pick(&names).clone();
            let a = obj[&name]["data_offsets"].clone();
            let b = obj[&other]["data_offsets"].clone();
            obj.get_mut(&name).unwrap()["data_offsets"] = b;
            obj.get_mut(&other).unwrap()["data_offsets"] = a;
        }
        3 => {
            let d = rng.pick(&["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "", "f32"]);
            obj.get_mut(&name).unwrap()["dtype"] = json!(d);
        }
        4..=6 => {
            let shape = obj.get_mut(&name).unwrap()["shape"].as_array_mut().unwrap();
            match rng.below(6) {
                0 => shape.reverse(),
                1 => shape.push(json!(1)),
                2 => {
                    shape.pop();
                }
                3 => {
                    if !shape.is_empty() {
                        let i = rng.below(shape.len());
                        let v = shape[i].as_u64().unwrap() as i64 + rng.below(5) as i64 - 2;
                        shape[i] = json!(v);
                    }
                }
                4 => {
                    if !shape.is_empty() {
                        let i = rng.below(shape.len());
                        shape[i] = hostile(rng);
                    }
                }
                _ => shape.clear(),
            }
        }
        7 => {
            let key = *rng.pick(&["dtype", "shape", "data_offsets"]);
            obj.get_mut(&name)
                .unwrap()
                .as_object_mut()
                .unwrap()
                .remove(key);
        }
        8 => {
            let v = obj.remove(&name).unwrap();
            let new = if rng.chance(50) {
                format!("{name}.x")
            } else {
                rng.pick(&names).clone()
            };
            obj.insert(new, v);
        }
        _ => {
            let v = hostile(rng);
            if rng.chance(50) {
                obj.insert(name, v);
            } else {
                obj.insert("__metadata__".into(), v);
            }
        }
    }
}

/// One corrupted safetensors file from `orig`.
fn corrupt_safetensors(rng: &mut Rng, orig: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
    let (header, data) = (&orig[8..8 + n], &orig[8 + n..]);
    let mut out = orig.to_vec();
    match rng.below(10) {
        // the length field: a flipped bit, or off by a little
        0 => out[rng.below(8)] ^= 1 << rng.below(8),
        1 => {
            let delta = rng.below(33) as i64 - 16;
            let len = (n as i64 + if delta == 0 { 1 } else { delta }).max(0) as u64;
            out[..8].copy_from_slice(&len.to_le_bytes());
        }
        // header bytes, length kept
        2 | 3 => {
            for _ in 0..1 + rng.below(3) {
                let end = 8 + n.min(out.len() - 8);
                mutate_bytes(rng, &mut out, 8..end);
            }
        }
        // header bytes, length adjusted to the new header
        4 => {
            let mut h = header.to_vec();
            let len = h.len();
            mutate_bytes(rng, &mut h, 0..len);
            out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
        }
        // one field of the parsed header, re-serialized
        5..=7 => {
            let mut json: serde_json::Value = serde_json::from_slice(header).unwrap();
            for _ in 0..1 + rng.below(2) {
                mutate_header_json(rng, &mut json);
            }
            out = with_header(&json.to_string(), data);
        }
        // truncated, or bytes appended
        8 => out.truncate(rng.below(orig.len())),
        _ => out.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8)),
    }
    out
}

/// A tiny family on disk: single-file f32 `base`, `ft1`, `ft2`, and a bf16 tied-embedding
/// model sharded into several files (`sharded/base`).
fn family(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let spec = LlamaSpec::tiny();
    let members = write_family(&dir.join("fam"), &spec, 2, 7).unwrap();
    let sharded_spec = LlamaSpec {
        dtype: DType::BF16,
        tie_embeddings: true,
        ..spec
    };
    let sharded = write_family_with(
        &dir.join("sharded"),
        &sharded_spec,
        0,
        9,
        &WriteConfig {
            max_shard_size: 2_000,
        },
    )
    .unwrap();
    (members, sharded[0].clone())
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Open a corrupted model directory; when accepted, apply the oracle.
fn open_and_check(dir: &Path, original: &Original) -> Result<bool, String> {
    match Model::open(dir) {
        Ok(model) => check_accepted(&model, original).map(|()| true),
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() {
                return Err("an error with no message".into());
            }
            Ok(false)
        }
    }
}

#[test]
fn fuzz_single_file_safetensors_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let (members, _) = family(tmp.path());
    let src = members[1].clone();
    let original = snapshot(&Model::open(&src).unwrap());
    let orig = fs::read(src.join("model.safetensors")).unwrap();
    let case_dir = tmp.path().join("case");
    copy_dir(&src, &case_dir);
    fuzz("safetensors", 4000, 50, (), move |_, case, rng| {
        let bytes = corrupt_safetensors(rng, &orig);
        fs::write(case_dir.join("model.safetensors"), &bytes).unwrap();
        let accepted = open_and_check(&case_dir, &original)?;
        // Every 60th case through the CLI too: `inspect` must not panic and must fail exactly
        // when the library refuses.
        if case % 60 == 0 {
            let (code, err) = cli(&["inspect".as_ref(), case_dir.as_os_str()], "inspect");
            if (code == 0) != accepted {
                return Err(format!(
                    "inspect exit {code} but the library {} the file: {err}",
                    if accepted { "accepts" } else { "refuses" }
                ));
            }
        }
        Ok(accepted)
    });
}

#[test]
fn fuzz_sharded_indexes() {
    use serde_json::{Value, json};
    let tmp = tempfile::tempdir().unwrap();
    let (_, src) = family(tmp.path());
    assert!(src.join("model.safetensors.index.json").is_file());
    let original = snapshot(&Model::open(&src).unwrap());
    let index_text = fs::read_to_string(src.join("model.safetensors.index.json")).unwrap();
    let index: Value = serde_json::from_str(&index_text).unwrap();
    let map = index["weight_map"].as_object().unwrap().clone();
    let tensors: Vec<String> = map.keys().cloned().collect();
    let mut shards: Vec<String> = map
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 3, "{shards:?}");
    let case_dir = tmp.path().join("case");
    fuzz("sharded", 1000, 40, (), move |_, case, rng| {
        copy_dir(&src, &case_dir);
        let mut idx = index.clone();
        let wm = idx["weight_map"].as_object_mut().unwrap();
        let t = rng.pick(&tensors).clone();
        let mut text = None;
        let kind = rng.below(11);
        match kind {
            0 => {
                wm.insert(t.clone(), json!(rng.pick(&shards)));
            }
            1 => {
                let bad = *rng.pick(&[
                    "model-99999-of-00003.safetensors",
                    "",
                    "..",
                    "../model.safetensors",
                    "/etc/passwd",
                    "config.json",
                    "model.safetensors.index.json",
                ]);
                wm.insert(t.clone(), json!(bad));
            }
            2 => {
                wm.insert(t.clone(), json!(rng.below(3)));
            }
            3 => {
                wm.remove(&t);
            }
            4 => {
                wm.insert(format!("{t}.extra"), json!(rng.pick(&shards)));
            }
            5 => {
                // the same tensor listed twice (serde_json keeps the last): a duplicate key
                let s = idx.to_string();
                let dup = format!("\"weight_map\":{{\"{t}\":\"{}\",", rng.pick(&shards));
                text = Some(s.replacen("\"weight_map\":{", &dup, 1));
            }
            6 => {
                let v = rng
                    .pick(&[json!(null), json!([]), json!("x"), json!({})])
                    .clone();
                idx["weight_map"] = v;
            }
            7 => {
                let mut s = index_text.clone().into_bytes();
                for _ in 0..1 + rng.below(3) {
                    let n = s.len();
                    mutate_bytes(rng, &mut s, 0..n);
                }
                text = Some(String::from_utf8_lossy(&s).into_owned());
            }
            8 => {
                fs::remove_file(case_dir.join(rng.pick(&shards))).unwrap();
            }
            _ => {
                // one shard's header corrupted
                let shard = case_dir.join(rng.pick(&shards));
                let bytes = fs::read(&shard).unwrap();
                fs::write(&shard, corrupt_safetensors(rng, &bytes)).unwrap();
            }
        }
        let text = text.unwrap_or_else(|| serde_json::to_string_pretty(&idx).unwrap());
        fs::write(case_dir.join("model.safetensors.index.json"), text).unwrap();
        let accepted = open_and_check(&case_dir, &original)
            .map_err(|e| format!("index mutation {kind} on `{t}`: {e}"))?;
        if case % 50 == 0 {
            let (code, err) = cli(&["inspect".as_ref(), case_dir.as_os_str()], "inspect");
            if (code == 0) != accepted {
                return Err(format!(
                    "inspect exit {code}, library accepted {accepted}: {err}"
                ));
            }
        }
        Ok(accepted)
    });
}

// ---------------------------------------------------------------------------------------------
// Recipes

const RECIPE_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "model",
    "parameters",
    "weight",
    "density",
    "normalize",
    "int8_mask",
    "lambda",
    "epsilon",
    "t",
    "slices",
    "sources",
    "layer_range",
    "filter",
    "value",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "ties",
    "linear",
    "slerp",
    "passthrough",
    "task_arithmetic",
    "dare_ties",
    "della",
    "model_stock",
    "float32",
    "bfloat16",
];

fn base_recipes(m: &[PathBuf]) -> Vec<String> {
    let (b, f1, f2) = (m[0].display(), m[1].display(), m[2].display());
    vec![
        format!(
            "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {f2}\n    parameters:\n      weight: 0.4\n      density: [0.2, 0.8]\nparameters:\n  normalize: true\n  int8_mask: false\ndtype: float32\n"
        ),
        format!(
            "merge_method: slerp\nbase_model: {b}\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n      - model: {f1}\n        layer_range: [0, 2]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.3\ndtype: bfloat16\n"
        ),
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 1]\n  - sources:\n      - model: {f1}\n        layer_range: [1, 2]\n        parameters:\n          scale: 0.5\ndtype: float32\n"
        ),
        format!(
            "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters:\n      weight: 1.0\n  - model: {f2}\n    parameters:\n      weight: -0.5\nparameters:\n  lambda: 0.8\n  normalize: false\nout_dtype: float16\n"
        ),
        format!(
            "merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.7}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.3}}\nparameters: {{rescale: true}}\n"
        ),
        format!(
            "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n  - model: {f1}\n    parameters: {{weight: 2.0}}\n  - model: {f2}\n    parameters: {{weight: 0.5}}\nparameters: {{normalize: true}}\n"
        ),
    ]
}

/// Parse, validate, plan and merge a recipe in memory; a successful merge must be all finite.
fn merge_recipe(text: &str, path: &Path, models: &mut ModelSet) -> Result<bool, String> {
    let Ok(recipe) = Recipe::from_str(text, Some(path)) else {
        return Ok(false);
    };
    let _ = recipe.to_yaml();
    match evomerge::merge::executor::merge_in_memory(&recipe, models, 1) {
        Ok(merged) => {
            for (name, t) in &merged.tensors {
                if let Some(v) = t.to_f32_vec().iter().find(|v| !v.is_finite()) {
                    return Err(format!("merge succeeded with {v} in `{name}`"));
                }
            }
            Ok(true)
        }
        Err(e) if e.to_string().is_empty() => Err("an error with no message".into()),
        Err(_) => Ok(false),
    }
}

#[test]
fn fuzz_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let (members, _) = family(tmp.path());
    let bases = base_recipes(&members);
    let path = tmp.path().join("r.yml");
    // The unmutated recipes all merge.
    let mut models = ModelSet::new();
    for text in &bases {
        assert_eq!(merge_recipe(text, &path, &mut models), Ok(true), "{text}");
    }
    let root = tmp.path().to_path_buf();
    fuzz("recipe", 2500, 100, models, move |models, case, rng| {
        let base = rng.pick(&bases).clone();
        let text = mutate_text(rng, &base, RECIPE_KEYS);
        let accepted = merge_recipe(&text, &path, models)?;
        // Every 50th case through `evomerge merge`: exit 0 writes a finite model, anything
        // else leaves nothing at OUT.
        if case % 50 == 0 {
            let file = root.join(format!("cli-{case}.yml"));
            fs::write(&file, &text).unwrap();
            let out = root.join(format!("out-{case}"));
            let (code, err) = cli(
                &[
                    "merge".as_ref(),
                    "--quiet".as_ref(),
                    file.as_os_str(),
                    out.as_os_str(),
                ],
                "merge",
            );
            if code == 0 {
                let m = Model::open(&out).map_err(|e| format!("merge output unreadable: {e}"))?;
                for info in m.tensors() {
                    let v = m.read(&info.name).unwrap().to_f32_vec();
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(format!("merge exit 0 with non-finite `{}`", info.name));
                    }
                }
                fs::remove_dir_all(&out).unwrap();
            } else if out.exists() {
                return Err(format!(
                    "failed merge (exit {code}) left {}: {err}",
                    out.display()
                ));
            }
            if (code == 0) != accepted {
                return Err(format!(
                    "CLI merge exit {code}, library merge accepted {accepted}: {err}\n{text}"
                ));
            }
        }
        Ok(accepted)
    });
}

// ---------------------------------------------------------------------------------------------
// Search files and task files

const SEARCH_KEYS: &[&str] = &[
    "name",
    "models",
    "base_model",
    "method",
    "output",
    "space",
    "kind",
    "granularity",
    "split_attn_mlp",
    "embeddings",
    "params",
    "ranges",
    "defaults",
    "weight",
    "density",
    "repeats",
    "scale_range",
    "indicator_threshold",
    "embed_model",
    "evaluator",
    "fitness_split",
    "tasks",
    "path",
    "metric",
    "max_new_tokens",
    "limit",
    "batch_size",
    "max_length",
    "optimizer",
    "sigma0",
    "population",
    "generations",
    "max_evaluations",
    "seed",
    "restarts",
    "parallelism",
    "slots",
    "timeout_s",
    "command",
    "ps",
    "dfs",
    "ps_dfs",
    "every:2",
];

fn base_searches(toy: &Path) -> Vec<String> {
    let t = toy.display();
    let tasks = format!(
        "tasks = [\n  {{ name = \"add\", path = \"{t}/tasks/add\", metric = \"exact_match\", max_new_tokens = 5, limit = 4 }},\n]"
    );
    vec![
        format!(
            "name = \"f-ps\"\nmodels = [\"{t}/add\", \"{t}/cipher\"]\nbase_model = \"{t}/base\"\nmethod = \"ties\"\noutput = \"OUT\"\n\n[space]\nkind = \"ps\"\ngranularity = \"every:2\"\nsplit_attn_mlp = true\nembeddings = true\nparams = [\"weight\", \"density\"]\nranges = {{ density = [0.1, 1.0] }}\ndefaults = {{ weight = 1.0, density = 0.5 }}\n\n[evaluator]\nkind = \"lm\"\nfitness_split = \"dev\"\nbatch_size = 8\nmax_length = 64\n{tasks}\n\n[optimizer]\nsigma0 = 0.2\npopulation = 8\ngenerations = 3\nseed = 1\nrestarts = \"ipop\"\n\n[parallelism]\nslots = 2\n"
        ),
        format!(
            "name = \"f-dfs\"\nmodels = [\"{t}/add\", \"{t}/cipher\"]\noutput = \"OUT\"\n\n[space]\nkind = \"dfs\"\nrepeats = 2\nscale_range = [0.5, 1.5]\nindicator_threshold = 0.0\nembed_model = 0\n\n[evaluator]\nkind = \"lm\"\nfitness_split = \"dev\"\n{tasks}\n\n[optimizer]\nsigma0 = 0.5\nmax_evaluations = 20\nseed = 2\n\n[parallelism]\nslots = 1\n"
        ),
        format!(
            "name = \"f-cmd\"\nmodels = [\"{t}/add\", \"{t}/cipher\"]\nbase_model = \"{t}/base\"\nmethod = \"task_arithmetic\"\noutput = \"OUT\"\n\n[space]\nkind = \"ps\"\ngranularity = \"whole\"\n\n[evaluator]\nkind = \"command\"\ncommand = [\"true\"]\ntimeout_s = 30\n\n[optimizer]\npopulation = 4\ngenerations = 2\nseed = 3\n"
        ),
    ]
}

#[test]
fn fuzz_search_files() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.toml");
    let out = tmp.path().join("OUT");
    let bases: Vec<String> = base_searches(&toy)
        .into_iter()
        .map(|s| s.replace("\"OUT\"", &format!("\"{}\"", out.display())))
        .collect();
    let dir = tmp.path().to_path_buf();
    let prepare = move |text: &str| -> Result<bool, String> {
        let Ok(def) = SearchDef::from_toml(text, &dir, &path) else {
            return Ok(false);
        };
        // Open the models and build the space and evaluator (a PS+DFS search would run its
        // PS search first: parsing is all it gets here).
        if matches!(def.space, evomerge::search::def::SpaceDef::PsDfs { .. }) {
            return Ok(true);
        }
        let options = evomerge::search::run::RunOptions::default();
        Ok(evomerge::search::run::Search::prepare(&def, &options).is_ok())
    };
    for text in &bases {
        assert_eq!(prepare(text), Ok(true), "{text}");
    }
    fuzz("search", 1000, 20, (), move |_, _, rng| {
        let base = rng.pick(&bases).clone();
        let text = mutate_text(rng, &base, SEARCH_KEYS);
        let accepted = prepare(&text)?;
        if out.exists() {
            return Err("preparing a search wrote its output directory".into());
        }
        Ok(accepted)
    });
}

#[test]
fn fuzz_task_files() {
    use evomerge::eval::tasks::{Metric, load_task_file, parse_examples};
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = [
        fs::read_to_string(toy.join("tasks/add/dev.jsonl"))
            .unwrap()
            .lines()
            .take(6)
            .collect::<Vec<_>>()
            .join("\n"),
        "{\"prompt\":\"Q?\",\"choices\":[\"a\",\"b\",\"c\"],\"answer\":1}\n{\"prompt\":\"R?\",\"choices\":[\"x\",\"y\"],\"answer\":0}\n".to_string(),
        "{\"text\":\"hello world\"}\n{\"text\":\"abc\"}\n".to_string(),
    ];
    let task_dir = tmp.path().join("t");
    fs::create_dir(&task_dir).unwrap();
    for split in ["dev", "test", "train"] {
        fs::write(task_dir.join(format!("{split}.jsonl")), &jsonl[0]).unwrap();
    }
    let task_toml = "[[tasks]]\nname = \"t\"\npath = \"t\"\nmetric = \"exact_match\"\nmax_new_tokens = 5\nlimit = 3\nfewshot = 2\n";
    let toml_path = tmp.path().join("tasks.toml");
    const TASK_KEYS: &[&str] = &[
        "tasks",
        "name",
        "path",
        "metric",
        "max_new_tokens",
        "limit",
        "fewshot",
        "prompt",
        "target",
        "choices",
        "answer",
        "text",
        "exact_match",
        "multiple_choice",
        "perplexity",
    ];
    fuzz("tasks", 2000, 100, (), move |_, case, rng| {
        let mut accepted = false;
        if case % 3 == 0 {
            let text = mutate_text(rng, task_toml, TASK_KEYS);
            fs::write(&toml_path, text).unwrap();
            accepted = load_task_file(&toml_path).is_ok();
        } else {
            let base = rng.pick(&jsonl).clone();
            let text = mutate_text(rng, &base, TASK_KEYS);
            for metric in [
                Metric::ExactMatch,
                Metric::MultipleChoice,
                Metric::Perplexity,
            ] {
                accepted |= parse_examples(Path::new("x.jsonl"), &text, metric, None).is_ok();
            }
        }
        Ok(accepted)
    });
}

const CONFIG_KEYS: &[&str] = &[
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "torch_dtype",
    "architectures",
    "model_type",
];

/// config.json of an input model: a value the project relies on that is accepted must be sane
/// (the merge's output config passes the same check), and the forward's config reader never
/// panics on an accepted config.
#[test]
fn fuzz_model_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let (members, _) = family(tmp.path());
    let case_dir = tmp.path().join("case");
    copy_dir(&members[1], &case_dir);
    let config = fs::read_to_string(members[1].join("config.json")).unwrap();
    let recipe = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        members[0].display(),
        case_dir.display()
    );
    let recipe = Recipe::from_str(&recipe, None).unwrap();
    fuzz("config", 1000, 100, (), move |_, _, rng| {
        let text = mutate_text(rng, &config, CONFIG_KEYS);
        fs::write(case_dir.join("config.json"), &text).unwrap();
        let Ok(model) = Model::open(&case_dir) else {
            return Ok(false);
        };
        let _ = evomerge::model::LlamaConfig::from_json(model.config());
        let merged = evomerge::merge::executor::merge_in_memory(&recipe, &mut ModelSet::new(), 0);
        if let Ok(m) = merged {
            evomerge::arch::check_config(&m.config)
                .map_err(|e| format!("merge output config: {e}"))?;
        }
        Ok(true)
    });
}
