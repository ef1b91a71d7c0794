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
    /// Bytes of the store before, and of its copy.
    pub before: u64,
    pub after: u64,
    /// Where the old store is kept, for the operator to remove; `None` when the copy was
    /// no smaller, and so not swapped in (the store is as it was, and the copy gone).
    pub old: Option<PathBuf>,
    /// What went wrong after the swap, which stands all the same.
    pub notes: Vec<String>,
}

/// sled's page cache for each of the two stores: every page is read or written once.
const CACHE: u64 = 32 << 20;

/// How many keys a batch of the copy carries.
const BATCH: usize = 4096;

/// Written into the copy once it is checked, and removed after the swap: a leftover
/// `<dir>.compacting` is the old store when the data dir has it, an unfinished copy otherwise.
const CHECKED: &str = ".smsflow-compacted-copy";

/// Rewrites the store in `dir` into a fresh one beside it: every key of every tree, and an id
/// counter past every id the old one gave out (message ids must never repeat). The copy is
/// made durable and checked (as many keys in every tree), then, if it is smaller, the two
/// directories are swapped in one step (`renameat2` with `RENAME_EXCHANGE`): at no moment is
/// there no store at `dir`. The old store is kept beside it, as `<dir>.before-compact`,
/// until the operator removes it. Needs the data dir free (no daemon running), like any
/// opening of it, and held through the swap.
pub fn compact(dir: &Path) -> anyhow::Result<Compacted> {
    use std::os::unix::fs::MetadataExt;
    // Beside the directory itself, not a link to it (a rename cannot cross filesystems).
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("data dir {}", dir.display()))?;
    let (name, parent) = match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) => (name, parent),
        _ => anyhow::bail!(
            "data dir {} has no directory to put a copy beside",
            dir.display()
        ),
    };
    let beside = |suffix: &str| {
        let mut n = name.to_os_string();
        n.push(suffix);
        parent.join(n)
    };
    let (copy_dir, old) = (beside(".compacting"), beside(".before-compact"));
    // A shell in the data dir would be left in the old store by the swap, and a daemon
    // started from it would write where the operator is told to remove.
    if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) {
        anyhow::ensure!(
            !cwd.starts_with(dir),
            "the working directory is in the data dir {}: after the swap it would be in the old \
             store; run this from outside it (its parent, say)",
            dir.display()
        );
    }
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    anyhow::ensure!(
        meta.uid() == me,
        "the data dir {} belongs to user {}, not to this one ({me}): the copy would be this \
         user's, and the daemon could not open it; run as the daemon's user (sudo -u …)",
        dir.display(),
        meta.uid()
    );
    let mounted = std::fs::metadata(parent)?.dev() != meta.dev()
        || matches!((mount_id(dir), mount_id(parent)), (Some(a), Some(b)) if a != b);
    anyhow::ensure!(
        !mounted,
        "the data dir {} is a mount point (another filesystem or mount than {}): a copy \
         beside it could not be swapped in; keep the store in a directory inside the volume",
        dir.display(),
        parent.display()
    );
    anyhow::ensure!(
        writable(parent),
        "{} is not writable by this user: the copy is made beside the data dir, in it",
        parent.display()
    );
    let swapped_before = dir.join(CHECKED).exists();
    if std::fs::symlink_metadata(&copy_dir).is_ok() {
        anyhow::ensure!(
            !swapped_before,
            "an earlier compaction swapped in its copy but stopped before renaming the old \
             store: {} holds the old store (the data dir is the compacted one); rename it {} \
             or remove it, then run again",
            copy_dir.display(),
            old.display()
        );
        // An unfinished copy: never the live store, nor the only old one.
        std::fs::remove_dir_all(&copy_dir)
            .with_context(|| format!("removing an unfinished copy, {}", copy_dir.display()))?;
    } else if swapped_before {
        std::fs::remove_file(dir.join(CHECKED))?;
    }
    anyhow::ensure!(
        std::fs::symlink_metadata(&old).is_err(),
        "{} is there (the store kept by an earlier compaction); look at it, and move or remove \
         it before compacting again",
        old.display()
    );
    let store = Store::open_with_cache(dir, CACHE)?;
    let before = size_of(dir)?;
    let copied = copy(&store, &copy_dir, meta.mode());
    drop(store);
    // The data dir held again at once, through the swap, with sled's own lock (a flock of
    // its log file): a daemon started meanwhile would write into what becomes the old store.
    let held = patiently(|| lock(&dir.join("db")), |_| true);
    let give_up = |e: anyhow::Error| {
        let _ = std::fs::remove_dir_all(&copy_dir);
        Err(e.context("the data dir is as it was"))
    };
    let (keys, held_lock) = match (copied, held) {
        (Ok(keys), Ok(file)) => (keys, file),
        (Err(e), _) => return give_up(e),
        (_, Err(e)) => return give_up(anyhow::anyhow!("another process took the data dir: {e}")),
    };
    let after = size_of(&copy_dir)?;
    if after >= before {
        let _ = std::fs::remove_dir_all(&copy_dir);
        return Ok(Compacted {
            keys,
            before,
            after,
            old: None,
            notes: Vec::new(),
        });
    }
    if let Err(e) = exchange(dir, &copy_dir) {
        return give_up(anyhow::anyhow!("swapping in the compacted copy: {e}"));
    }
    // The data dir is compacted: what fails from here is said, and stands.
    let mut notes = Vec::new();
    let kept = match std::fs::rename(&copy_dir, &old) {
        Ok(()) => {
            // (Kept otherwise: it tells the next run that `.compacting` is the old store.)
            if let Err(e) = std::fs::remove_file(dir.join(CHECKED)) {
                let marker = dir.join(CHECKED);
                notes.push(format!("{} could not be removed: {e}", marker.display()));
            }
            old
        }
        Err(e) => {
            let told = format!("the old store could not be renamed {}: {e}", old.display());
            notes.push(told);
            copy_dir
        }
    };
    if let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all()) {
        notes.push(format!("{} could not be synced: {e}", parent.display()));
    }
    // A daemon that opened the old store's log just before the swap takes its lock within
    // moments: held a second more, it finds it taken and stops, before sled writes anything
    // by name into the new store. (One slower still is refused by `Store::open`.)
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(held_lock);
    Ok(Compacted {
        keys,
        before,
        after,
        old: Some(kept),
        notes,
    })
}

/// `attempt` again, for up to 2 s, while it fails as `passing` says may pass: sled lets go of
/// a store's lock when its deferred cleanup runs, which can lag a moment behind the drop, and
/// this process drops a store and takes its lock (or opens it) again.
fn patiently<T>(
    mut attempt: impl FnMut() -> anyhow::Result<T>,
    passing: impl Fn(&anyhow::Error) -> bool,
) -> anyhow::Result<T> {
    let mut got = attempt();
    for _ in 0..40 {
        match &got {
            Err(e) if passing(e) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                got = attempt();
            }
            _ => break,
        }
    }
    got
}

/// The id of the mount `path` is on (`statx`), to tell a bind mount from its parent; `None`
/// where the kernel does not say.
fn mount_id(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path, and a buffer of the type the call fills.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let done = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut buf) };
    (done == 0 && buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id)
}

/// Whether this user may create entries in `dir`.
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(dir.as_os_str().as_bytes())
        // SAFETY: a valid NUL-terminated path.
        .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0)
}

/// Takes sled's lock on a store's log file (a `flock`), held while the file stays open.
pub(super) fn lock(log: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(log)?;
    // SAFETY: a valid open descriptor.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked == 0 {
        Ok(file)
    } else {
        Err(std::io::Error::last_os_error().into())
    }
}

/// Copies every tree of `from` into a new store at `to`, durably, and checks the copy.
fn copy(from: &Store, to: &Path, mode: u32) -> anyhow::Result<u64> {
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    {
        // As private as the data dir (700 unless the operator chose otherwise).
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(mode & 0o7777);
        std::fs::set_permissions(to, mode).with_context(|| format!("{}", to.display()))?;
    }
    let copied = copy_into(from, to);
    copied.with_context(|| format!("copying the store into {}", to.display()))
}

fn copy_into(from: &Store, to: &Path) -> anyhow::Result<u64> {
    let fresh = sled::Config::new()
        .path(to)
        .cache_capacity(CACHE)
        .open()
        .with_context(|| format!("opening a fresh store at {}", to.display()))?;
    let said = |e: sled::Error| anyhow::anyhow!("{}", super::io_text(&e));
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
                target
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(said)?;
                in_batch = 0;
            }
        }
        target.apply_batch(batch).map_err(said)?;
        keys += in_tree;
        counts.push((name, in_tree));
    }
    // Ids handed out from now on must be past every one the old store gave (messages are
    // keyed by them): the fresh counter is taken up to the old one's next.
    let next = from.db.generate_id()?;
    while fresh.generate_id()? < next {}
    fresh.flush().map_err(said)?;
    drop(fresh);
    // Opened as the daemon opens it, which makes it durable as a flush does (`fdatasync` of
    // the log and any blob), and read back: the same keys in every tree.
    let copy = patiently(
        || Store::open_with_cache(to, CACHE),
        |e| e.downcast_ref::<super::DataDirInUse>().is_some(),
    )?;
    copy.flush()?;
    for (name, n) in counts {
        let found = walk(&copy.db.open_tree(&name)?, None).count() as u64;
        anyhow::ensure!(
            found == n,
            "the copy of tree {} has {found} keys, not {n}: not swapped in",
            String::from_utf8_lossy(&name)
        );
    }
    drop(copy);
    // Checked: marked so (see `CHECKED`), durably.
    let marker = std::fs::File::create(to.join(CHECKED))?;
    marker.sync_all()?;
    std::fs::File::open(to)?.sync_all()?;
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
