//! Durable state in sled: subscribers (each with its last few webhook replies, for
//! exactly-once retries), timers, outbox, delivery records, history, and an index of each
//! number's messages (so erasing a number reads only its own). Every event's changes go into
//! one multi-tree transaction ([`Store::commit_many`]); the engine's writer thread makes them
//! durable with one flush per batch (group commit).

pub mod codec;
pub mod compact;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::machine::{Record, State, Subscriber, Timer, TimerKind};
use crate::phone::Phone;

/// Version bytes of the other stored values (see [`codec`]).
/// 2: a message says whether it is a follow-up (v1 messages are read as not one).
/// 3: a code's message says when the code expires (older ones are read as not saying).
/// 4: a message counts its tries that may have reached the provider (older ones: none).
const OUT_VERSION: u8 = 4;
const DELIVERY_VERSION: u8 = 1;
const HISTORY_VERSION: u8 = 1;
const REPORT_VERSION: u8 = 1;
/// The layout of trees and keys; checked at open. 2: subscriber records may be v3 and the
/// counts per state are kept in `meta`. 3: subscriber records may be v4 (times as numbers).
/// 4: outbox messages may be v2 (with `follow_up`). 5: subscriber records may be v5 (with the
/// key of the form field asked). 6: outbox messages may be v3 (with a code's expiry). 7:
/// subscriber records may be v6 (with the code the number verified with). 8: v7 (with every
/// code the number may text back after it verified). 9: v8 (with the question whose late
/// answer is still taken, and the number of ours it last texted or called), and the
/// `early_reports` tree. 10: v9 (with which codes an app asked for). 11: outbox messages
/// may be v4 (with the tries that may have reached the provider).
/// An older data dir is upgraded at open (schema 1 is counted once; older records are read
/// as they are and rewritten in today's form when they next change). An older smsflow
/// refuses a newer dir by its schema instead of failing on each record it cannot read.
pub const SCHEMA: u64 = 11;

/// A message waiting in the outbox. `Debug` hides the body of one that carries a code.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutMessage {
    pub phone: Phone,
    pub body: String,
    /// A verification code: never written to logs.
    pub secret: bool,
    pub attempts: u32,
    pub next_try: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Sent because a timer fired (a sequence step, a question's timeout), not as an answer
    /// to something the number did: it waits out quiet hours however late it is sent.
    pub follow_up: bool,
    /// For a code's message: when that code expires (a code sent later would only be refused
    /// when typed back). `None` for other texts, and for codes queued before it was kept.
    pub code_expires_at: Option<DateTime<Utc>>,
    /// Tries that may have reached the provider though no answer came (a timeout, a
    /// connection dropped after the request): each may have sent the message.
    pub uncertain: u32,
}

/// An outbox message as version 3 stored it (a struct's fields are written in order, a
/// nested one's among them): version 4 added `uncertain` after these.
#[derive(Deserialize)]
struct OutMessageV3 {
    v1: OutMessageV1,
    follow_up: bool,
    code_expires_at: Option<DateTime<Utc>>,
}

/// The fields of an outbox message as version 1 stored them; version 2 added `follow_up`
/// after them (bincode writes a struct as its fields in order, so `(OutMessageV1, bool)`
/// reads version 2).
#[derive(Deserialize)]
struct OutMessageV1 {
    phone: Phone,
    body: String,
    secret: bool,
    attempts: u32,
    next_try: DateTime<Utc>,
    created_at: DateTime<Utc>,
    last_error: Option<String>,
}

/// Reads an outbox message of any known version.
fn decode_out(bytes: &[u8]) -> Result<OutMessage, codec::CodecError> {
    let v3 = match bytes.first() {
        Some(1) => OutMessageV3 {
            v1: codec::decode(1, bytes)?,
            follow_up: false,
            code_expires_at: None,
        },
        Some(2) => {
            let (v1, follow_up) = codec::decode(2, bytes)?;
            OutMessageV3 {
                v1,
                follow_up,
                code_expires_at: None,
            }
        }
        Some(3) => codec::decode(3, bytes)?,
        _ => return codec::decode(OUT_VERSION, bytes),
    };
    let v1 = v3.v1;
    Ok(OutMessage {
        phone: v1.phone,
        body: v1.body,
        secret: v1.secret,
        attempts: v1.attempts,
        next_try: v1.next_try,
        created_at: v1.created_at,
        last_error: v1.last_error,
        follow_up: v3.follow_up,
        code_expires_at: v3.code_expires_at,
        uncertain: 0,
    })
}

impl std::fmt::Debug for OutMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body: &dyn std::fmt::Debug = if self.secret {
            &"<a verification code's text>"
        } else {
            &self.body
        };
        f.debug_struct("OutMessage")
            .field("phone", &self.phone)
            .field("body", body)
            .field("secret", &self.secret)
            .field("attempts", &self.attempts)
            .field("next_try", &self.next_try)
            .field("created_at", &self.created_at)
            .field("last_error", &self.last_error)
            .field("follow_up", &self.follow_up)
            .field("code_expires_at", &self.code_expires_at)
            .finish()
    }
}

/// What became of a message that left the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub phone: Phone,
    /// `sent`, then whatever Twilio reports (`delivered`, `undelivered`, …), or `failed`.
    pub status: String,
    pub provider_sid: Option<String>,
    pub error_code: Option<u32>,
    pub error: Option<String>,
    pub attempts: u32,
    pub updated_at: DateTime<Utc>,
}

/// What a delivery report says of a message: Twilio's `MessageStatus` and `ErrorCode`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub status: String,
    pub error_code: Option<u32>,
    pub at: DateTime<Utc>,
}

impl Report {
    /// How far along a status is (Twilio's statuses in the order they happen; final ones
    /// rank highest, and `read` comes after `delivered`): reports can arrive out of order,
    /// and a message's status never moves backwards.
    fn rank(status: &str) -> u8 {
        match status {
            "accepted" | "scheduled" | "queued" => 1,
            "sending" => 2,
            "sent" => 3,
            "delivered" | "partially_delivered" | "undelivered" | "failed" | "canceled" => 4,
            "read" => 5,
            _ => 0,
        }
    }

    /// The report applied to a message's record, unless the record is further along. A
    /// failure without an error code keeps the one reported before it; any other status
    /// has only its own (a message reported `delivered` after `undelivered` keeps no error).
    fn apply(&self, d: &mut Delivery) {
        if Report::rank(&self.status) >= Report::rank(&d.status) {
            let failure = matches!(self.status.as_str(), "undelivered" | "failed");
            d.error_code = if failure {
                self.error_code.or(d.error_code)
            } else {
                self.error_code
            };
            d.status.clone_from(&self.status);
            d.updated_at = d.updated_at.max(self.at);
        }
    }
}

/// How long a report for a message not yet recorded waits for it (see [`Store::report`]):
/// the send it may belong to is recorded as soon as the provider answers (within seconds).
const EARLY_REPORT_KEPT: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// A send through the provider in flight, from the outbox (see [`Store::send_in_flight`]).
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// One of a number's messages, as [`Store::messages_of`] finds it.
pub enum Sent {
    Queued(OutMessage),
    Ended(Delivery),
    Unreadable(codec::CodecError),
}

/// A subscriber record met in a walk over all of them.
// Made and used one at a time in a walk: boxing the common variant would cost an allocation
// per record for no saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Listed {
    Readable(Subscriber),
    /// Damaged, or written by a newer smsflow. Its key is the number (in full: operators erase
    /// such a record by it); log it with [`Listed::masked_key`].
    Unreadable {
        key: String,
        error: codec::CodecError,
    },
}

impl Listed {
    /// The number of an unreadable record, masked for logs.
    pub fn masked_key(key: &str) -> String {
        Phone::from_stored(key.to_string())
            .map_or_else(|_| "an unreadable key".to_string(), |p| p.masked())
    }
}

/// A history entry as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub record: Record,
}

/// A due timer read back from the `timers` tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueTimer {
    pub phone: Phone,
    pub timer: Timer,
    key: Vec<u8>,
}

/// Everything one event changes, applied atomically by [`Store::commit`]. (No `Debug`:
/// its outgoing texts may hold codes.)
#[derive(Default)]
pub struct Commit {
    pub subscriber: Option<Subscriber>,
    pub schedule: Vec<Timer>,
    pub cancel: Vec<Timer>,
    /// A timer that fired and is consumed by this event.
    pub fired: Option<DueTimer>,
    /// Texts to queue: (body, whether it carries a code).
    pub outgoing: Vec<(String, bool)>,
    /// When the code among `outgoing` expires.
    pub code_expires_at: Option<DateTime<Utc>>,
    /// The event was a due timer: its texts without a code are follow-ups, which wait out
    /// quiet hours at send time too (a backlog or an outage can push them into the night).
    pub follow_up: bool,
    /// The number's recent webhook replies, stored with it (see [`codec::Replied`]).
    pub replies: Vec<codec::Replied>,
    pub history: Vec<HistoryEntry>,
}

pub struct Store {
    db: sled::Db,
    subscribers: sled::Tree,
    timers: sled::Tree,
    outbox: sled::Tree,
    history: sled::Tree,
    deliveries: sled::Tree,
    sids: sled::Tree,
    /// Delivery reports that came before their message's provider id was recorded (the
    /// provider may report before its answer to the send is stored), by that id.
    early_reports: sled::Tree,
    /// `phone ++ 0 ++ tag ++ id`: the outbox (`o`) and delivery (`d`) ids of each number, so
    /// erasing a number does not scan every message ever sent.
    by_phone: sled::Tree,
    /// Subscribers per state (in [`State::NAMES`] order), then pending timers, then queued
    /// messages. Kept on disk (meta key `counts`) by the same transactions that change them,
    /// so neither a start nor a `/metrics` scrape walks a tree (sled's `len` does).
    counts: [AtomicI64; COUNTS],
    meta: sled::Tree,
    /// Numbers erased since the store was opened (the outbox's memory of what waits is
    /// void after one).
    erasures: AtomicU64,
    /// Outbox sends in flight (a report may come for one before its answer is recorded).
    sending: AtomicUsize,
    /// When kept early reports were last looked over for stale ones (ms since 1970).
    early_swept_at: AtomicI64,
    /// The schema this open upgraded the data dir from, if it did.
    upgraded_from: Option<u64>,
    /// One past the largest outbox id committed, and one past the largest known to be on
    /// disk (committed before a flush that succeeded): a message is sent only once durable,
    /// or a crash before the flush would bring back the event that queued it, to be sent again.
    outbox_committed_below: AtomicU64,
    outbox_durable_below: AtomicU64,
    /// The first failure of the disk under the store (a failed flush, or a write that failed
    /// on I/O; see [`Store::broken`]). sled 0.34 keeps it: every later write and flush fails with it, even once its
    /// cause (a full disk) is gone, so a process whose store failed cannot go on; only a new
    /// open recovers (what was flushed is on disk).
    failed: tokio::sync::watch::Sender<Option<String>>,
    /// sled's log file (`<data>/db`), synced after each flush: sled 0.34 makes its writes
    /// stable with `sync_file_range`, which neither records a grown file's size and blocks
    /// nor empties the disk's write cache, so a power cut could lose what it "flushed".
    /// `fdatasync` on any handle of the file does both.
    log_file: std::fs::File,
    /// sled writes a page too large for its log (over a quarter of a segment) to a file of
    /// its own under `<data>/blobs`, which it does not sync: each flush syncs the new ones
    /// (and the directory that names them). The names already synced.
    blobs: (
        PathBuf,
        std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    ),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Abort(String);

thread_local! {
    /// Set while this thread opens a store (see [`Store::open_with_cache`]).
    static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The refusal of a data dir whose store is damaged (`what`: how it showed), with the way out.
fn damaged(dir: &Path, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "opening data dir {}: its store is damaged ({what}); restore the data dir from a \
         backup (see the README's Backups)",
        dir.display()
    )
}

/// Installs (once) a panic hook that stays quiet for a panic met while opening a store,
/// which is caught and reported as a damaged store; any other panic is reported as before.
fn quiet_panics_while_opening() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING.with(|o| o.get()) {
                before(info);
            }
        }));
    });
}

/// A storage error as an operator reads it: "No space left on device (os error 28)". sled
/// hands on a kept I/O error as the `Debug` text of the first (`Os { code: 28, kind:
/// StorageFull, message: "No space left on device" }`): its message is taken from that.
fn io_text(e: &sled::Error) -> String {
    let sled::Error::Io(io) = e else {
        return e.to_string();
    };
    if io.raw_os_error().is_some() {
        return io.to_string();
    }
    let text = io.to_string();
    match text
        .split_once("message: \"")
        .and_then(|(_, m)| m.split_once('"'))
    {
        Some((message, _)) => format!("{message} ({})", io.kind()),
        None => text,
    }
}

/// Another process (usually the running daemon) holds the data dir.
#[derive(Debug, thiserror::Error)]
#[error("data dir {} is in use by another smsflow process (only one may open it)", .0.display())]
pub struct DataDirInUse(pub PathBuf);

impl Store {
    /// Opens (or creates) the store in `dir`. Only one process may hold a data dir.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        Store::open_with_cache(dir, 512 << 20)
    }

    /// Opens with sled's page cache bounded to `cache_bytes` (reads beyond it are evicted).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> anyhow::Result<Store> {
        // sled 0.34 panics on some damage it meets, recovering its log or reading a page
        // back (a file cut short, a page overwritten): a damaged store, said so, not a crash
        // (and not with a panic's report first, which is no log line).
        quiet_panics_while_opening();
        OPENING.with(|o| o.set(true));
        let opened = std::panic::catch_unwind(|| Store::open_inner(dir, cache_bytes));
        OPENING.with(|o| o.set(false));
        let opened = opened.map_err(|panic| {
            let what = crate::panic_text(&*panic);
            damaged(dir, &format!("sled could not read it: {what}"))
        })?;
        opened.map_err(|e| {
            // Damage met reading the store after sled opened it: said as at its opening.
            let damage = e
                .chain()
                .find_map(|c| match c.downcast_ref::<sled::Error>() {
                    Some(sled::Error::Corruption { .. }) => Some(c.to_string()),
                    _ => None,
                });
            match damage {
                Some(d) if !e.to_string().contains("is damaged") => damaged(dir, &d),
                _ => e,
            }
        })
    }

    fn open_inner(dir: &Path, cache_bytes: u64) -> anyhow::Result<Store> {
        anyhow::ensure!(
            !dir.is_file(),
            "data dir {} is a file; give a directory (it is created if missing)",
            dir.display()
        );
        // Only its owner may look in: it holds live codes and every number's answers.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating data dir {}", dir.display()))?;
            if let Ok(meta) = std::fs::metadata(dir) {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        "data dir {} may be read by other users (mode {mode:o}): it holds live \
                         codes and every number's answers; `chmod 700` it",
                        dir.display()
                    );
                }
            }
        }
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open();
        let db = opened.map_err(|e| match e {
            // sled reports a held lock as an IO error with this text.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                anyhow::Error::new(DataDirInUse(dir.to_path_buf()))
            }
            sled::Error::Corruption { .. } => damaged(dir, &e.to_string()),
            other => anyhow::anyhow!("opening data dir {}: {other}", dir.display()),
        })?;
        let log_file = std::fs::File::open(dir.join("db"))
            .with_context(|| format!("opening data dir {}: its log file", dir.display()))?;
        // sled locks its log file after opening it by name: should `smsflow compact` have
        // swapped the directory in between, the lock is on the old store's file, and the log
        // at the name is free. Then this is not the store at the name: refused.
        anyhow::ensure!(
            compact::lock(&dir.join("db")).is_err(),
            "data dir {} changed while it was being opened (a compaction swapped it in); start \
             again",
            dir.display()
        );
        // The files sled made, such as `db` itself, are named in the directory: that too
        // must survive a power cut. (Some filesystems cannot sync a directory: said, not
        // fatal.)
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!("could not sync data dir {}: {e}", dir.display());
        }
        let tree = |name: &str| {
            db.open_tree(name)
                .with_context(|| format!("opening tree {name}"))
        };
        let meta = tree("meta")?;
        let schema = match meta.get("schema")? {
            None => None,
            Some(v) => Some(
                <[u8; 8]>::try_from(v.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        anyhow::anyhow!("data dir {}: unreadable schema", dir.display())
                    })?,
            ),
        };
        anyhow::ensure!(
            schema.is_none_or(|s| s <= SCHEMA),
            "data dir {} has schema {}, this smsflow understands up to {SCHEMA} (upgrade smsflow)",
            dir.display(),
            schema.unwrap_or_default()
        );
        let (timers, outbox) = (tree("timers")?, tree("outbox")?);
        // Schema 1 had no kept counts (or an older smsflow may have changed subscribers
        // without keeping them): count again.
        let stored_counts = match schema {
            Some(1) => None,
            _ => meta.get(COUNTS_KEY)?.and_then(|v| decode_counts(&v)),
        };
        // Everything queued before this start is on disk, and has an id below a new one.
        let queued_below = db.generate_id()?;
        let store = Store {
            subscribers: tree("subscribers")?,
            timers,
            outbox,
            history: tree("history")?,
            deliveries: tree("deliveries")?,
            sids: tree("sids")?,
            early_reports: tree("early_reports")?,
            by_phone: tree("by_phone")?,
            counts: std::array::from_fn(|i| AtomicI64::new(stored_counts.map_or(0, |c| c[i]))),
            meta,
            db,
            erasures: AtomicU64::new(0),
            sending: AtomicUsize::new(0),
            early_swept_at: AtomicI64::new(0),
            upgraded_from: schema.filter(|s| *s != SCHEMA),
            outbox_committed_below: AtomicU64::new(queued_below),
            outbox_durable_below: AtomicU64::new(queued_below),
            failed: tokio::sync::watch::Sender::new(None),
            log_file,
            blobs: (dir.join("blobs"), Default::default()),
        };
        let meta = &store.meta;
        // Data dirs from before the index: build it once.
        if meta.get(PHONE_INDEX_BUILT)?.is_none() {
            store.build_phone_index()?;
            meta.insert(PHONE_INDEX_BUILT, &[1u8][..])?;
            store.flush()?;
        }
        // Data dirs from before the kept counts: count once.
        if stored_counts.is_none() {
            let states = store
                .count_states()
                .context("counting subscribers per state (once, to keep the counts from now on)")?;
            let mut counts = [0i64; COUNTS];
            for (n, s) in counts.iter_mut().zip(states) {
                *n = s as i64;
            }
            counts[TIMERS] = store.timers.len() as i64;
            counts[OUTBOX] = store.outbox.len() as i64;
            for (kept, n) in store.counts.iter().zip(counts) {
                kept.store(n, Relaxed);
            }
            meta.insert(COUNTS_KEY, encode_counts(&counts))?;
        }
        if schema != Some(SCHEMA) {
            meta.insert("schema", &SCHEMA.to_be_bytes())?;
            store.flush()?;
        }
        store.drop_stale_early_reports(chrono::Utc::now() - EARLY_REPORT_KEPT)?;
        Ok(store)
    }

    /// The flows' places ([`crate::flows::Flows::places`]) as last recorded, if ever.
    pub fn flows_places(&self) -> anyhow::Result<Option<Vec<(String, String)>>> {
        Ok(self
            .meta
            .get(FLOWS_PLACES)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    pub fn set_flows_places(&self, places: &[(String, String)]) -> anyhow::Result<()> {
        self.meta
            .insert(FLOWS_PLACES, serde_json::to_vec(places)?)
            .map_err(|e| self.wrote(e))?;
        Ok(())
    }

    /// The form's fields ([`crate::flows::Form::all_keys`]) of the flows last live, if
    /// recorded: a start compares them with the flows it loads, as a reload does.
    pub fn flows_fields(&self) -> anyhow::Result<Option<Vec<String>>> {
        Ok(self
            .meta
            .get(FLOWS_FIELDS)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    pub fn set_flows_fields(&self, fields: &[String]) -> anyhow::Result<()> {
        self.meta
            .insert(FLOWS_FIELDS, serde_json::to_vec(fields)?)
            .map_err(|e| self.wrote(e))?;
        Ok(())
    }

    /// Subscribers per state, in [`State::NAMES`] order.
    pub fn state_counts(&self) -> [i64; 5] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }

    /// How many numbers were erased since the store was opened.
    pub fn erasures(&self) -> u64 {
        self.erasures.load(Relaxed)
    }

    /// Adds a committed transaction's changes to the live counts.
    fn counted(&self, delta: &Counts) {
        for (kept, d) in self.counts.iter().zip(delta) {
            kept.fetch_add(*d, Relaxed);
        }
    }

    fn build_phone_index(&self) -> anyhow::Result<()> {
        // A record that cannot be read stops only itself: it is left out (its number is
        // unknown) and logged; the outbox skips it too, and erasure cannot find it by number.
        let unreadable = |e: anyhow::Error| {
            if codec::is_unreadable(&e) {
                tracing::error!("indexing messages by number: skipping a record: {e:#}");
                Ok(())
            } else {
                Err(e)
            }
        };
        for m in self.outbox() {
            match m {
                Ok((id, msg)) => {
                    self.by_phone
                        .insert(phone_index_key(&msg.phone, OUTBOX_TAG, id), &[][..])?;
                }
                Err(e) => unreadable(e)?,
            }
        }
        for d in self.deliveries() {
            match d {
                Ok((id, d)) => {
                    self.by_phone
                        .insert(phone_index_key(&d.phone, DELIVERY_TAG, id), &[][..])?;
                }
                Err(e) => unreadable(e)?,
            }
        }
        Ok(())
    }

    /// Writes everything committed so far to disk (fsync).
    pub fn flush(&self) -> anyhow::Result<()> {
        // After the disk failed, nothing is on disk for sure any more: sled keeps its own
        // errors, but not a failed `fdatasync` (whose pages the kernel may have dropped, and
        // which a later call would not report again).
        if let Some(why) = self.failure() {
            anyhow::bail!("flushing the store: the disk under it failed: {why}");
        }
        // Read before the flush: what was committed by then is on disk after it.
        let committed = self.outbox_committed_below.load(SeqCst);
        self.db
            .flush()
            .map_err(|e| self.broken(e))
            .context("flushing the store")?;
        // (See `log_file` and `blobs`.)
        (self.log_file.sync_data())
            .and_then(|()| self.sync_new_blobs())
            .map_err(|e| self.broken(sled::Error::Io(e)))
            .context("flushing the store")?;
        self.outbox_durable_below.fetch_max(committed, SeqCst);
        Ok(())
    }

    /// Syncs the blob files sled wrote since the last flush, and then their directory (see
    /// `blobs`). One removed meanwhile (sled replaced it) needs nothing.
    fn sync_new_blobs(&self) -> std::io::Result<()> {
        let (dir, synced) = &self.blobs;
        let entries = match std::fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let mut synced = synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = std::collections::HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()).and_then(|f| f.sync_data()) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    other => other?,
                }
                new = true;
            }
            now.insert(name);
        }
        if new {
            std::fs::File::open(dir)?.sync_all()?;
        }
        *synced = now;
        Ok(())
    }

    /// Notes that the disk under the store failed (the first failure is kept; see
    /// [`Store::failure`]) and gives the error back: any failed flush, and any write that
    /// failed on I/O. sled then fails every later change, though not always a flush (one
    /// with nothing new to write returns at once), so each write's error is looked at.
    /// Damage met while reading (`Corruption`) is not this: it fails only what touches it.
    fn broken(&self, e: sled::Error) -> sled::Error {
        self.fail(io_text(&e));
        e
    }

    /// Notes a failure that leaves the store unable to take changes, not met by a write of
    /// its own (the writer thread gone): as [`Store::broken`] does, the first one is kept.
    pub fn fail(&self, why: String) {
        self.failed.send_if_modified(|kept| {
            let first = kept.is_none();
            if first {
                *kept = Some(why);
            }
            first
        });
    }

    /// A write's error, noted by [`Store::broken`] when it is the disk's.
    fn written<A>(&self, e: TransactionError<A>) -> TransactionError<A> {
        match e {
            TransactionError::Storage(s) => TransactionError::Storage(self.wrote(s)),
            other => other,
        }
    }

    /// A plain (non-transactional) write's error, noted as [`Store::written`] does.
    fn wrote(&self, e: sled::Error) -> sled::Error {
        match e {
            io @ sled::Error::Io(_) => self.broken(io),
            other => other,
        }
    }

    /// The first failure of the disk under the store, if one happened since it was opened:
    /// from then on every change fails, and the process must stop (a new open recovers).
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// Resolves with [`Store::failure`] once there is one.
    pub async fn failed(&self) -> String {
        let mut seen = self.failed.subscribe();
        if let Ok(Some(why)) = seen
            .wait_for(Option::is_some)
            .await
            .map(|kept| kept.clone())
        {
            return why;
        }
        // Not while the store lives (it holds the sender).
        std::future::pending().await
    }

    /// Whether queued message `id` is on disk (so sending it cannot be undone by a crash).
    pub fn outbox_durable(&self, id: u64) -> bool {
        id < self.outbox_durable_below()
    }

    /// One past the largest outbox id known to be on disk.
    pub fn outbox_durable_below(&self) -> u64 {
        self.outbox_durable_below.load(SeqCst)
    }

    pub fn subscriber(&self, phone: &Phone) -> anyhow::Result<Option<Subscriber>> {
        Ok(self.record(phone)?.map(|(s, _)| s))
    }

    /// All subscribers in phone order, starting after `after`. A storage error ends the walk
    /// (`Err`); a record that cannot be read is [`Listed::Unreadable`], and the walk goes on, so
    /// one damaged record neither hides the others nor goes unnoticed.
    pub fn subscribers_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = anyhow::Result<Listed>> + '_ {
        walk(&self.subscribers, after.map(|a| a.as_bytes().to_vec())).map(|kv| {
            let (k, v) = kv?;
            Ok(match codec::decode_subscriber(&v) {
                Ok(s) => Listed::Readable(s),
                Err(error) => Listed::Unreadable {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    error,
                },
            })
        })
    }

    /// Numbers a retention may forget ([`Subscriber::forgettable`]: silent since `before`)
    /// that have no message queued, in phone order after `after`: at most `limit` of them,
    /// among at most `scan` records looked at (so that a caller can stop between calls);
    /// with the key to go on after (`None`: the walk is done). A record that cannot be read
    /// is left for an operator.
    pub fn forgettable_after(
        &self,
        after: Option<Vec<u8>>,
        before: DateTime<Utc>,
        limit: usize,
        scan: usize,
    ) -> anyhow::Result<(Vec<Phone>, Option<Vec<u8>>)> {
        let mut found = Vec::new();
        for (looked, kv) in walk(&self.subscribers, after).enumerate() {
            let (k, v) = kv?;
            if let Ok(sub) = codec::decode_subscriber(&v) {
                if sub.forgettable(before) && !self.has_queued(&sub.phone)? {
                    found.push(sub.phone);
                }
            }
            if found.len() >= limit || looked + 1 >= scan {
                return Ok((found, Some(k.to_vec())));
            }
        }
        Ok((found, None))
    }

    /// Whether a message to `phone` waits in the outbox.
    pub fn has_queued(&self, phone: &Phone) -> sled::Result<bool> {
        self.queued_under(&prefixed(phone, &[]))
    }

    /// [`Store::has_queued`] for a number's key prefix (`phone ++ 0`).
    fn queued_under(&self, number: &[u8]) -> sled::Result<bool> {
        let mut prefix = number.to_vec();
        prefix.push(OUTBOX_TAG);
        let first = self.by_phone.scan_prefix(prefix).next().transpose()?;
        Ok(first.is_some())
    }

    /// A subscriber with its recent webhook replies.
    pub fn record(
        &self,
        phone: &Phone,
    ) -> anyhow::Result<Option<(Subscriber, Vec<codec::Replied>)>> {
        match self.subscribers.get(phone.as_str())? {
            None => Ok(None),
            Some(bytes) => {
                Ok(Some(codec::decode_record(&bytes).with_context(|| {
                    format!("reading subscriber {}", phone.masked())
                })?))
            }
        }
    }

    /// Applies several events' changes in a single transaction over every tree they touch:
    /// all of them or none.
    pub fn commit_many(&self, commits: &[Commit], now: DateTime<Utc>) -> anyhow::Result<()> {
        let encoded: Vec<Prepared> = commits.iter().map(|c| Prepared::new(c, now)).collect();
        self.commit_prepared(&encoded, None)
    }

    /// Like [`Store::commit_many`] for commits already turned into bytes; with the times of
    /// the hour's codes, when they changed (see [`Store::codes_hour`]).
    pub fn commit_prepared(
        &self,
        encoded: &[Prepared],
        codes_hour: Option<&[crate::machine::CodeMinute]>,
    ) -> anyhow::Result<()> {
        let codes_hour: Option<Vec<u8>> = codes_hour.map(|minutes| {
            (minutes.iter())
                .flat_map(|(m, n)| [&millis(*m).to_be_bytes()[..], &n.to_be_bytes()[..]].concat())
                .collect()
        });
        // Everything is encoded up front: sled may run the closure more than once.
        let trees = (
            &self.subscribers,
            &self.timers,
            &self.outbox,
            &self.history,
            &self.by_phone,
            &self.meta,
        );
        let delta = trees
            .transaction(|(subs, timers, outbox, hist, by_phone, meta)| {
                // Counted per run: sled may run this closure again, and only the run that
                // commits returns.
                let mut delta: Counts = [0; COUNTS];
                let mut queued_below = None;
                for e in encoded {
                    for key in &e.remove_timers {
                        delta[TIMERS] -= i64::from(timers.remove(key.as_slice())?.is_some());
                    }
                    // The timer that fired, only if it is still the one kept under its key: a
                    // newer one for the same time (a later epoch) replaced it, and stays.
                    if let Some((key, epoch)) = &e.fired {
                        if timers.get(key.as_slice())?.is_some_and(|v| v == epoch[..]) {
                            timers.remove(key.as_slice())?;
                            delta[TIMERS] -= 1;
                        }
                    }
                    for (key, epoch) in &e.add_timers {
                        delta[TIMERS] +=
                            i64::from(timers.insert(key.as_slice(), &epoch[..])?.is_none());
                    }
                    for msg in &e.outgoing {
                        let id = outbox.generate_id()?;
                        queued_below = Some(id.saturating_add(1));
                        if let Some(phone) = &e.phone {
                            by_phone.insert(phone_index_key(phone, OUTBOX_TAG, id), &[][..])?;
                        }
                        delta[OUTBOX] += i64::from(
                            outbox
                                .insert(&id.to_be_bytes()[..], msg.as_slice())?
                                .is_none(),
                        );
                    }
                    if let Some(phone) = &e.phone {
                        for h in &e.history {
                            let id = hist.generate_id()?;
                            hist.insert(history_key(phone, id), h.as_slice())?;
                        }
                    }
                    if let (Some(phone), Some((value, state))) = (&e.phone, &e.subscriber) {
                        let old = subs.insert(phone.as_str().as_bytes(), value.as_slice())?;
                        delta[*state] += 1;
                        if let Some(was) = old.and_then(|o| codec::state_of_record(&o).ok()) {
                            delta[state_index(&was)] -= 1;
                        }
                    }
                }
                keep_counts(meta, &delta)?;
                if let Some(times) = &codes_hour {
                    meta.insert(CODES_HOUR_KEY, times.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<Abort>>((delta, queued_below))
            })
            .map_err(|e| match self.written(e) {
                TransactionError::Abort(a) => anyhow::anyhow!("commit aborted: {a}"),
                TransactionError::Storage(s) => anyhow::anyhow!("commit failed: {s}"),
            })?;
        let (delta, queued_below) = delta;
        if let Some(below) = queued_below {
            self.outbox_committed_below.fetch_max(below, SeqCst);
        }
        self.counted(&delta);
        Ok(())
    }

    /// The codes counted against `verify.max_codes_per_hour`, by minute, oldest first, as
    /// the last commit that changed them left them (so a restart keeps the hour's count).
    /// Unreadable or absent: none.
    pub fn codes_hour(&self) -> Vec<crate::machine::CodeMinute> {
        let stored = self.meta.get(CODES_HOUR_KEY).ok().flatten();
        (stored.iter())
            .flat_map(|v| v.chunks_exact(12))
            .filter_map(|c| {
                let at = u64::from_be_bytes(c.get(..8)?.try_into().ok()?);
                let n = u32::from_be_bytes(c.get(8..)?.try_into().ok()?);
                Some((DateTime::from_timestamp_millis(i64::try_from(at).ok()?)?, n))
            })
            .collect()
    }

    // ---- timers ------------------------------------------------------------

    /// The earliest pending timer's due time.
    pub fn next_timer_at(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        Ok(self.timers.first()?.and_then(|(k, _)| key_time(&k)))
    }

    /// Timers due at or before `now`, earliest first, at most `limit`.
    pub fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> anyhow::Result<Vec<DueTimer>> {
        let end = millis(now).saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for kv in self.timers.range(..end.to_vec()).take(limit) {
            let (k, v) = kv?;
            match parse_timer(&k, &v) {
                Some(t) => out.push(t),
                None => {
                    tracing::error!("dropping a malformed timer key ({} bytes)", k.len());
                    let delta = (&self.timers, &self.meta)
                        .transaction(|(timers, meta)| {
                            let mut delta: Counts = [0; COUNTS];
                            delta[TIMERS] -= i64::from(timers.remove(&k)?.is_some());
                            keep_counts(meta, &delta)?;
                            Ok::<_, ConflictableTransactionError<Abort>>(delta)
                        })
                        .map_err(|e| {
                            anyhow::anyhow!("dropping a malformed timer: {:?}", self.written(e))
                        })?;
                    self.counted(&delta);
                }
            }
        }
        Ok(out)
    }

    /// Pending timers (kept as they change, not counted per call).
    pub fn timer_count(&self) -> usize {
        self.counts[TIMERS].load(Relaxed).max(0) as usize
    }

    // ---- outbox ------------------------------------------------------------

    /// Outbox entries in the order they were queued.
    pub fn outbox(&self) -> impl Iterator<Item = anyhow::Result<(u64, OutMessage)>> + '_ {
        self.outbox_after(None)
    }

    /// Outbox entries queued after the one with id `after` (all of them for `None`), in order.
    pub fn outbox_after(
        &self,
        after: Option<u64>,
    ) -> impl Iterator<Item = anyhow::Result<(u64, OutMessage)>> + '_ {
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id.to_be_bytes().to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        self.outbox
            .range((from, std::ops::Bound::Unbounded))
            .map(|kv| by_id(kv, "outbox", decode_out))
    }

    /// Whether message `id` is still queued: not yet sent or given up on, nor erased with
    /// its number.
    pub fn outbox_holds(&self, id: u64) -> anyhow::Result<bool> {
        Ok(self.outbox.contains_key(id.to_be_bytes())?)
    }

    /// One queued message, if it is still queued.
    pub fn outbox_get(&self, id: u64) -> anyhow::Result<Option<OutMessage>> {
        match self.outbox.get(id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => Ok(Some(decode_out(&v)?)),
        }
    }

    /// The oldest message queued for `phone` after the one with id `after`, found through
    /// the per-number index (not a walk of the outbox). Entries that cannot be read are
    /// passed over.
    pub fn next_queued_of(
        &self,
        phone: &Phone,
        after: u64,
    ) -> anyhow::Result<Option<(u64, OutMessage)>> {
        let Some(from) = after.checked_add(1) else {
            return Ok(None);
        };
        let end = phone_index_key(phone, OUTBOX_TAG, u64::MAX);
        for k in self
            .by_phone
            .range(phone_index_key(phone, OUTBOX_TAG, from)..=end)
            .keys()
        {
            let k = k?;
            let Some(id) = index_id(&k) else {
                continue;
            };
            match self.outbox_get(id) {
                Ok(Some(msg)) => return Ok(Some((id, msg))),
                Ok(None) => {}
                // Unreadable: passed over, as the outbox does. A storage error is an error.
                Err(e) if codec::is_unreadable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Whether `phone` opted out after outbox message `id` was queued, even if it opted back
    /// in since: consent withdrawn covers what was queued before it. One counter gives ids to
    /// the whole database (sled's `generate_id`), so history written later has larger ids.
    /// (`prune` keeps the history of a number with queued messages.) An entry that cannot be
    /// read counts as an opt-out.
    pub fn opted_out_since(&self, phone: &Phone, id: u64) -> anyhow::Result<bool> {
        self.recorded_since(phone, id, |r| matches!(r, Record::OptedOut { .. }))
    }

    /// Whether `phone`'s sequence was ended after outbox message `id` was queued (a reload
    /// took away its place: see [`crate::machine::lost_place`]), as
    /// [`Store::opted_out_since`] tells (an entry that cannot be read counts as one).
    pub fn sequence_ended_since(&self, phone: &Phone, id: u64) -> anyhow::Result<bool> {
        self.recorded_since(phone, id, |r| matches!(r, Record::SequenceEnded { .. }))
    }

    /// Whether `phone` opted out and then back in after outbox message `id` was queued
    /// (a STOP, then a START): a provider's refusal of that message as unsubscribed (21610)
    /// came from the block that START lifted. An entry that cannot be read counts as
    /// neither (the refusal then opts the number out: nothing is sent on a guess).
    pub fn opted_back_in_since(&self, phone: &Phone, id: u64) -> anyhow::Result<bool> {
        let mut out = false;
        for record in self.history_since(phone, id) {
            match record? {
                Some(Record::OptedOut { .. }) => out = true,
                Some(Record::OptedIn { .. }) if out => return Ok(true),
                _ => {}
            }
        }
        Ok(false)
    }

    fn recorded_since(
        &self,
        phone: &Phone,
        id: u64,
        wanted: impl Fn(&Record) -> bool,
    ) -> anyhow::Result<bool> {
        for record in self.history_since(phone, id) {
            // One that cannot be read might have been it: nothing is sent on a guess.
            match record? {
                Some(r) if !wanted(&r) => {}
                _ => return Ok(true),
            }
        }
        Ok(false)
    }

    /// `phone`'s history after id `id`, oldest first (`None`: an entry that cannot be read).
    fn history_since(
        &self,
        phone: &Phone,
        id: u64,
    ) -> impl Iterator<Item = anyhow::Result<Option<Record>>> + '_ {
        let range = id
            .checked_add(1)
            .map(|from| history_key(phone, from)..=history_key(phone, u64::MAX));
        range
            .into_iter()
            .flat_map(|r| self.history.range(r).values())
            .map(|entry| {
                let entry = entry?;
                Ok(codec::decode::<HistoryEntry>(HISTORY_VERSION, &entry)
                    .ok()
                    .map(|h| h.record))
            })
    }

    /// Messages waiting in the outbox (kept as they change, not counted per call).
    pub fn outbox_len(&self) -> usize {
        self.counts[OUTBOX].load(Relaxed).max(0) as usize
    }

    /// Stores a retry's new state, unless the message was erased meanwhile.
    pub fn outbox_update(&self, id: u64, msg: &OutMessage) -> anyhow::Result<()> {
        let key = id.to_be_bytes();
        let value = codec::encode(OUT_VERSION, msg);
        self.outbox
            .transaction(|t| {
                if t.get(&key[..])?.is_some() {
                    t.insert(&key[..], value.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<Abort>>(())
            })
            .map_err(|e| anyhow::anyhow!("updating outbox message {id}: {:?}", self.written(e)))
    }

    /// Moves a message out of the outbox with its final record, atomically. No record when
    /// the message is gone: its number was erased while it was being sent.
    pub fn outbox_finish(&self, id: u64, delivery: &Delivery) -> anyhow::Result<()> {
        let key = id.to_be_bytes();
        let value = codec::encode(DELIVERY_VERSION, delivery);
        let sid = delivery.provider_sid.clone();
        let (queued, sent) = (
            phone_index_key(&delivery.phone, OUTBOX_TAG, id),
            phone_index_key(&delivery.phone, DELIVERY_TAG, id),
        );
        let trees = (
            &self.outbox,
            &self.deliveries,
            &self.sids,
            &self.by_phone,
            &self.meta,
            &self.early_reports,
        );
        let delta = trees
            .transaction(|(outbox, deliveries, sids, by_phone, meta, early)| {
                let mut delta: Counts = [0; COUNTS];
                // A report that came before this record is taken now (removed also when
                // the message was erased meanwhile and leaves no record).
                let report = match &sid {
                    Some(sid) => early.remove(sid.as_bytes())?,
                    None => None,
                };
                // Erased while it was being sent: leave no record of the number behind.
                if outbox.remove(&key[..])?.is_none() {
                    return Ok(delta);
                }
                delta[OUTBOX] = -1;
                keep_counts(meta, &delta)?;
                by_phone.remove(queued.as_slice())?;
                by_phone.insert(sent.as_slice(), &[][..])?;
                match report.and_then(|r| codec::decode::<Report>(REPORT_VERSION, &r).ok()) {
                    Some(report) => {
                        let mut d = delivery.clone();
                        report.apply(&mut d);
                        deliveries.insert(&key[..], codec::encode(DELIVERY_VERSION, &d))?;
                    }
                    None => {
                        deliveries.insert(&key[..], value.as_slice())?;
                    }
                }
                if let Some(sid) = &sid {
                    sids.insert(sid.as_bytes(), &key[..])?;
                }
                Ok::<_, ConflictableTransactionError<Abort>>(delta)
            })
            .map_err(|e| anyhow::anyhow!("finishing outbox message {id}: {:?}", self.written(e)))?;
        self.counted(&delta);
        Ok(())
    }

    /// What became of `phone`'s latest `n` messages, oldest first, found through the
    /// per-number index: each still queued, or its delivery record. An entry that cannot be
    /// read is its error, in its place; a storage error is an error.
    pub fn messages_of(&self, phone: &Phone, n: usize) -> anyhow::Result<Vec<(u64, Sent)>> {
        let mut found = Vec::new();
        for tag in [OUTBOX_TAG, DELIVERY_TAG] {
            let range = phone_index_key(phone, tag, 0)..=phone_index_key(phone, tag, u64::MAX);
            for k in self.by_phone.range(range).keys().rev().take(n) {
                let k = k?;
                let Some(id) = index_id(&k) else {
                    continue;
                };
                let key = id.to_be_bytes();
                let got = if tag == OUTBOX_TAG {
                    self.outbox
                        .get(key)?
                        .map(|v| decode_out(&v).map_or_else(Sent::Unreadable, Sent::Queued))
                } else {
                    self.deliveries.get(key)?.map(|v| {
                        codec::decode(DELIVERY_VERSION, &v)
                            .map_or_else(Sent::Unreadable, Sent::Ended)
                    })
                };
                found.extend(got.map(|g| (id, g)));
            }
        }
        // A message sent between the two walks is in both: its record is what stands.
        found.sort_by_key(|(id, sent)| (*id, matches!(sent, Sent::Queued(_))));
        found.dedup_by_key(|(id, _)| *id);
        let older = found.len().saturating_sub(n);
        Ok(found.split_off(older))
    }

    /// The delivery record for a provider message id.
    pub fn delivery_by_sid(&self, sid: &str) -> anyhow::Result<Option<(u64, Delivery)>> {
        let Some(id) = self.sids.get(sid)? else {
            return Ok(None);
        };
        let Some(v) = self.deliveries.get(&id)? else {
            return Ok(None);
        };
        let id = u64::from_be_bytes(id.as_ref().try_into().context("delivery id")?);
        Ok(Some((id, codec::decode(DELIVERY_VERSION, &v)?)))
    }

    /// Applies a delivery report to the message the provider id names, in one transaction:
    /// an erase or another report landing meanwhile is neither undone nor overwritten.
    /// Returns the message's number, or `None` when no message has that id (never sent by
    /// this daemon, erased, or not recorded yet) or its record cannot be read.
    ///
    /// The provider may report on a message before its answer to the send is recorded: a
    /// report for an id not known while the outbox has a send in flight (it may be that
    /// one's) is kept, and applied when that message's record is stored. One no message
    /// claims (it was another's: an OTP API text's, whose ids are not recorded) goes ten
    /// minutes later, when another is kept or at a start.
    pub fn report(&self, sid: &str, report: &Report) -> anyhow::Result<Option<Phone>> {
        // Read first: with no send in flight now, every message the provider has an id for
        // is recorded already (a send's record is stored before it stops being in flight).
        let in_flight = self.sending.load(SeqCst) > 0;
        let found = (&self.sids, &self.deliveries)
            .transaction(|(sids, deliveries)| {
                let Some(id) = sids.get(sid)? else {
                    return Ok(Err(()));
                };
                let Some(v) = deliveries.get(&id)? else {
                    return Ok(Ok(None));
                };
                // One that cannot be read stops only itself: the report is not applied to it,
                // and the caller goes on as for a message it has no record of (a 21610 still
                // opts out the number the report names).
                let mut d = match codec::decode::<Delivery>(DELIVERY_VERSION, &v) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!("a delivery report for a record that cannot be read: {e}");
                        return Ok(Ok(None));
                    }
                };
                let before = d.clone();
                report.apply(&mut d);
                if d != before {
                    deliveries.insert(&id, codec::encode(DELIVERY_VERSION, &d))?;
                }
                Ok::<_, ConflictableTransactionError<Abort>>(Ok(Some(d.phone)))
            })
            .map_err(|e| anyhow::anyhow!("updating a delivery: {:?}", self.written(e)))?;
        match found {
            Ok(phone) => Ok(phone),
            Err(()) if in_flight => {
                self.keep_early_report(sid, report)?;
                Ok(None)
            }
            Err(()) => Ok(None),
        }
    }

    /// Keeps a report for a message not recorded yet (see [`Store::report`]), unless it is
    /// recorded by now (then it is applied), or a report kept for it is further along (two
    /// early ones may come out of order). Drops kept ones that have waited too long.
    fn keep_early_report(&self, sid: &str, report: &Report) -> anyhow::Result<()> {
        // At most once a minute: the tree is small, but a report should not pay for a walk.
        let at = report.at.timestamp_millis();
        let swept = self.early_swept_at.load(Relaxed);
        if at.saturating_sub(swept) >= 60_000
            && self
                .early_swept_at
                .compare_exchange(swept, at, Relaxed, Relaxed)
                .is_ok()
        {
            self.drop_stale_early_reports(report.at - EARLY_REPORT_KEPT)?;
        }
        let applied = (&self.sids, &self.deliveries, &self.early_reports)
            .transaction(|(sids, deliveries, early)| {
                // Recorded since the look above: applied as any report is.
                if let Some(id) = sids.get(sid)? {
                    if let Some(Ok(mut d)) = deliveries
                        .get(&id)?
                        .map(|v| codec::decode::<Delivery>(DELIVERY_VERSION, &v))
                    {
                        report.apply(&mut d);
                        deliveries.insert(&id, codec::encode(DELIVERY_VERSION, &d))?;
                    }
                    return Ok(true);
                }
                let mut kept = report.clone();
                if let Some(Ok(earlier)) =
                    (early.get(sid)?).map(|v| codec::decode::<Report>(REPORT_VERSION, &v))
                {
                    if Report::rank(&earlier.status) > Report::rank(&kept.status) {
                        kept = earlier;
                    } else {
                        kept.error_code = kept.error_code.or(earlier.error_code);
                    }
                }
                early.insert(sid, codec::encode(REPORT_VERSION, &kept))?;
                Ok::<_, ConflictableTransactionError<Abort>>(false)
            })
            .map_err(|e| {
                anyhow::anyhow!("keeping an early delivery report: {:?}", self.written(e))
            })?;
        if applied {
            tracing::debug!("a delivery report came as its message was recorded");
        }
        Ok(())
    }

    /// Drops kept early reports (see [`Store::report`]) made before `before`, and any that
    /// cannot be read.
    fn drop_stale_early_reports(&self, before: DateTime<Utc>) -> anyhow::Result<()> {
        for kv in self.early_reports.iter() {
            let (k, v) = kv?;
            let stale = codec::decode::<Report>(REPORT_VERSION, &v).map_or(true, |r| r.at < before);
            if stale {
                self.early_reports
                    .compare_and_swap(&k, Some(v), None::<&[u8]>)
                    .map_err(|e| self.wrote(e))?
                    .ok();
            }
        }
        Ok(())
    }

    /// Marks an outbox send in flight until the guard drops (after its record is stored):
    /// meanwhile a report for an unknown message id is kept for it (see [`Store::report`]).
    pub fn send_in_flight(&self) -> InFlight<'_> {
        self.sending.fetch_add(1, SeqCst);
        InFlight(&self.sending)
    }

    /// The schema this open upgraded the data dir from (an older smsflow refuses it now).
    pub fn upgraded_from(&self) -> Option<(u64, u64)> {
        self.upgraded_from.map(|old| (old, SCHEMA))
    }

    /// Early reports kept, waiting for their message's record.
    pub fn early_report_count(&self) -> usize {
        self.early_reports.len()
    }

    /// Every delivery record, oldest first.
    pub fn deliveries(&self) -> impl Iterator<Item = anyhow::Result<(u64, Delivery)>> + '_ {
        self.deliveries
            .iter()
            .map(|kv| by_id(kv, "deliveries", |b| codec::decode(DELIVERY_VERSION, b)))
    }

    // ---- operators -----------------------------------------------------------

    /// Subscribers per state, in [`State::NAMES`] order, counted by reading every record
    /// ([`Store::state_counts`] is the kept figure).
    /// A record whose state cannot be read is logged and left out, not fatal: this runs at
    /// open, and one bad record must not keep the daemon from starting.
    pub fn count_states(&self) -> anyhow::Result<[u64; 5]> {
        let mut counts = [0u64; 5];
        // A walk by `get_gt`, for the reason given in `subscribers_after`.
        let mut next = self.subscribers.first()?;
        while let Some((key, value)) = next {
            match codec::state_of_record(&value) {
                Ok(state) => counts[state_index(&state)] += 1,
                Err(e) => {
                    let who = Listed::masked_key(&String::from_utf8_lossy(&key));
                    tracing::warn!("not counting the record of {who}: {e}");
                }
            }
            next = self.subscribers.get_gt(&key)?;
        }
        Ok(counts)
    }

    /// Erases a number: its record (with its kept replies), timer, queued messages, history and
    /// delivery records. Returns false if it was unknown.
    /// Only the engine's writer calls this, so nothing re-creates the number meanwhile.
    pub fn erase(&self, phone: &Phone) -> anyhow::Result<bool> {
        let Some(raw) = self.subscribers.get(phone.as_str().as_bytes())? else {
            return Ok(false);
        };
        let mut prefix = phone.as_str().as_bytes().to_vec();
        prefix.push(0);
        let keys = |t: &sled::Tree| -> anyhow::Result<Vec<sled::IVec>> {
            t.scan_prefix(&prefix).keys().map(|k| Ok(k?)).collect()
        };
        let history = keys(&self.history)?;
        // Its pending timer, which the record names. A record that cannot be read (corrupt, or
        // written by a newer smsflow) is erased all the same; its timers are found by a scan.
        let timers: Vec<Vec<u8>> = match codec::decode_subscriber(&raw) {
            Ok(sub) => sub
                .timer
                .map(|t| timer_key(&t, phone))
                .into_iter()
                .collect(),
            Err(e) => {
                tracing::warn!(phone = %phone.masked(), "erasing an unreadable record ({e}); its timers are found by a scan");
                let mine =
                    |k: &sled::IVec| k.len() > 9 && &k[8..k.len() - 1] == phone.as_str().as_bytes();
                let mut found = Vec::new();
                for k in self.timers.iter().keys() {
                    // A storage error ends the erase (the caller is told): skipping it could
                    // leave a timer behind.
                    let k = k?;
                    if mine(&k) {
                        found.push(k.to_vec());
                    }
                }
                found
            }
        };
        // What the erase does to the kept counts: one fewer in its state. When even its state
        // cannot be read, the states are counted again, before the transaction (only the
        // writer changes subscribers, so nothing moves meanwhile), and the kept counts are set
        // inside it: a crash cannot keep the erase and lose the count.
        let mut erased: Counts = [0; COUNTS];
        match codec::state_of_record(&raw) {
            Ok(was) => erased[state_index(&was)] = -1,
            Err(_) => {
                let (states, kept) = (self.count_states()?, self.state_counts());
                for (i, n) in states.iter().enumerate() {
                    erased[i] = *n as i64 - kept[i];
                }
            }
        }
        // Its messages' ids, queued or sent. One queued now may be sent before the transaction
        // below; the transaction removes both forms of every id, so it is gone either way.
        let mut ids: Vec<u64> = Vec::new();
        for k in self.by_phone.scan_prefix(&prefix).keys() {
            let k = k?;
            let id = index_id(&k).context("phone index key")?;
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        let trees = (
            &self.subscribers,
            &self.timers,
            &self.outbox,
            &self.history,
            &self.deliveries,
            &self.sids,
            &self.by_phone,
            &self.meta,
        );
        let delta = trees
            .transaction(
                |(subs, timer_tree, out, hist, dels, sids, by_phone, meta)| {
                    let mut delta: Counts = match subs.remove(phone.as_str().as_bytes())? {
                        Some(_) => erased,
                        None => [0; COUNTS],
                    };
                    for k in &timers {
                        delta[TIMERS] -= i64::from(timer_tree.remove(k.as_slice())?.is_some());
                    }
                    for k in &history {
                        hist.remove(k)?;
                    }
                    for id in &ids {
                        let key = id.to_be_bytes();
                        delta[OUTBOX] -= i64::from(out.remove(&key[..])?.is_some());
                        if let Some(d) = dels.remove(&key[..])? {
                            let sid = codec::decode::<Delivery>(DELIVERY_VERSION, &d)
                                .ok()
                                .and_then(|d| d.provider_sid);
                            if let Some(sid) = sid {
                                sids.remove(sid.as_bytes())?;
                            }
                        }
                        by_phone.remove(phone_index_key(phone, OUTBOX_TAG, *id))?;
                        by_phone.remove(phone_index_key(phone, DELIVERY_TAG, *id))?;
                    }
                    keep_counts(meta, &delta)?;
                    Ok::<_, ConflictableTransactionError<Abort>>(delta)
                },
            )
            .map_err(|e| anyhow::anyhow!("erasing {}: {:?}", phone.masked(), self.written(e)))?;
        self.counted(&delta);
        self.erasures.fetch_add(1, Relaxed);
        Ok(true)
    }

    // ---- retention -----------------------------------------------------------

    /// Deletes history entries and delivery records from before `before`, a few hundred at
    /// a time, until done or until `stop` says so. Subscribers and queued messages are never
    /// touched. Returns how many history entries and delivery records went.
    pub fn prune(
        &self,
        before: DateTime<Utc>,
        stop: impl Fn() -> bool,
    ) -> anyhow::Result<(u64, u64)> {
        const CHUNK: usize = 256;
        let mut history = 0u64;
        let mut old: Vec<sled::IVec> = Vec::new();
        let mut drop_history = |keys: &mut Vec<sled::IVec>| -> anyhow::Result<()> {
            let mut batch = sled::Batch::default();
            for k in keys.drain(..) {
                batch.remove(k);
                history += 1;
            }
            self.history.apply_batch(batch).map_err(|e| self.wrote(e))?;
            Ok(())
        };
        // A number with messages still queued keeps its history until they are gone: the
        // send-time check reads it (`opted_out_since`). One look per number.
        let mut queued: Option<(Vec<u8>, bool)> = None;
        for (scanned, kv) in walk(&self.history, None).enumerate() {
            if scanned % 1024 == 1023 && stop() {
                drop_history(&mut old)?;
                return Ok((history, 0));
            }
            let (k, v) = kv?;
            // An entry that cannot be read is left for an operator, not guessed at.
            if !codec::decode::<HistoryEntry>(HISTORY_VERSION, &v).is_ok_and(|h| h.at < before) {
                continue;
            }
            // The number's part of the key: `phone ++ 0`.
            let number = &k[..k.len().saturating_sub(8)];
            let waiting = match &queued {
                Some((n, waiting)) if n.as_slice() == number => *waiting,
                _ => {
                    // (A storage error here keeps the history, as a queued message would.)
                    let waiting = self.queued_under(number).unwrap_or(true);
                    queued = Some((number.to_vec(), waiting));
                    waiting
                }
            };
            if !waiting {
                old.push(k);
            }
            if old.len() >= CHUNK {
                drop_history(&mut old)?;
                if stop() {
                    return Ok((history, 0));
                }
            }
        }
        drop_history(&mut old)?;

        let mut deliveries = 0u64;
        let mut ids: Vec<u64> = Vec::new();
        for (scanned, kv) in walk(&self.deliveries, None).enumerate() {
            if scanned % 1024 == 1023 && stop() {
                deliveries += self.drop_deliveries(&ids, before)?;
                return Ok((history, deliveries));
            }
            let (k, v) = kv?;
            let is_old = codec::decode::<Delivery>(DELIVERY_VERSION, &v)
                .is_ok_and(|d| d.updated_at < before);
            if let (true, Ok(id)) = (is_old, <[u8; 8]>::try_from(k.as_ref())) {
                ids.push(u64::from_be_bytes(id));
            }
            if ids.len() >= CHUNK {
                deliveries += self.drop_deliveries(&std::mem::take(&mut ids), before)?;
                if stop() {
                    return Ok((history, deliveries));
                }
            }
        }
        deliveries += self.drop_deliveries(&ids, before)?;
        Ok((history, deliveries))
    }

    /// Removes these delivery records (with their provider-id and per-number index entries)
    /// if they are still there and still older than `before`, in one transaction.
    fn drop_deliveries(&self, ids: &[u64], before: DateTime<Utc>) -> anyhow::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        (&self.deliveries, &self.sids, &self.by_phone)
            .transaction(|(deliveries, sids, by_phone)| {
                let mut gone = 0u64;
                for id in ids {
                    let key = id.to_be_bytes();
                    let Some(v) = deliveries.get(&key[..])? else {
                        continue;
                    };
                    let Ok(d) = codec::decode::<Delivery>(DELIVERY_VERSION, &v) else {
                        continue;
                    };
                    if d.updated_at >= before {
                        continue;
                    }
                    deliveries.remove(&key[..])?;
                    if let Some(sid) = &d.provider_sid {
                        // Only if the id still names this record.
                        if sids.get(sid.as_bytes())?.as_deref() == Some(&key[..]) {
                            sids.remove(sid.as_bytes())?;
                        }
                    }
                    by_phone.remove(phone_index_key(&d.phone, DELIVERY_TAG, *id))?;
                    gone += 1;
                }
                Ok::<_, ConflictableTransactionError<Abort>>(gone)
            })
            .map_err(|e| anyhow::anyhow!("deleting old delivery records: {:?}", self.written(e)))
    }

    // ---- history -----------------------------------------------------------

    /// The number's latest history entry, if any (and readable).
    pub fn last_history(&self, phone: &Phone) -> anyhow::Result<Option<HistoryEntry>> {
        Ok(self.history(phone, 1)?.pop().and_then(Result::ok))
    }

    /// The last `n` history entries of a number, oldest first; an entry that cannot be read
    /// is its error, in its place. A storage error is an error.
    pub fn history(
        &self,
        phone: &Phone,
        n: usize,
    ) -> anyhow::Result<Vec<Result<HistoryEntry, codec::CodecError>>> {
        let mut prefix = phone.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.history.scan_prefix(&prefix).rev().take(n) {
            let (_, v) = kv?;
            out.push(codec::decode(HISTORY_VERSION, &v));
        }
        out.reverse();
        Ok(out)
    }
}

/// A [`Commit`] turned into keys and bytes, ready for [`Store::commit_prepared`].
pub struct Prepared {
    phone: Option<Phone>,
    /// The record and its state's index (for the kept counts).
    subscriber: Option<(Vec<u8>, usize)>,
    remove_timers: Vec<Vec<u8>>,
    /// The timer consumed by this event: its key and epoch.
    fired: Option<(Vec<u8>, [u8; 8])>,
    add_timers: Vec<(Vec<u8>, [u8; 8])>,
    outgoing: Vec<Vec<u8>>,
    history: Vec<Vec<u8>>,
}

impl Prepared {
    pub fn new(c: &Commit, now: DateTime<Utc>) -> Prepared {
        let phone = c.subscriber.as_ref().map(|s| s.phone.clone());
        let keys = |ts: &[Timer]| -> Vec<(Vec<u8>, [u8; 8])> {
            match &phone {
                Some(p) => ts
                    .iter()
                    .map(|t| (timer_key(t, p), t.epoch.to_be_bytes()))
                    .collect(),
                None => Vec::new(),
            }
        };
        let remove_timers: Vec<Vec<u8>> = keys(&c.cancel).into_iter().map(|(k, _)| k).collect();
        let fired = c
            .fired
            .as_ref()
            .map(|f| (f.key.clone(), f.timer.epoch.to_be_bytes()));
        let outgoing = match &phone {
            Some(p) => c
                .outgoing
                .iter()
                .map(|(body, secret)| {
                    codec::encode(
                        OUT_VERSION,
                        &OutMessage {
                            phone: p.clone(),
                            body: body.clone(),
                            secret: *secret,
                            attempts: 0,
                            next_try: now,
                            created_at: now,
                            last_error: None,
                            follow_up: c.follow_up && !*secret,
                            code_expires_at: c.code_expires_at.filter(|_| *secret),
                            uncertain: 0,
                        },
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        Prepared {
            subscriber: c
                .subscriber
                .as_ref()
                .map(|s| (codec::encode_record(s, &c.replies), state_index(&s.state))),
            remove_timers,
            fired,
            add_timers: keys(&c.schedule),
            outgoing,
            history: c
                .history
                .iter()
                .map(|h| codec::encode(HISTORY_VERSION, h))
                .collect(),
            phone,
        }
    }
}

fn millis(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

/// Big-endian due time first, so a range scan yields timers in due order.
fn timer_key(t: &Timer, phone: &Phone) -> Vec<u8> {
    let mut k = millis(t.at).to_be_bytes().to_vec();
    k.extend_from_slice(phone.as_str().as_bytes());
    k.push(match t.kind {
        TimerKind::Step => b's',
        TimerKind::AskTimeout => b't',
    });
    k
}

fn key_time(k: &[u8]) -> Option<DateTime<Utc>> {
    let ms = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

fn parse_timer(k: &[u8], v: &[u8]) -> Option<DueTimer> {
    let at = key_time(k)?;
    let (kind, phone) = k[8..].split_last()?;
    let kind = match kind {
        b's' => TimerKind::Step,
        b't' => TimerKind::AskTimeout,
        _ => return None,
    };
    let phone = Phone::from_stored(String::from_utf8(phone.to_vec()).ok()?).ok()?;
    let epoch = u64::from_be_bytes(v.try_into().ok()?);
    Some(DueTimer {
        phone,
        timer: Timer { at, kind, epoch },
        key: k.to_vec(),
    })
}

/// Tags of the phone index: a queued message, a sent (or failed) one.
const OUTBOX_TAG: u8 = b'o';
const DELIVERY_TAG: u8 = b'd';
/// The meta key holding the flows' places as JSON, to find places removed while stopped.
const FLOWS_PLACES: &str = "flows_places";
const FLOWS_FIELDS: &str = "flows_fields";

/// The meta key holding [`Counts`] (big-endian i64s).
const COUNTS_KEY: &str = "counts";
/// The codes counted against `verify.max_codes_per_hour`, by minute, oldest first: each the
/// minute's start in milliseconds since the epoch (8 bytes) and its count (4), big-endian.
const CODES_HOUR_KEY: &str = "codes_by_minute";
/// Subscribers per state (5), then timers, then queued messages.
const COUNTS: usize = 7;
const TIMERS: usize = 5;
const OUTBOX: usize = 6;
type Counts = [i64; COUNTS];

fn encode_counts(c: &Counts) -> Vec<u8> {
    c.iter().flat_map(|n| n.to_be_bytes()).collect()
}

fn decode_counts(bytes: &[u8]) -> Option<Counts> {
    if bytes.len() != 8 * COUNTS {
        return None;
    }
    let mut out = [0i64; COUNTS];
    for (n, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *n = i64::from_be_bytes(chunk.try_into().ok()?);
    }
    Some(out)
}

/// An entry of a tree keyed by big-endian id (`tree` names it in errors), decoded.
fn by_id<T>(
    kv: sled::Result<(sled::IVec, sled::IVec)>,
    tree: &'static str,
    decode: impl Fn(&[u8]) -> Result<T, codec::CodecError>,
) -> anyhow::Result<(u64, T)> {
    let (k, v) = kv?;
    let id = u64::from_be_bytes(
        k.as_ref()
            .try_into()
            .map_err(|_| codec::CodecError::Key(tree))?,
    );
    Ok((id, decode(&v)?))
}

/// Adds a transaction's count changes to the stored counts, inside that transaction.
fn keep_counts(
    meta: &sled::transaction::TransactionalTree,
    delta: &Counts,
) -> Result<(), ConflictableTransactionError<Abort>> {
    if delta.iter().all(|d| *d == 0) {
        return Ok(());
    }
    let mut counts = meta
        .get(COUNTS_KEY)?
        .and_then(|v| decode_counts(&v))
        .unwrap_or_default();
    for (n, d) in counts.iter_mut().zip(delta) {
        *n = n.saturating_add(*d);
    }
    meta.insert(COUNTS_KEY, encode_counts(&counts))?;
    Ok(())
}

/// The meta key saying the phone index covers every message.
const PHONE_INDEX_BUILT: &str = "by_phone_built";

/// A tree's entries in key order after `after` (from the first when `None`), by `get_gt`, not
/// one `sled::Iter`: an iterator reads each leaf page once, and sled only counts a page against
/// its cache after 64 reads land in the page's cache shard, so a long scan kept ~16k pages
/// resident (98 MiB at a million numbers). Looking up each key counts every read, and the
/// cache stays within its capacity. A storage error ends the walk.
fn walk(
    tree: &sled::Tree,
    after: Option<Vec<u8>>,
) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + '_ {
    let mut last = after;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let next = match &last {
            Some(key) => tree.get_gt(key),
            None => tree.first(),
        };
        match next {
            Ok(Some((k, v))) => {
                last = Some(k.to_vec());
                Some(Ok((k, v)))
            }
            Ok(None) => {
                done = true;
                None
            }
            Err(e) => {
                done = true;
                Some(Err(e))
            }
        }
    })
}

fn phone_index_key(phone: &Phone, tag: u8, id: u64) -> Vec<u8> {
    let mut rest = vec![tag];
    rest.extend_from_slice(&id.to_be_bytes());
    prefixed(phone, &rest)
}

/// The message id a phone index key ends with.
fn index_id(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(8)?;
    key[at..].try_into().ok().map(u64::from_be_bytes)
}

fn history_key(phone: &Phone, id: u64) -> Vec<u8> {
    prefixed(phone, &id.to_be_bytes())
}

/// `phone ++ 0 ++ rest`: everything of one number under one prefix, so it can be erased.
fn prefixed(phone: &Phone, rest: &[u8]) -> Vec<u8> {
    let mut k = phone.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn state_index(s: &State) -> usize {
    State::NAMES
        .iter()
        .position(|n| *n == s.name())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{io_text, Store};

    #[test]
    fn a_failed_fdatasync_fails_that_flush_and_every_later_one_though_the_disk_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let places = [("welcome".to_string(), "flows/welcome.toml".to_string())];
        store.set_flows_places(&places).unwrap();
        store.flush().unwrap();
        assert_eq!(store.failure(), None);
        // fdatasync of a device file fails (EINVAL), as a failing disk's would.
        let real = std::mem::replace(
            &mut store.log_file,
            std::fs::File::open("/dev/null").unwrap(),
        );
        store.set_flows_places(&places).unwrap();
        let failed = format!("{:#}", store.flush().unwrap_err());
        assert!(failed.contains("Invalid argument"), "{failed}");
        let kept = store.failure().expect("the failure is kept");
        assert!(kept.contains("Invalid argument"), "{kept}");
        // The kernel may have dropped the pages that failed: a later fdatasync that succeeds
        // would not say so, so nothing written since counts as durable.
        store.log_file = real;
        let again = format!("{:#}", store.flush().unwrap_err());
        assert!(again.contains("the disk under it failed"), "{again}");
    }

    #[test]
    fn a_kept_io_error_reads_as_its_message_not_as_debug_text() {
        let kept = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            r#"Os { code: 28, kind: StorageFull, message: "No space left on device" }"#,
        );
        assert_eq!(
            io_text(&sled::Error::Io(kept)),
            "No space left on device (no storage space)"
        );
        let first = std::io::Error::from_raw_os_error(28);
        assert_eq!(
            io_text(&sled::Error::Io(first)),
            "No space left on device (os error 28)"
        );
        assert_eq!(
            io_text(&sled::Error::Unsupported("x".into())),
            sled::Error::Unsupported("x".into()).to_string()
        );
    }
}
