//! Inputs: lists of files, their one-blob encoding, and the saving of the input being run
//! when the allocator or the hang watchdog stops the process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::heap::HARD_CAP;

/// An input: one or more files.
pub type Input = Vec<Vec<u8>>;

/// An input as one blob: `S2LCFUZZ`, a u32 count, then each file as a u32 length and its bytes.
pub fn encode(input: &Input) -> Vec<u8> {
    let mut out = b"S2LCFUZZ".to_vec();
    out.extend((input.len() as u32).to_le_bytes());
    for f in input {
        out.extend((f.len() as u32).to_le_bytes());
        out.extend(f);
    }
    out
}

/// The input of a blob written by [`encode`].
pub fn decode(blob: &[u8]) -> Option<Input> {
    let mut rest = blob.strip_prefix(b"S2LCFUZZ")?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = rest.split_at_checked(n)?;
        rest = b;
        Some(a)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut files = Vec::new();
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        files.push(take(len)?.to_vec());
    }
    Some(files)
}

/// The input being run (encoded), its target's name, and where findings go: what the allocator
/// and the hang watchdog save before they abort.
pub(super) static CURRENT: Mutex<Option<(String, Vec<u8>)>> = Mutex::new(None);
static SAVING: AtomicBool = AtomicBool::new(false);

/// Where findings are written: `$S2LC_FUZZ_OUT`, else `target/fuzz-findings`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("S2LC_FUZZ_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-findings"))
}

/// Saves the current input as `{kind}-{detail}.bin` (without allocating much: called from the
/// allocator, once).
pub(super) fn save_current(kind: &str, detail: usize) {
    if SAVING.swap(true, Ordering::SeqCst) {
        return;
    }
    HARD_CAP.store(0, Ordering::SeqCst);
    if let Ok(guard) = CURRENT.try_lock() {
        if let Some((target, blob)) = guard.as_ref() {
            let dir = out_dir().join(target);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{kind}-{detail}.bin"));
            if let Ok(mut f) = std::fs::File::create(&path) {
                let _ = f.write_all(blob);
            }
            eprintln!(
                "fuzz {target}: {kind} ({detail}); input saved to {}",
                path.display()
            );
        }
    }
}
