//! `s2lc store push|pull|ls|tag|verify|gc|rm`: the Adapter Store from the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use s2lc_store::{parse_selector, parse_versioned, Store};

use crate::ModelArg;

/// Where the store is.
#[derive(Args)]
pub struct StoreArgs {
    /// Store location: a directory or s3://bucket/prefix [default: $S2LC_STORE, else
    /// $S2LC_HOME/store].
    #[arg(long, global = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: StoreCommand,
}

/// Store subcommands.
#[derive(Subcommand)]
pub enum StoreCommand {
    /// Push a directory (a PEFT adapter, or one member of an S2LC pack with --member) as
    /// NAME@VERSION; versions are immutable.
    Push {
        /// The directory to push (a PEFT adapter or an S2LC pack).
        dir: PathBuf,
        /// NAME@MAJOR.MINOR.PATCH.
        target: String,
        /// Push only this member of the pack in DIR (its bases are shared, so stored once).
        #[arg(long)]
        member: Option<String>,
        #[command(flatten)]
        model: ModelArg,
    },
    /// Pull `NAME[@REQ]` (exact version, requirement such as ^1.2, or tag) into a directory.
    Pull {
        /// NAME, NAME@1.2.0, NAME@^1.2 or NAME@TAG.
        selector: String,
        /// Output directory.
        #[arg(short, long)]
        out: PathBuf,
        /// Skip the check that the adapter was made for the local base model.
        #[arg(long)]
        any_base: bool,
        #[command(flatten)]
        model: ModelArg,
    },
    /// Names, versions, tags and sizes, and what deduplication saves.
    Ls,
    /// Point a tag at NAME@VERSION.
    Tag {
        /// NAME@VERSION.
        target: String,
        /// The tag (e.g. prod).
        tag: String,
    },
    /// Re-hash every object and check that every version is complete; list staging files,
    /// leases and gc locks left by writers in flight or killed.
    Verify,
    /// Delete objects no version reaches (older than the grace period, not held by a push in
    /// flight), staging files of unfinished writes and expired leases.
    Gc {
        /// Keep unreachable objects and staging files younger than this many seconds.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
    /// Remove NAME@VERSION (objects stay until gc).
    Rm {
        /// NAME@VERSION.
        target: String,
    },
}

/// The base model's identity, recorded at push and checked at pull and serve.
pub use s2lc_model::digest::model_digest;

/// Opens the store at `location`, else `$S2LC_STORE`, else `$S2LC_HOME/store`.
pub fn open_store(location: Option<&str>) -> Result<Store> {
    let location = location
        .map(str::to_string)
        .or_else(|| std::env::var("S2LC_STORE").ok())
        .unwrap_or_else(|| {
            s2lc_model::assets::home()
                .join("store")
                .display()
                .to_string()
        });
    Store::open(&location).with_context(|| format!("opening the store {location}"))
}

/// Runs a store subcommand.
pub fn run(args: &StoreArgs) -> Result<()> {
    let store = open_store(args.store.as_deref())?;
    match &args.command {
        StoreCommand::Push {
            dir,
            target,
            member,
            model,
        } => {
            let (name, version) = parse_versioned(target)?;
            let base = model_digest(&model.path())?;
            let staged;
            let (src, meta) = match member {
                Some(m) => {
                    let set = s2lc_adapters::format::load(dir)
                        .with_context(|| format!("reading the pack {}", dir.display()))?;
                    staged = tempdir(&format!("push-{name}"))?;
                    s2lc_adapters::format::save_member(&set, m, &staged)
                        .with_context(|| format!("extracting member '{m}'"))?;
                    (
                        staged.clone(),
                        json!({"kind": "s2lc-pack", "member": m, "params": set.params}),
                    )
                }
                None if dir.join("pack.json").is_file() => {
                    (dir.clone(), json!({"kind": "s2lc-pack"}))
                }
                None => (dir.clone(), json!({"kind": "peft-lora"})),
            };
            let m = store
                .push(&name, &version, &src, Some(base), meta, &mut |_| Ok(()))
                .with_context(|| format!("pushing {} as {target}", dir.display()))?;
            println!(
                "pushed {name}@{version}: {} files, {} bytes",
                m.files.len(),
                m.bytes()
            );
            if member.is_some() {
                std::fs::remove_dir_all(&src).ok();
            }
        }
        StoreCommand::Pull {
            selector,
            out,
            any_base,
            model,
        } => {
            let (name, sel) = parse_selector(selector)?;
            let base = if *any_base {
                None
            } else {
                Some(model_digest(&model.path())?)
            };
            let m = store
                .pull(&name, &sel, out, base.as_deref())
                .with_context(|| format!("pulling {selector}"))?;
            println!(
                "pulled {}@{} into {}: {} files, {} bytes",
                m.name,
                m.version,
                out.display(),
                m.files.len(),
                m.bytes()
            );
        }
        StoreCommand::Ls => {
            let list = store.list()?;
            println!("{:<24} {:>10} {:>12}  tags", "name", "version", "bytes");
            for l in &list {
                println!(
                    "{:<24} {:>10} {:>12}  {}",
                    l.name,
                    l.version.to_string(),
                    l.bytes,
                    l.tags.join(",")
                );
            }
            let (logical, physical) = store.usage()?;
            println!(
                "{} versions; {logical} bytes referenced, {physical} bytes stored (dedup saves {:.1} %)",
                list.len(),
                if logical > 0 {
                    100.0 * (1.0 - physical as f64 / logical as f64)
                } else {
                    0.0
                }
            );
        }
        StoreCommand::Tag { target, tag } => {
            let (name, version) = parse_versioned(target)?;
            store.tag(&name, &version, tag)?;
            println!("{name}@{tag} -> {version}");
        }
        StoreCommand::Verify => {
            let r = store.verify()?;
            for p in &r.problems {
                println!("problem: {p}");
            }
            for l in &r.leftovers {
                println!("note: {l}");
            }
            println!(
                "{} objects checked, {} problems",
                r.checked,
                r.problems.len()
            );
            if !r.problems.is_empty() {
                anyhow::bail!(
                    "the store at {} has {} problems",
                    store.location(),
                    r.problems.len()
                );
            }
        }
        StoreCommand::Gc { grace_secs } => {
            let r = store.gc(Duration::from_secs(*grace_secs))?;
            println!(
                "removed {} objects, {} staging files of unfinished writes and {} expired leases \
                 ({} bytes); kept {} unreachable objects younger than {grace_secs} s and {} that \
                 pushes in flight hold",
                r.removed, r.staging, r.expired, r.freed, r.young, r.leased
            );
        }
        StoreCommand::Rm { target } => {
            let (name, version) = parse_versioned(target)?;
            store.remove(&name, &version)?;
            println!("removed {name}@{version} (run gc to free its objects)");
        }
    }
    Ok(())
}

/// A fresh temporary directory.
fn tempdir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("s2lc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
