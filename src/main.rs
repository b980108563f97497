//! The `evomerge` command line. `main` returns an exit code; `run` returns `anyhow::Result`, and
//! errors are printed with their whole chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use evomerge::merge::executor::{MergeOptions, merge_to_disk};
use evomerge::recipe::Recipe;
use evomerge::store::ModelSet;
use evomerge::tensor::DType;

/// Find model-merge recipes by evolution; merge models with mergekit-compatible recipes.
#[derive(Parser)]
#[command(name = "evomerge", version, about)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models with a mergekit YAML recipe and write a Hugging Face model directory.
    Merge {
        /// The recipe (mergekit YAML). Model paths are relative to the recipe's directory.
        recipe: PathBuf,
        /// Output directory (must not exist).
        out_dir: PathBuf,
        /// Seed for the random methods (DARE, DELLA).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest shard, in bytes (suffixes K, M, G accepted: 5G = 5_000_000_000).
        #[arg(long, default_value = "5G", value_parser = parse_size)]
        max_shard_size: u64,
        /// Output dtype (overrides the recipe's out_dtype / dtype).
        #[arg(long)]
        out_dtype: Option<DType>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Describe a model directory: architecture, layers, parameters, dtypes, size on disk.
    Inspect {
        /// A Hugging Face model directory.
        model_dir: PathBuf,
    },
}

/// `5000`, `5K`, `500M`, `5G` (decimal units, as mergekit's 5_000_000_000 default).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1_000,
                'M' => 1_000_000,
                'G' => 1_000_000_000,
                _ => return Err(format!("unknown size suffix `{c}` (use K, M or G)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` is not a size in bytes"))?;
    n.checked_mul(mult)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a usable shard size"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.command {
        Command::Merge {
            recipe,
            out_dir,
            seed,
            max_shard_size,
            out_dtype,
            quiet,
        } => {
            let parsed = Recipe::from_path(&recipe)?;
            let mut models = ModelSet::new();
            let options = MergeOptions {
                seed,
                out_dtype,
                max_shard_size,
                progress: !quiet,
                ..MergeOptions::default()
            };
            let out = merge_to_disk(&parsed, &mut models, &out_dir, &options)
                .with_context(|| format!("merging {}", recipe.display()))?;
            eprintln!("wrote {}", out.display());
        }
        Command::Inspect { model_dir } => {
            let summary = evomerge::store::inspect(&model_dir)?;
            print!("{summary}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
