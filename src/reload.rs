//! Flow hot reload: a change to the flow directory (watched with `notify`), SIGHUP or
//! `POST /admin/reload` loads the set again; a valid set is swapped in atomically, an invalid
//! one is logged with every problem and the live set stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::engine::Engine;
use crate::flows::{self, Flows, Problems};
use crate::machine::{lost_place, Event, Outcome};
use crate::phone::Phone;
use crate::store::Listed;

/// The watcher's first look again after the flow files could not be read, and the longest
/// wait between looks (each failure doubles it).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// How long flow files that would end sequences must stay as they are before the watcher
/// makes them live: a file caught half-written may parse (a prefix that stops before a
/// `[[sequence]]`), and ending a number's sequence cannot be undone.
const SETTLE: Duration = Duration::from_secs(3);

/// Sleeps until `at`, or for ever when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The watches on the flow directory. Any change in it may change what it holds (a
/// Kubernetes ConfigMap swaps a `..data` symlink, which no `.toml` event announces): what was
/// read last decides whether anything changed.
///
/// A watch follows the directory it was set on, not its path: a directory replaced (`rm -rf`
/// and a copy, a `mv`) or a link on the way to it pointed elsewhere (a release switch) would
/// leave it on the old one, and later edits unheard. So the parent is watched too, for the
/// name; and the watches are set again on what the path leads to now once an event names it,
/// or once it resolves (links followed) to another directory than before, which
/// [`Watches::stale`] tells (a link further up the path changes with no event here).
struct Watches {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<()>,
    /// On the directory, while it is there (dropping a watcher ends its watch).
    on_dir: Option<notify::RecommendedWatcher>,
    /// On its parent, for events of its name only.
    on_parent: Option<notify::RecommendedWatcher>,
    /// Where the path led (every link followed) when the watches were set.
    resolved: Option<PathBuf>,
    /// An event of the name, of the directory itself, or a lost one (the kernel's queue
    /// overflowed) came since the watches were set.
    moved: Arc<AtomicBool>,
}

impl Watches {
    /// `None` (logged) when the directory cannot be watched at all.
    fn start(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<Watches> {
        let abs = std::path::absolute(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .components()
            .collect::<PathBuf>();
        let mut w = Watches {
            dir: abs,
            tx,
            on_dir: None,
            on_parent: None,
            resolved: None,
            moved: Arc::new(AtomicBool::new(false)),
        };
        if let Err(e) = w.set() {
            tracing::error!(
                "cannot watch {}: {e}; use SIGHUP or POST /admin/reload",
                dir.display()
            );
            return None;
        }
        if w.on_parent.is_none() {
            tracing::warn!(
                "cannot watch the directory that holds {}: a flow directory replaced is not \
                 noticed at once; use SIGHUP or POST /admin/reload then",
                dir.display()
            );
        }
        Some(w)
    }

    /// A watcher that wakes the loop for every change it hears (`every`: the directory's),
    /// or for events of the directory's own name only (its parent's). Those, and a lost
    /// event (the kernel's queue overflowed), are noted as a move. (Matched by name: some
    /// systems report paths with their links resolved.)
    fn watcher(&self, every: bool) -> notify::Result<notify::RecommendedWatcher> {
        let (tx, moved, name) = (self.tx.clone(), self.moved.clone(), self.name());
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(e) = event else { return };
            if matches!(e.kind, notify::EventKind::Access(_)) {
                return;
            }
            let named = e.need_rescan() || e.paths.iter().any(|p| p.file_name() == name.as_deref());
            if named {
                moved.store(true, Ordering::SeqCst);
            }
            if every || named {
                let _ = tx.send(());
            }
        })
    }

    fn name(&self) -> Option<std::ffi::OsString> {
        self.dir.file_name().map(ToOwned::to_owned)
    }

    /// Sets both watches on what the path leads to now.
    fn set(&mut self) -> notify::Result<()> {
        self.moved.store(false, Ordering::SeqCst);
        self.resolved = std::fs::canonicalize(&self.dir).ok();
        (self.on_dir, self.on_parent) = (None, None);
        // The parent first: while the directory is gone, it tells when it is back.
        if let Some(parent) = self.dir.parent() {
            self.on_parent = self
                .watcher(false)
                .and_then(|mut w| w.watch(parent, RecursiveMode::NonRecursive).map(|()| w))
                .map_err(|e| tracing::debug!("cannot watch {}: {e}", parent.display()))
                .ok();
        }
        let mut on_dir = self.watcher(true)?;
        on_dir.watch(&self.dir, RecursiveMode::NonRecursive)?;
        self.on_dir = Some(on_dir);
        Ok(())
    }

    /// Whether the path now resolves to another directory than the watches are on.
    fn stale(&self) -> bool {
        std::fs::canonicalize(&self.dir).ok() != self.resolved
    }

    /// Sets the watches again if something happened to the path. While it is gone, the
    /// parent's watch tells when it is back.
    fn follow_the_name(&mut self) {
        if self.moved.load(Ordering::SeqCst) || self.on_dir.is_none() || self.stale() {
            if let Err(e) = self.set() {
                // Tried again at the next event or look.
                self.on_dir = None;
                tracing::debug!("cannot watch {} now: {e}", self.dir.display());
            }
        }
    }
}

pub struct Reloader {
    engine: Arc<Engine>,
    dir: PathBuf,
    /// One reload at a time (the watcher, SIGHUP and the admin API may fire together), so
    /// each compares the new flows with the ones it actually replaces.
    serial: std::sync::Mutex<()>,
    /// The daemon is stopping: a pass after a reload gives up.
    stop: watch::Receiver<bool>,
    /// The flow files as the last look read them (`None`: they could not be read). The
    /// watcher loads only when what it reads differs from them and from the live flows' own
    /// files (it hears every change in the directory, editors' swap files included).
    last_read: std::sync::Mutex<Option<Sources>>,
    /// Flow files the watcher read that would end sequences (see [`SETTLE`]), and since when
    /// they have been as they are.
    unsettled: std::sync::Mutex<Option<(Sources, tokio::time::Instant)>>,
    /// How the last reload went, for `/readyz`.
    last_reload: std::sync::Mutex<Option<LastReload>>,
    /// Reloads that made a new set live, and reloads refused, for `/metrics`: this daemon's
    /// own (a process-wide counter would mix in every other daemon a test process runs).
    swapped: AtomicU64,
    refused: AtomicU64,
}

/// The outcome of the last reload (by any trigger).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastReload {
    pub ok: bool,
    /// Written as every other time the API shows (RFC 3339, `+00:00`).
    #[serde(serialize_with = "rfc3339")]
    pub at: chrono::DateTime<chrono::Utc>,
    pub trigger: String,
    /// How many problems kept the new flows out (0 when `ok`).
    pub problems: usize,
}

fn rfc3339<S: serde::Serializer>(
    at: &chrono::DateTime<chrono::Utc>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&at.to_rfc3339())
}

type Sources = Vec<(PathBuf, String)>;

/// What a look at the flow files did.
struct Look {
    /// The load's outcome; `None` when nothing was loaded (the files had not changed).
    done: Option<Result<String, Problems>>,
    /// The files could not be read (worth looking again: see [`Reloader::watch`]).
    unreadable: bool,
    /// They would end sequences, and are looked at again then (see [`SETTLE`]).
    settle_at: Option<tokio::time::Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Always,
    IfChanged,
}

impl Reloader {
    pub fn new(engine: Arc<Engine>, dir: PathBuf, stop: watch::Receiver<bool>) -> Reloader {
        let live = engine.flows().sources().to_vec();
        Reloader {
            engine,
            serial: std::sync::Mutex::new(()),
            stop,
            last_read: std::sync::Mutex::new(Some(live)),
            unsettled: std::sync::Mutex::new(None),
            last_reload: std::sync::Mutex::new(None),
            swapped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dir,
        }
    }

    /// Reloads so far: (made live, refused).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.swapped.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        )
    }

    /// Reads the flow files and loads them, unless `when` allows skipping files that are the
    /// ones read last or the live flows' own.
    fn load(&self, why: &str, when: Load) -> Look {
        let _one_at_a_time = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let read = flows::read_dir(&self.dir);
        {
            let mut last_read = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
            let (seen, live) = match &read {
                Ok(now) => (
                    last_read.as_ref() == Some(now),
                    self.engine.flows().sources() == now.as_slice(),
                ),
                Err(_) => (false, false),
            };
            *last_read = read.as_ref().ok().cloned();
            if seen || live {
                // Back to settled files: what was waiting to settle is no more.
                *self.unsettled.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            if when == Load::IfChanged && (seen || live) {
                if live && !seen {
                    // Back to what is live (an edit undone, a file caught mid-write saved).
                    tracing::info!(trigger = why, "the flow files are the live flows' again");
                    self.record(why, true, 0);
                }
                return Look {
                    done: None,
                    unreadable: false,
                    settle_at: None,
                };
            }
        }
        let unreadable = read
            .as_ref()
            .err()
            .is_some_and(|p| p.0.iter().any(may_heal));
        let sources = read.as_ref().ok().cloned();
        let loaded = read.and_then(flows::load_sources);
        // The watcher's look at files that would end sequences waits until they have stayed
        // as they are for a while (an operator's reload does not: they asked for these).
        if let (Load::IfChanged, Ok(f), Some(sources)) = (when, &loaded, sources) {
            if f.removed_places_of(&self.engine.flows().places()) {
                let mut unsettled = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                let since = match unsettled.take() {
                    Some((read, since)) if read == sources => since,
                    _ => now,
                };
                if now < since + SETTLE {
                    if since == now {
                        tracing::info!(
                            trigger = why,
                            "the flow files would end sequences numbers are in; they go live if \
                             they stay as they are for {} (a file may be half-written)",
                            humantime::format_duration(SETTLE)
                        );
                    }
                    *unsettled = Some((sources, since));
                    // Read afresh next time, not passed over as seen.
                    *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Look {
                        done: None,
                        unreadable: false,
                        settle_at: Some(since + SETTLE),
                    };
                }
            }
        }
        *self.unsettled.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let done = self.apply(why, loaded);
        Look {
            done: Some(done),
            unreadable,
            settle_at: None,
        }
    }

    fn record(&self, why: &str, ok: bool, problems: usize) {
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastReload {
            ok,
            at: self.engine.clock().now(),
            trigger: why.to_string(),
            problems,
        });
    }

    /// How the last reload since the start went; `None` before the first.
    pub fn last_reload(&self) -> Option<LastReload> {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes a loaded set live, or reports why it is not; logs and counts either way.
    fn apply(&self, why: &str, loaded: Result<Flows, Problems>) -> Result<String, Problems> {
        let problems = loaded.as_ref().err().map_or(0, |p| p.0.len());
        let done = self.swap(why, loaded);
        // Recorded once the outcome holds (a new set is live by now).
        self.record(why, done.is_ok(), problems);
        done
    }

    fn swap(&self, why: &str, loaded: Result<Flows, Problems>) -> Result<String, Problems> {
        match loaded {
            Ok(f) => {
                let summary = f.summary();
                let warnings: Vec<String> = f.warnings().iter().map(|w| w.to_string()).collect();
                let live = self.engine.flows();
                let before: Vec<String> = live.form.all_keys().map(str::to_string).collect();
                let fields = field_warnings(&before, &f);
                let shrunk = f.removed_places_of(&live.places());
                // A file gone (deleted, renamed away) takes its tables with it: whatever it
                // set goes back to the defaults, which passes `check` but is seldom meant.
                // (A file renamed, its text unchanged, is not gone.)
                let gone: Vec<String> = live
                    .sources()
                    .iter()
                    .filter(|(path, text)| !f.sources().iter().any(|(p, t)| p == path || t == text))
                    .map(|(path, _)| path.display().to_string())
                    .collect();
                drop(live);
                {
                    let _places = PLACES.lock().unwrap_or_else(|e| e.into_inner());
                    // On record first: a crash between the two must not leave live places
                    // a start would not know to look for.
                    remember_places(&self.engine, &f, false);
                    remember_fields(&self.engine, &f);
                    // Counted first: whoever meets the new flows finds the reload counted.
                    self.swapped.fetch_add(1, Ordering::SeqCst);
                    self.engine.set_flows(f);
                }
                tracing::info!(trigger = why, "flows reloaded: {summary}");
                for w in &warnings {
                    tracing::warn!(trigger = why, "flows: {w}");
                }
                for w in &fields {
                    tracing::warn!(trigger = why, "{w}");
                }
                if !gone.is_empty() {
                    tracing::warn!(
                        trigger = why,
                        "the flows now live have no {}: what it set is back to its defaults",
                        gone.join(", ")
                    );
                }
                if shrunk {
                    end_lost_places(&self.engine, self.stop.clone());
                }
                Ok(summary)
            }
            Err(p) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                // The trigger in the text: a field would be printed after the last problem,
                // as if it were part of it.
                tracing::error!(
                    "flow reload ({why}) failed; the previous flows stay live, but a restart would \
                     refuse these: fix them first. {} problem(s):\n{p}",
                    p.0.len()
                );
                Err(p)
            }
        }
    }

    /// Loads the flow directory; on success the new set is live. Returns its summary. On a
    /// blocking thread: it reads the flow directory, and waits for a reload already under
    /// way, neither of which belongs on the runtime's few workers.
    pub async fn reload_blocking(self: &Arc<Self>, why: &'static str) -> Result<String, Problems> {
        // `Load::Always` always loads; the live flows' summary stands in all the same.
        (self.load_blocking(why, Load::Always).await.done)
            .unwrap_or_else(|| Ok(self.engine.flows().summary()))
    }

    async fn load_blocking(self: &Arc<Self>, why: &'static str, when: Load) -> Look {
        let me = self.clone();
        let swaps = self.engine.flow_swaps();
        match tokio::task::spawn_blocking(move || me.load(why, when)).await {
            Ok(look) => look,
            // It stopped after the new set went live (and was counted): live it stays.
            Err(e) if self.engine.flow_swaps() != swaps => {
                tracing::error!(
                    trigger = why,
                    "the reload stopped after the new flows went live: {e}"
                );
                self.record(why, true, 0);
                Look {
                    done: Some(Ok(self.engine.flows().summary())),
                    unreadable: false,
                    settle_at: None,
                }
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                self.record(why, false, 1);
                Look {
                    done: Some(Err(Problems(vec![flows::Problem {
                        file: self.dir.clone(),
                        line: 0,
                        col: 0,
                        message: format!("the reload stopped: {e}"),
                    }]))),
                    unreadable: false,
                    settle_at: None,
                }
            }
        }
    }

    /// Watches the flow directory until `stop`; edits settle for a moment before a reload.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>, path_check: Duration) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        // What changed between the start's read and the watch is looked at like any change
        // (an editor may be writing it this moment: it settles first).
        let _ = tx.send(());
        let Some(mut watches) = Watches::start(&self.dir, tx) else {
            return;
        };
        // A look that could not read the files (a link whose target is not there yet, a file
        // being replaced, a permission being fixed) is tried again, backing off, since the
        // fix may come with no event in this directory (a link's target lives elsewhere).
        let mut backoff = RETRY_FIRST;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut settle_at: Option<tokio::time::Instant> = None;
        let mut path_check =
            tokio::time::interval_at(tokio::time::Instant::now() + path_check, path_check);
        path_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // An editor's save is several events: wait until they stop for a moment,
                    // but not for ever (a file written all the time may share the directory).
                    let latest = tokio::time::Instant::now() + Duration::from_secs(2);
                    loop {
                        let quiet = (tokio::time::Instant::now() + Duration::from_millis(250)).min(latest);
                        tokio::select! {
                            more = rx.recv() => if more.is_none() { return },
                            _ = tokio::time::sleep_until(quiet) => break,
                            _ = stop.changed() => return,
                        }
                    }
                    // A change starts the backoff afresh.
                    backoff = RETRY_FIRST;
                    "file change"
                }
                _ = sleep_until_some(retry_at) => "retry after a read error",
                _ = sleep_until_some(settle_at) => "file change (settled)",
                // A link further up the path switched, or a linked flow file's target was
                // edited (it lives elsewhere): no event here says so. A look finds out.
                _ = path_check.tick() => {
                    if watches.stale() {
                        "the flow directory's path leads elsewhere"
                    } else {
                        "a periodic look (a linked file may have changed)"
                    }
                }
                _ = stop.changed() => return,
            };
            // Before the look: a change made while the watch is set again is read by it.
            watches.follow_the_name();
            let look = self.load_blocking(why, Load::IfChanged).await;
            settle_at = look.settle_at;
            if look.unreadable {
                tracing::warn!(
                    "could not read the flow files in {}; looking again in {}",
                    self.dir.display(),
                    humantime::format_duration(backoff)
                );
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
            } else {
                retry_at = None;
                backoff = RETRY_FIRST;
            }
        }
    }

    /// Reloads on SIGHUP until `stop`.
    pub async fn on_sighup(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        let _ = self.reload_blocking("SIGHUP").await;
                    }
                    _ = stop.changed() => return,
                }
            }
        }
        #[cfg(not(unix))]
        let _ = stop.changed().await;
    }
}

/// What changed in the form's fields from `before` (the keys of the flows live until now) to
/// `f`, as warnings for the operator.
pub fn field_warnings(before: &[String], f: &Flows) -> Vec<String> {
    let mut out = Vec::new();
    // A form question added, for a field not declared before: a number past the form is not
    // asked it (until it edits its answers), so a text naming its field shows nothing there
    // for that number.
    let added: Vec<&str> = (f.form.fields.iter())
        .map(|x| x.key.as_str())
        .filter(|k| !before.iter().any(|b| b == k))
        .collect();
    if !added.is_empty() {
        out.push(format!(
            "the form now asks {} as well: numbers already past the form are not asked it \
             (until they EDIT), and a text naming it shows nothing in its place for them",
            added.join(", ")
        ));
    }
    // A form field no longer declared (renamed, removed): its answers stay in each number's
    // record, but leave the export, which has a column per field.
    let dropped: Vec<&str> = (before.iter())
        .map(String::as_str)
        .filter(|k| !f.form.all_keys().any(|n| n == *k))
        .collect();
    if !dropped.is_empty() {
        out.push(format!(
            "the flows now live no longer declare the field(s) {}: the answers saved under \
             them stay in each number's record (GET /admin/subscribers/{{phone}}) but are not \
             in the export; declare them again (in form.extra_fields, if no longer asked) to \
             export them",
            dropped.join(", ")
        ));
    }
    out
}

/// Records the form's fields of flows now live, which the next start compares with the
/// flows it loads ([`field_warnings`]).
pub fn remember_fields(engine: &Engine, flows: &Flows) {
    let fields: Vec<String> = flows.form.all_keys().map(str::to_string).collect();
    if let Err(e) = engine.store.set_flows_fields(&fields) {
        tracing::error!("recording the flows' fields: {e:#}");
    }
}

/// Held while the live flows change together with the places on record, and while a sweep
/// checks that its flows are still live and narrows the record to them. (One for the process:
/// held for a read and a write of one key, rarely.)
static PLACES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Records the flows' places (sequences and their steps), which the next start compares
/// with the flows it loads to tell whether an edit made while stopped removed any. Unless
/// `narrow` (the sweep for exactly these flows finished), what was recorded before is kept
/// too: a place stays on record until a finished sweep shows no number holds it, so a sweep
/// cut short by a stop or a crash is done again at the next start.
pub fn remember_places(engine: &Engine, flows: &Flows, narrow: bool) {
    let mut places = flows.places();
    if !narrow {
        match engine.store.flows_places() {
            // Nothing on record means "sweep at the next start": that stays so until a sweep
            // is done (a first start's sweep may still be running).
            Ok(None) => return,
            Ok(Some(before)) => {
                for p in before {
                    if !places.contains(&p) {
                        places.push(p);
                    }
                }
            }
            // Keep what is on record: at worst the next start sweeps once more.
            Err(e) => return tracing::error!("reading the flows' places: {e:#}"),
        }
    }
    if let Err(e) = engine.store.set_flows_places(&places) {
        tracing::error!("recording the flows' places: {e:#}");
    }
}

/// Ends, in the background, the sequence of every number whose place the live flows no
/// longer have (after a reload, or a start with flows edited while stopped), so the admin
/// API, the export and the metrics show them `verified` at once rather than when their next
/// timer or text arrives. It gives up when `stop` turns true, so a stopping daemon does not
/// wait for it. Only when it finished, with those flows still live, are the places on record
/// narrowed to theirs.
pub fn end_lost_places(
    engine: &Arc<Engine>,
    stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let engine = engine.clone();
    Some(runtime.spawn(async move {
        // A batch the writer began stepping with the old flows may still commit a number into
        // a removed place; it is done once a flush queued now is. (The scan goes on even if
        // that flush fails: it reads what is committed.)
        if let Err(e) = engine.durable().await {
            tracing::warn!("after a flow change, waiting for the writer: {e:#}");
        }
        let swept = engine.flows();
        let (scan, flows, stopping) = (engine.clone(), swept.clone(), stop.clone());
        let lost = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<Phone>>> {
            let mut lost = Vec::new();
            for (n, s) in scan.store.subscribers_after(None).enumerate() {
                if n % 1024 == 0 && *stopping.borrow() {
                    return Ok(None);
                }
                match s? {
                    Listed::Readable(s) if lost_place(&s.state, &flows).is_some() => {
                        lost.push(s.phone)
                    }
                    Listed::Readable(_) => {}
                    // One unreadable record must not keep the others in a removed place.
                    Listed::Unreadable { key, error } => tracing::warn!(
                        "after a flow change, skipping the record of {}: {error}",
                        Listed::masked_key(&key)
                    ),
                }
            }
            Ok(Some(lost))
        })
        .await;
        let lost = match lost {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return tracing::error!("after a flow change, reading subscribers: {e:#}"),
            Err(e) => return tracing::error!("after a flow change, the scan stopped: {e}"),
        };
        // The machine checks again against the flows live when each event runs. Up to
        // 64 at a time, so the writer commits them in shared batches.
        let (mut ended, mut failed) = (0usize, 0usize);
        for chunk in lost.chunks(64) {
            if *stop.borrow() {
                return;
            }
            let mut events = tokio::task::JoinSet::new();
            for phone in chunk {
                let (engine, phone) = (engine.clone(), phone.clone());
                events.spawn(async move {
                    let done = engine.event(&phone, Event::FlowsChanged).await;
                    (phone, done)
                });
            }
            while let Some(joined) = events.join_next().await {
                match joined {
                    Ok((_, Ok(a))) if a.outcome != Outcome::Ignored => ended += 1,
                    Ok((_, Ok(_))) => {}
                    Ok((phone, Err(e))) => {
                        failed += 1;
                        tracing::error!(phone = %phone.masked(), "ending a removed sequence: {e:#}");
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::error!("ending a removed sequence: {e}");
                    }
                }
            }
        }
        if ended > 0 {
            // A warning: it cannot be undone by restoring the flows (a sequence moved to
            // another file in two saves ends it for everyone in it).
            tracing::warn!("the flows no longer have the place of {ended} number(s) in a sequence; their sequence ended (restoring the flows does not restart it)");
        }
        // Checked and written under the lock a reload swaps under: else a reload between the
        // two would have its new places, just recorded, narrowed away.
        let _places = PLACES.lock().unwrap_or_else(|e| e.into_inner());
        if failed == 0 && Arc::ptr_eq(&engine.flows(), &swept) {
            remember_places(&engine, &swept, true);
        }
    }))
}

/// Whether a flow file that could not be read may become readable with no event in the
/// directory, so that the watcher looks again: a link whose target is not there yet, a file
/// being replaced, a directory that could not be listed. Not a `*.toml` name that is no file
/// (a directory, a pipe), nor a file that is not UTF-8: what fixes them is an event.
fn may_heal(problem: &flows::Problem) -> bool {
    match std::fs::metadata(&problem.file) {
        Err(_) => true,
        Ok(m) if m.is_dir() => problem.line == 0,
        Ok(m) => m.is_file() && problem.message.starts_with("cannot read"),
    }
}

#[cfg(test)]
mod tests {
    use super::may_heal;

    #[test]
    fn only_a_flow_file_that_may_become_readable_by_itself_is_looked_at_again() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::os::unix::fs::symlink(at("gone.toml"), at("link.toml")).unwrap();
        std::fs::create_dir(at("dir.toml")).unwrap();
        std::fs::write(at("latin.toml"), b"name = \"caf\xE9\"\n").unwrap();
        std::fs::write(at("ok.toml"), "[bot]\n").unwrap();
        let problems = crate::flows::read_dir(dir.path()).unwrap_err().0;
        let heals: Vec<(String, bool)> = (problems.iter())
            .map(|p| {
                (
                    p.file.file_name().unwrap().to_string_lossy().into(),
                    may_heal(p),
                )
            })
            .collect();
        let expected = [
            ("dir.toml", false),
            ("latin.toml", false),
            ("link.toml", true),
        ];
        assert_eq!(heals, expected.map(|(n, h)| (n.to_string(), h)));
    }
}
