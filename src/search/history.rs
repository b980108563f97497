//! A search's history on disk, in its output directory:
//!
//! * `history.jsonl` — one [`Record`] per evaluation, appended and flushed the moment it is
//!   known (generation, index, genome, decoded recipe, fitness, every metric, seconds, error);
//! * `generations.csv` — one row per finished generation ([`GenerationRow`]: `generation, run,
//!   evals, best, mean, worst, sigma, failures, utilisation`), rewritten whole (atomically,
//!   [`crate::store::writer::write_atomic`]) after each generation. `utilisation` is the share
//!   of the slots' time the generation kept busy: the seconds its evaluations took (building
//!   and scoring candidates) over `slots ×` its wall time. Files written before the column
//!   existed still load (the column is then empty).
//!
//! Floats are written as the shortest decimal that reads back to the same bits and read with
//! serde_json's exact parser (its `float_roundtrip` feature), so a replayed fitness is the
//! recorded one bit for bit.
//!
//! **Resume.** A search is resumed by running it again with the same seed and answering every
//! proposal the history already holds from the history instead of evaluating it
//! ([`Replay`]). CMA-ES is deterministic given its seed and the values it is told, so the
//! replayed run proposes exactly the same genomes and continues to the same final result as a
//! run that was never interrupted. Proposals are matched by generation and the genome's bits
//! (`f64::to_bits`, within a few ULPs for histories read by older versions): the index within a
//! generation is the order in which evaluations *started*, which is not deterministic when
//! several slots run at once. A kill can leave a half-written last line; [`load`] ignores it
//! and [`HistoryWriter::open`] cuts it off. `history.jsonl` is only ever appended to (one
//! `write` per line); every other file of the output directory is replaced atomically.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File names inside an output directory.
pub const HISTORY_FILE: &str = "history.jsonl";
pub const GENERATIONS_FILE: &str = "generations.csv";

/// One evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Which CMA-ES run (restart) it belongs to.
    pub run: usize,
    /// Generation over all runs (0-based).
    pub generation: usize,
    /// Order of starting within the generation.
    pub index: usize,
    /// The raw genome (before decoding).
    pub genome: Vec<f64>,
    /// The decoded recipe (mergekit YAML) or route (JSON).
    pub recipe: String,
    /// The fitness (higher is better); `None` when the evaluation failed.
    pub fitness: Option<f64>,
    /// Every metric the evaluator returned.
    #[serde(default)]
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Seconds spent building and scoring the candidate.
    pub seconds: f64,
    /// Why the evaluation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The key a replayed proposal is matched by.
pub type Key = (usize, Vec<u64>);

/// The key of a genome in a generation.
pub fn key(generation: usize, genome: &[f64]) -> Key {
    (generation, genome.iter().map(|x| x.to_bits()).collect())
}

/// Read every complete record of `out_dir/history.jsonl` (none if the file does not exist). A
/// last line without its newline (a write cut short by a kill) is ignored; any other
/// unreadable line is an error naming the line.
pub fn load(out_dir: &Path) -> Result<Vec<Record>> {
    let path = out_dir.join(HISTORY_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut BufReader::new(file), &mut text)
        .map_err(|e| Error::io(&path, e))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Config {
                path: path.clone(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Appends records, one flushed line each; shared by the evaluation threads.
pub struct HistoryWriter {
    path: PathBuf,
    file: Mutex<File>,
}

impl HistoryWriter {
    /// Open `out_dir/history.jsonl` for appending, cutting off a half-written last line.
    pub fn open(out_dir: &Path) -> Result<HistoryWriter> {
        let path = out_dir.join(HISTORY_FILE);
        if let Ok(text) = std::fs::read(&path) {
            let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if keep != text.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                f.set_len(keep as u64).map_err(|e| Error::io(&path, e))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(HistoryWriter {
            path,
            file: Mutex::new(file),
        })
    }

    /// Append one record and flush it.
    pub fn append(&self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::Search(format!("cannot encode a history record: {e}")))?;
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Recorded answers for a resumed run.
///
/// A genome matches a record of the same generation when every gene is within a few ULPs of
/// the recorded one. With serde_json's exact parser (`float_roundtrip`) the bits are equal; the
/// tolerance only serves histories whose genomes were parsed inexactly, as serde_json's default
/// parser may land one ULP away. Two proposals of one generation are never that close.
#[derive(Default)]
pub struct Replay {
    by_generation: HashMap<usize, Vec<Record>>,
    len: usize,
}

const ULPS: u64 = 4;

fn near(a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    if a.is_sign_negative() != b.is_sign_negative() || !a.is_finite() || !b.is_finite() {
        return false;
    }
    a.to_bits().abs_diff(b.to_bits()) <= ULPS
}

impl Replay {
    /// Index `records` by generation.
    pub fn new(records: Vec<Record>) -> Replay {
        let len = records.len();
        let mut by_generation: HashMap<usize, Vec<Record>> = HashMap::new();
        for r in records {
            by_generation.entry(r.generation).or_default().push(r);
        }
        Replay { by_generation, len }
    }

    /// The recorded evaluation of `genome` in `generation`, if any.
    pub fn get(&self, generation: usize, genome: &[f64]) -> Option<&Record> {
        self.by_generation.get(&generation)?.iter().find(|r| {
            r.genome.len() == genome.len() && r.genome.iter().zip(genome).all(|(a, b)| near(*a, *b))
        })
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Summary of one finished generation (a row of `generations.csv`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationRow {
    pub generation: usize,
    pub run: usize,
    pub evals: usize,
    /// Best / mean / worst fitness of the generation's successful evaluations (NaN if none).
    pub best: f64,
    pub mean: f64,
    pub worst: f64,
    pub sigma: f64,
    pub failures: usize,
    /// Busy evaluator time over `slots ×` the generation's wall time (0–1): the seconds of the
    /// evaluations run in this process over the time the slots had. Carried over from the
    /// previous `generations.csv` for a generation answered wholly from the history; `None`
    /// (an empty cell) when unknown, as in files written before the column existed.
    #[serde(default)]
    pub utilisation: Option<f64>,
}

impl GenerationRow {
    /// Summarise `records` (one generation).
    pub fn from_records(
        generation: usize,
        run: usize,
        evals: usize,
        sigma: f64,
        records: &[Record],
    ) -> GenerationRow {
        let ok: Vec<f64> = records.iter().filter_map(|r| r.fitness).collect();
        let (best, mean, worst) = if ok.is_empty() {
            (f64::NAN, f64::NAN, f64::NAN)
        } else {
            (
                ok.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                ok.iter().sum::<f64>() / ok.len() as f64,
                ok.iter().cloned().fold(f64::INFINITY, f64::min),
            )
        };
        GenerationRow {
            generation,
            run,
            evals,
            best,
            mean,
            worst,
            sigma,
            failures: records.len() - ok.len(),
            utilisation: None,
        }
    }

    /// This row with its slot utilisation: `busy_seconds / (slots × wall_seconds)`; `None` when
    /// nothing ran (no busy time, or no wall time to divide by).
    pub fn with_utilisation(mut self, busy_seconds: f64, slots: usize, wall_seconds: f64) -> Self {
        let room = slots.max(1) as f64 * wall_seconds;
        self.utilisation =
            (busy_seconds > 0.0 && room > 0.0 && room.is_finite()).then(|| busy_seconds / room);
        self
    }
}

/// Writes `generations.csv`: the rows so far are kept and the whole file is replaced
/// atomically after each generation ([`crate::store::writer::write_atomic`]), so the file on
/// disk is always complete. Every run starts from no rows and writes the replayed generations
/// again, so the file always matches the history.
pub struct GenerationsCsv {
    path: PathBuf,
    rows: Vec<GenerationRow>,
}

impl GenerationsCsv {
    /// A writer for `out_dir/generations.csv` holding no rows yet (the file is left as it is
    /// until the first [`GenerationsCsv::write`]).
    pub fn create(out_dir: &Path) -> Result<GenerationsCsv> {
        Ok(GenerationsCsv {
            path: out_dir.join(GENERATIONS_FILE),
            rows: Vec::new(),
        })
    }

    /// Add a row and replace the file with every row so far.
    pub fn write(&mut self, row: &GenerationRow) -> Result<()> {
        self.rows.push(row.clone());
        let err = |e: csv::Error| Error::Config {
            path: self.path.clone(),
            msg: e.to_string(),
        };
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &self.rows {
            w.serialize(r).map_err(err)?;
        }
        let bytes = w.into_inner().map_err(|e| Error::Config {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        crate::store::writer::write_atomic(&self.path, &bytes)
    }
}

/// Read `out_dir/generations.csv`.
pub fn load_generations(out_dir: &Path) -> Result<Vec<GenerationRow>> {
    let path = out_dir.join(GENERATIONS_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut rows = Vec::new();
    for (i, r) in csv::Reader::from_reader(file).deserialize().enumerate() {
        rows.push(r.map_err(|e: csv::Error| Error::Config {
            path: path.clone(),
            msg: format!("row {}: {e}", i + 1),
        })?);
    }
    Ok(rows)
}

/// The best successful record: highest fitness, ties broken by the earliest generation and
/// then the genome's bits, so the choice never depends on evaluation order.
pub fn best(records: &[Record]) -> Option<&Record> {
    records
        .iter()
        .filter(|r| r.fitness.is_some())
        .min_by(|a, b| {
            let fa = a.fitness.unwrap_or(f64::NEG_INFINITY);
            let fb = b.fitness.unwrap_or(f64::NEG_INFINITY);
            fb.total_cmp(&fa)
                .then(a.generation.cmp(&b.generation))
                .then_with(|| key(0, &a.genome).1.cmp(&key(0, &b.genome).1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(generation: usize, genome: Vec<f64>, fitness: Option<f64>) -> Record {
        Record {
            run: 0,
            generation,
            index: 0,
            genome,
            recipe: "r".into(),
            fitness,
            metrics: Default::default(),
            seconds: 0.5,
            error: fitness.is_none().then(|| "boom".into()),
        }
    }

    #[test]
    fn append_load_and_cut_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let w = HistoryWriter::open(dir.path()).unwrap();
        w.append(&rec(0, vec![0.1, 0.2], Some(1.0))).unwrap();
        w.append(&rec(0, vec![0.3, 0.4], None)).unwrap();
        drop(w);
        // a kill in the middle of a write
        let p = dir.path().join(HISTORY_FILE);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"run\":0,\"genera").unwrap();
        drop(f);
        let got = load(dir.path()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].error.as_deref(), Some("boom"));
        let w = HistoryWriter::open(dir.path()).unwrap();
        w.append(&rec(1, vec![0.5, 0.6], Some(2.0))).unwrap();
        let got = load(dir.path()).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].genome, vec![0.5, 0.6]);
        let replay = Replay::new(got.clone());
        assert!(replay.get(1, &[0.5, 0.6]).is_some());
        assert!(replay.get(0, &[0.5, 0.6]).is_none());
        assert_eq!(best(&got).unwrap().fitness, Some(2.0));
    }

    #[test]
    fn generation_rows_ignore_failures() {
        let rs = vec![
            rec(3, vec![0.0], Some(1.0)),
            rec(3, vec![1.0], Some(3.0)),
            rec(3, vec![2.0], None),
        ];
        let row = GenerationRow::from_records(3, 0, 9, 0.2, &rs);
        assert_eq!(
            (row.best, row.mean, row.worst, row.failures),
            (3.0, 2.0, 1.0, 1)
        );
        assert_eq!(row.utilisation, None);
        // 6 s of evaluations in 2 s of wall time on 4 slots
        let row = row.with_utilisation(6.0, 4, 2.0);
        assert_eq!(row.utilisation, Some(0.75));
        assert_eq!(row.clone().with_utilisation(0.0, 4, 2.0).utilisation, None);
        assert_eq!(row.clone().with_utilisation(1.0, 4, 0.0).utilisation, None);
        let dir = tempfile::tempdir().unwrap();
        let mut csv = GenerationsCsv::create(dir.path()).unwrap();
        csv.write(&row).unwrap();
        let mut next = row.clone();
        next.generation = 4;
        next.utilisation = None;
        csv.write(&next).unwrap();
        let back = load_generations(dir.path()).unwrap();
        assert_eq!(back, vec![row.clone(), next]);
        let text = std::fs::read_to_string(dir.path().join(GENERATIONS_FILE)).unwrap();
        assert_eq!(
            text.lines().next(),
            Some("generation,run,evals,best,mean,worst,sigma,failures,utilisation")
        );
        assert!(
            text.ends_with(",0.75\n4,0,9,3.0,2.0,1.0,0.2,1,\n"),
            "{text}"
        );
        // a file written before the column existed still loads
        std::fs::write(
            dir.path().join(GENERATIONS_FILE),
            "generation,run,evals,best,mean,worst,sigma,failures\n3,0,9,3.0,2.0,1.0,0.2,1\n",
        )
        .unwrap();
        let old = load_generations(dir.path()).unwrap();
        assert_eq!(
            old,
            vec![GenerationRow {
                utilisation: None,
                ..row
            }]
        );
    }

    /// Every float of a record reads back with the same bits: serde_json's default parser
    /// lands 1 ULP off on about 1 in 9 random values of [0, 1) (17 significant digits), which
    /// would tell a resumed CMA-ES other fitness values than the original run was told.
    #[test]
    fn history_floats_round_trip_bit_for_bit() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let dir = tempfile::tempdir().unwrap();
        let w = HistoryWriter::open(dir.path()).unwrap();
        let mut written = Vec::new();
        for i in 0..400 {
            let mut r = rec(i / 8, (0..5).map(|_| next() * 4.0 - 2.0).collect(), None);
            r.fitness = Some(match i {
                0 => 0.1 + 0.2,
                1 => -1e12,
                2 => f64::MIN_POSITIVE,
                3 => 1.0 / 3.0,
                _ => next(),
            });
            r.error = None;
            r.metrics.insert("add/score".into(), next());
            r.seconds = next() * 100.0;
            w.append(&r).unwrap();
            written.push(r);
        }
        let back = load(dir.path()).unwrap();
        let bits = |r: &Record| {
            let mut v: Vec<u64> = r.genome.iter().map(|g| g.to_bits()).collect();
            v.push(r.fitness.unwrap().to_bits());
            v.extend(r.metrics.values().map(|m| m.to_bits()));
            v.push(r.seconds.to_bits());
            v
        };
        assert_eq!(back.len(), written.len());
        for (a, b) in written.iter().zip(&back) {
            assert_eq!(bits(a), bits(b), "{a:?} read back as {b:?}");
        }
    }
}
