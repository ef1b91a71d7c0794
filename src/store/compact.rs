//! `smsflow compact`: the store rewritten into a fresh one, which takes the data dir's place.
//!
//! sled writes every change to the end of its log and reuses the space it frees, but its file
//! never shrinks: a store settles at a few times its live data, and a retention pass that
//! deletes much only adds to it. A copy of the live keys alone is as small as the store can be.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{walk, Store};

/// What a compaction did.
#[derive(Debug)]
pub struct Compacted {
    /// Keys copied, over every tree.
    pub keys: u64,
    /// Bytes of the store before and after.
    pub before: u64,
    pub after: u64,
    /// Where the old store is kept, for the operator to remove.
    pub old: PathBuf,
}

/// sled's page cache for each of the two stores: every page is read or written once.
const CACHE: u64 = 32 << 20;

/// How many keys a batch of the copy carries.
const BATCH: usize = 4096;

/// Rewrites the store in `dir` into a fresh one beside it: every key of every tree, and an id
/// counter past every id the old one gave out (message ids must never repeat). The copy is
/// made durable and checked (the same keys in every tree), then the two directories are
/// swapped in one step (`renameat2` with `RENAME_EXCHANGE`): at no moment is there no store
/// at `dir`. The old store is kept beside it, as `<dir>.before-compact`, until the operator
/// removes it. Needs the data dir free (no daemon running), like any opening of it.
pub fn compact(dir: &Path) -> anyhow::Result<Compacted> {
    // Beside the directory itself, not a link to it (a rename cannot cross filesystems).
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("data dir {}", dir.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("data dir {} has no name to put beside", dir.display()))?;
    let beside = |suffix: &str| {
        let mut n = name.to_os_string();
        n.push(suffix);
        dir.with_file_name(n)
    };
    let (copy_dir, old) = (beside(".compacting"), beside(".before-compact"));
    for (path, what) in [
        (
            &copy_dir,
            "an earlier compaction was cut short: it may hold the old store",
        ),
        (&old, "the store kept by an earlier compaction"),
    ] {
        anyhow::ensure!(
            std::fs::symlink_metadata(path).is_err(),
            "{} is there ({what}); look at it, and move or remove it before compacting again",
            path.display()
        );
    }
    let store = Store::open_with_cache(dir, CACHE)?;
    let before = size_of(dir)?;
    let copied = copy(&store, &copy_dir);
    drop(store);
    let keys = match copied {
        Ok(keys) => keys,
        Err(e) => {
            // Nothing was swapped: the data dir is as it was, and the half copy goes.
            let _ = std::fs::remove_dir_all(&copy_dir);
            return Err(e);
        }
    };
    exchange(dir, &copy_dir).with_context(|| {
        format!(
            "swapping in the compacted copy ({} holds it; the data dir is as it was)",
            copy_dir.display()
        )
    })?;
    std::fs::rename(&copy_dir, &old).with_context(|| {
        format!(
            "the data dir is compacted; the old store is at {}, which could not be renamed {}",
            copy_dir.display(),
            old.display()
        )
    })?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent).and_then(|d| d.sync_all())?;
    }
    Ok(Compacted {
        keys,
        before,
        after: size_of(dir)?,
        old,
    })
}

/// Copies every tree of `from` into a new store at `to`, durably, and checks the copy.
fn copy(from: &Store, to: &Path) -> anyhow::Result<u64> {
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(to)
            .with_context(|| format!("creating {}", to.display()))?;
    }
    let fresh = sled::Config::new()
        .path(to)
        .cache_capacity(CACHE)
        .open()
        .with_context(|| format!("opening a fresh store at {}", to.display()))?;
    let mut keys = 0u64;
    let mut counts = Vec::new();
    for name in from.db.tree_names() {
        let (source, target) = (from.db.open_tree(&name)?, fresh.open_tree(&name)?);
        let mut batch = sled::Batch::default();
        let (mut in_batch, mut in_tree) = (0usize, 0u64);
        for kv in walk(&source, None) {
            let (k, v) = kv?;
            batch.insert(k, v);
            in_batch += 1;
            in_tree += 1;
            if in_batch == BATCH {
                target.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        target.apply_batch(batch)?;
        keys += in_tree;
        counts.push((name, in_tree));
    }
    // Ids handed out from now on must be past every one the old store gave (messages are
    // keyed by them): the fresh counter is taken up to the old one's next.
    let next = from.db.generate_id()?;
    while fresh.generate_id()? < next {}
    fresh.flush()?;
    drop(fresh);
    // Opened as the daemon opens it, which makes it durable as a flush does (`fdatasync` of
    // the log and any blob), and read back: the same keys in every tree.
    let copy = Store::open_with_cache(to, CACHE)?;
    copy.flush()?;
    for (name, n) in counts {
        let found = walk(&copy.db.open_tree(&name)?, None).count() as u64;
        anyhow::ensure!(
            found == n,
            "the copy of tree {} has {found} keys, not {n}: not swapped in",
            String::from_utf8_lossy(&name)
        );
    }
    Ok(keys)
}

/// Swaps two directories in one step.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("a path with a NUL byte"))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes of the files under `dir`.
fn size_of(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            size_of(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
