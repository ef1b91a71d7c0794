//! The store's own bookkeeping, below the daemon.

use chrono::{Duration, Utc};
use smsflow::machine::{State, Subscriber, Timer, TimerKind};
use smsflow::phone::Phone;
use smsflow::store::{Commit, Delivery, Store};

use crate::helpers::reopen;

fn timer(at: chrono::DateTime<Utc>) -> Timer {
    Timer {
        at,
        kind: TimerKind::Step,
        epoch: 1,
    }
}

#[test]
fn timer_and_outbox_counts_follow_every_change_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = Utc::now();
    let phone = Phone::parse("+14155550100").expect("phone");
    let later = timer(now + Duration::hours(1));
    {
        let store = Store::open(dir.path()).expect("open");
        let commit = |c: Commit| store.commit_many(&[c], now).expect("commit");
        // The record names its pending timer, as the state machine keeps it.
        let mut sub = Subscriber::new(phone.clone(), now);
        sub.timer = Some(later);
        let with = |c: Commit| Commit {
            subscriber: Some(sub.clone()),
            ..c
        };
        commit(with(Commit {
            schedule: vec![later],
            outgoing: vec![("one".into(), false), ("two".into(), false)],
            ..Commit::default()
        }));
        assert_eq!((store.timer_count(), store.outbox_len()), (1, 2));

        // The same timer again replaces it; cancelling one that is not there changes nothing.
        commit(with(Commit {
            schedule: vec![later],
            cancel: vec![timer(now + Duration::hours(2))],
            ..Commit::default()
        }));
        assert_eq!(store.timer_count(), 1);

        let (id, _) = store.outbox().next().expect("queued").expect("readable");
        let delivery = Delivery {
            phone: phone.clone(),
            status: "sent".into(),
            provider_sid: Some("SM1".into()),
            error_code: None,
            error: None,
            attempts: 1,
            updated_at: now,
        };
        store.outbox_finish(id, &delivery).expect("finish");
        // Finishing it twice (a retry racing an erase) does not count twice.
        store.outbox_finish(id, &delivery).expect("finish again");
        assert_eq!(store.outbox_len(), 1);
        store.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    assert_eq!((store.timer_count(), store.outbox_len()), (1, 1));
    store.erase(&phone).expect("erase");
    assert_eq!((store.timer_count(), store.outbox_len()), (0, 0));
}

fn sent(phone: &Phone, sid: &str) -> Delivery {
    Delivery {
        phone: phone.clone(),
        status: "sent".into(),
        provider_sid: Some(sid.into()),
        error_code: None,
        error: None,
        attempts: 1,
        updated_at: Utc::now(),
    }
}

/// Queues `n` messages for each number and marks the first of each sent.
fn two_numbers_with_messages(store: &Store, a: &Phone, b: &Phone) {
    let now = Utc::now();
    for (p, sid) in [(a, "SMa"), (b, "SMb")] {
        let commit = Commit {
            subscriber: Some(Subscriber::new(p.clone(), now)),
            outgoing: vec![("first".into(), false), ("second".into(), false)],
            ..Commit::default()
        };
        store.commit_many(&[commit], now).expect("commit");
        let (id, _) = store
            .outbox()
            .map(|m| m.expect("readable"))
            .find(|(_, m)| m.phone == *p)
            .expect("queued");
        store.outbox_finish(id, &sent(p, sid)).expect("finish");
    }
}

/// A delivery record that cannot be read stops only itself: a report for it is answered as
/// for a message with no record (so a 21610 still opts out the number the report names).
#[test]
fn a_report_for_an_unreadable_delivery_record_reads_as_no_record() {
    let (dir, store, a, _) = two_numbers_in_a_new_store();
    let (id, _) = store
        .deliveries()
        .map(|d| d.expect("readable"))
        .find(|(_, d)| d.phone == a)
        .expect("a's record");
    drop(store);
    {
        let db = reopen(|| sled::open(dir.path()));
        db.open_tree("deliveries")
            .and_then(|t| t.insert(id.to_be_bytes(), &[9u8, 9, 9][..]))
            .expect("damage it");
        db.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    let named = store.report("SMa", &delivered()).expect("no error");
    assert_eq!(named, None);
    assert_eq!(
        store.report("SMb", &delivered()).expect("the other"),
        Some(Phone::parse("+14155550102").unwrap())
    );
}

/// A timer that fired but whose number rescheduled to the very same time meanwhile (a clock
/// set back at the end of quiet hours): consuming the stale one leaves the new one, kept
/// under the same key with a later epoch.
#[test]
fn consuming_a_fired_timer_leaves_a_newer_one_kept_under_the_same_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let now = Utc::now();
    let phone = Phone::parse("+14155550103").expect("phone");
    let timer = |epoch| Timer {
        at: now,
        kind: TimerKind::Step,
        epoch,
    };
    let schedule = |t: Timer| Commit {
        subscriber: Some(Subscriber::new(phone.clone(), now)),
        schedule: vec![t],
        ..Commit::default()
    };
    store
        .commit_many(&[schedule(timer(5))], now)
        .expect("first");
    let fired = store.due_timers(now, 10).expect("due").remove(0);
    assert_eq!(fired.timer.epoch, 5);
    store
        .commit_many(&[schedule(timer(6))], now)
        .expect("the same time again");
    let consumed = Commit {
        fired: Some(fired),
        ..Commit::default()
    };
    store
        .commit_many(&[consumed], now)
        .expect("consume the stale one");
    let left: Vec<u64> = store
        .due_timers(now, 10)
        .expect("due")
        .iter()
        .map(|d| d.timer.epoch)
        .collect();
    assert_eq!(left, [6]);
    assert_eq!(store.timer_count(), 1);
}

/// A new store holding [`two_numbers_with_messages`] (the dir lives as long as the first value).
fn two_numbers_in_a_new_store() -> (tempfile::TempDir, Store, Phone, Phone) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let (a, b) = (
        Phone::parse("+14155550101").expect("a"),
        Phone::parse("+14155550102").expect("b"),
    );
    two_numbers_with_messages(&store, &a, &b);
    (dir, store, a, b)
}

fn messages_of(store: &Store, p: &Phone) -> (usize, usize) {
    let queued = store
        .outbox()
        .filter(|m| m.as_ref().is_ok_and(|(_, m)| m.phone == *p))
        .count();
    let sent = store
        .deliveries()
        .filter(|d| d.as_ref().is_ok_and(|(_, d)| d.phone == *p))
        .count();
    (queued, sent)
}

/// The outbox sends a queued message only once it is on disk: sent before the flush, a crash
/// would bring back the event that queued it, and the message would go out twice.
#[test]
fn a_queued_message_counts_as_durable_only_after_a_flush_and_after_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let (a, now) = (Phone::parse("+14155550101").expect("a"), Utc::now());
    let commit = Commit {
        subscriber: Some(Subscriber::new(a.clone(), now)),
        outgoing: vec![("first".into(), false), ("second".into(), false)],
        ..Commit::default()
    };
    store.commit_many(&[commit], now).expect("commit");
    let ids: Vec<u64> = store.outbox().map(|m| m.expect("readable").0).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| !store.outbox_durable(*id)), "{ids:?}");
    store.flush().expect("flush");
    assert!(ids.iter().all(|id| store.outbox_durable(*id)), "{ids:?}");
    drop(store);
    let store = reopen(|| Store::open(dir.path()));
    assert!(ids.iter().all(|id| store.outbox_durable(*id)), "{ids:?}");
    let later = Commit {
        subscriber: Some(Subscriber::new(a.clone(), now)),
        outgoing: vec![("third".into(), false)],
        ..Commit::default()
    };
    store.commit_many(&[later], now).expect("commit");
    let (third, _) = store.outbox().last().expect("queued").expect("readable");
    assert!(!store.outbox_durable(third) && third > ids[1]);
}

#[test]
fn erasing_a_number_removes_its_queued_and_sent_messages_and_no_one_elses() {
    let (_dir, store, a, b) = two_numbers_in_a_new_store();
    assert_eq!(messages_of(&store, &a), (1, 1));

    store.erase(&a).expect("erase");
    assert_eq!(messages_of(&store, &a), (0, 0));
    assert!(store.delivery_by_sid("SMa").expect("lookup").is_none());
    assert_eq!(messages_of(&store, &b), (1, 1));
    assert!(store.delivery_by_sid("SMb").expect("lookup").is_some());
    assert_eq!(store.outbox_len(), 1);
}

#[test]
fn a_data_dir_from_before_the_phone_index_gets_it_built_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b) = (
        Phone::parse("+14155550101").expect("a"),
        Phone::parse("+14155550102").expect("b"),
    );
    {
        let store = Store::open(dir.path()).expect("open");
        two_numbers_with_messages(&store, &a, &b);
        store.flush().expect("flush");
    }
    {
        // What an older smsflow left: no index and no mark that it was built.
        let db = reopen(|| sled::open(dir.path()));
        db.drop_tree("by_phone").expect("drop index");
        db.open_tree("meta")
            .and_then(|m| m.remove("by_phone_built"))
            .expect("unmark");
        // And one queued message damaged on disk: it stops only itself.
        db.open_tree("outbox")
            .and_then(|o| o.insert(u64::MAX.to_be_bytes(), &[2u8, 0xff][..]))
            .expect("damage");
        db.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    store.erase(&a).expect("erase");
    assert_eq!(messages_of(&store, &a), (0, 0));
    assert_eq!(messages_of(&store, &b), (1, 1));
}

fn in_state(phone: &str, state: State) -> Commit {
    let mut s = Subscriber::new(Phone::parse(phone).expect("phone"), Utc::now());
    s.state = state;
    Commit {
        subscriber: Some(s),
        ..Commit::default()
    }
}

/// The kept counts next to a count made by reading every record.
fn counts_of(store: &Store) -> ([i64; 5], [i64; 5]) {
    let scanned = store.count_states().expect("scan").map(|n| n as i64);
    (store.state_counts(), scanned)
}

#[test]
fn subscriber_counts_per_state_follow_every_change_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = Utc::now();
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .commit_many(
                &[
                    in_state("+14155550101", State::Unverified),
                    in_state("+14155550102", State::Verified),
                    in_state("+14155550103", State::OptedOut),
                ],
                now,
            )
            .expect("commit");
        assert_eq!(counts_of(&store), ([1, 0, 1, 0, 1], [1, 0, 1, 0, 1]));

        // A number moving on is counted once, in its new state, even twice in one batch.
        let moved = |step| {
            in_state(
                "+14155550102",
                State::InSequence {
                    name: "gentle".into(),
                    step,
                    waiting: false,
                },
            )
        };
        store
            .commit_many(&[moved(0), moved(1)], now)
            .expect("commit");
        store
            .erase(&Phone::parse("+14155550103").expect("phone"))
            .expect("erase");
        assert_eq!(counts_of(&store), ([1, 0, 0, 1, 0], [1, 0, 0, 1, 0]));
        store.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    assert_eq!(store.state_counts(), [1, 0, 0, 1, 0]);
}

#[test]
fn a_data_dir_from_before_the_kept_counts_is_counted_once_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .commit_many(
                &[
                    in_state("+14155550101", State::Verified),
                    in_state("+14155550102", State::Verified),
                    Commit {
                        schedule: vec![timer(Utc::now() + Duration::hours(1))],
                        outgoing: vec![("queued".into(), false)],
                        ..in_state("+14155550103", State::AwaitingCode)
                    },
                ],
                Utc::now(),
            )
            .expect("commit");
        store.flush().expect("flush");
    }
    {
        // What an older smsflow left: no counts in meta.
        let db = reopen(|| sled::open(dir.path()));
        db.open_tree("meta")
            .and_then(|m| m.remove("counts"))
            .expect("remove counts");
        db.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    assert_eq!(counts_of(&store), ([0, 1, 2, 0, 0], [0, 1, 2, 0, 0]));
    assert_eq!((store.timer_count(), store.outbox_len()), (1, 1));
}

#[test]
fn a_schema_1_data_dir_is_recounted_at_open_and_an_unreadable_record_does_not_stop_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .commit_many(
                &[
                    in_state("+14155550101", State::Verified),
                    in_state("+14155550102", State::OptedOut),
                ],
                Utc::now(),
            )
            .expect("commit");
        store.flush().expect("flush");
    }
    {
        // What an older smsflow leaves after running on this dir: schema 1, counts it did
        // not keep (here: wrong), and a record from a newer version it cannot know.
        let db = reopen(|| sled::open(dir.path()));
        let meta = db.open_tree("meta").expect("meta");
        meta.insert("schema", &1u64.to_be_bytes()).expect("schema");
        meta.insert("counts", &[0u8; 56][..]).expect("counts");
        db.open_tree("subscribers")
            .and_then(|t| t.insert("+14155550103", &[99u8, 1, 2][..]))
            .expect("odd record");
        db.flush().expect("flush");
    }
    {
        let store = reopen(|| Store::open(dir.path()));
        assert_eq!(store.state_counts(), [0, 0, 1, 0, 1]);
        assert_eq!(store.upgraded_from(), Some((1, 11)), "and says so");
    }
    {
        let store = reopen(|| Store::open(dir.path()));
        assert_eq!(store.upgraded_from(), None, "once");
        let fresh = tempfile::tempdir().expect("temp dir");
        let fresh = Store::open(fresh.path()).expect("open");
        assert_eq!(fresh.upgraded_from(), None, "a new dir is no upgrade");
    }
    {
        // Upgraded: schema 11 now, which an older smsflow refuses.
        let db = reopen(|| sled::open(dir.path()));
        let schema = db
            .open_tree("meta")
            .and_then(|m| m.get("schema"))
            .expect("read");
        assert_eq!(schema.as_deref(), Some(&11u64.to_be_bytes()[..]));
        db.open_tree("meta")
            .and_then(|m| m.insert("schema", &12u64.to_be_bytes()))
            .expect("future schema");
        db.flush().expect("flush");
    }
    let refused = loop {
        match Store::open(dir.path()) {
            Err(e) if e.to_string().contains("schema 12") => break e.to_string(),
            // sled lets go of its lock a moment after the drop (see `reopen`).
            Err(e) if e.to_string().contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    };
    assert!(refused.contains("upgrade smsflow"), "{refused}");
}

/// A timer as (hours from the base time, is a step).
type TimerAt = (i64, bool);

/// One number's commit: (number, state, timers scheduled, timers cancelled, messages queued).
type NumberCommit = (usize, usize, Vec<TimerAt>, Vec<TimerAt>, usize);

/// One change a store sees, over a few numbers so that changes collide.
#[derive(Clone, Debug)]
enum Change {
    /// Commits in one transaction.
    Commit(Vec<NumberCommit>),
    Erase(usize),
    /// The outbox worker finishes the oldest queued message (twice: a retry racing it).
    Finish {
        twice: bool,
    },
    /// The earliest timer fires for its number.
    Fire,
}

const NUMBERS: [&str; 3] = ["+14155550101", "+14155550102", "+14155550103"];

fn any_change() -> impl proptest::strategy::Strategy<Value = Change> {
    use proptest::prelude::*;
    let timers = || proptest::collection::vec((0i64..4, any::<bool>()), 0..3);
    prop_oneof![
        4 => proptest::collection::vec((0..NUMBERS.len(), 0..5usize, timers(), timers(), 0..3usize), 1..4)
            .prop_map(Change::Commit),
        1 => (0..NUMBERS.len()).prop_map(Change::Erase),
        2 => any::<bool>().prop_map(|twice| Change::Finish { twice }),
        1 => Just(Change::Fire),
    ]
}

fn state_numbered(n: usize) -> State {
    match n {
        0 => State::Unverified,
        1 => State::AwaitingCode,
        2 => State::Verified,
        3 => State::InSequence {
            name: "gentle".into(),
            step: 1,
            waiting: false,
        },
        _ => State::OptedOut,
    }
}

/// The kept counts (subscribers per state, timers, queued messages) next to the same counts
/// made by reading every tree.
fn kept_and_scanned(store: &Store, far: chrono::DateTime<Utc>) -> (Vec<i64>, Vec<i64>) {
    let mut kept = store.state_counts().to_vec();
    kept.extend([store.timer_count() as i64, store.outbox_len() as i64]);
    let mut scanned: Vec<i64> = store
        .count_states()
        .expect("scan")
        .iter()
        .map(|n| *n as i64)
        .collect();
    scanned.extend([
        store.due_timers(far, usize::MAX).expect("timers").len() as i64,
        store.outbox().count() as i64,
    ]);
    (kept, scanned)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// The counts `/metrics` and the banner read are kept inside the transactions that change
    /// the trees; whatever the mix of commits, erases, sends and fired timers, they equal a
    /// full recount, before and after a reopen.
    #[test]
    fn kept_counts_equal_a_full_recount_after_any_mix_of_changes(
        changes in proptest::collection::vec(any_change(), 1..14)
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let base: chrono::DateTime<Utc> = "2026-03-01T12:00:00Z".parse().expect("time");
        let far = base + Duration::days(30);
        let phone = |i: usize| Phone::parse(NUMBERS[i]).expect("phone");
        let timer_at = |(hours, step): (i64, bool)| Timer {
            at: base + Duration::hours(hours),
            kind: if step { TimerKind::Step } else { TimerKind::AskTimeout },
            epoch: 1,
        };
        {
            let store = Store::open(dir.path()).expect("open");
            for change in &changes {
                match change {
                    Change::Commit(batch) => {
                        let commits: Vec<Commit> = batch
                            .iter()
                            .map(|(n, state, schedule, cancel, queued)| {
                                let mut s = Subscriber::new(phone(*n), base);
                                s.state = state_numbered(*state);
                                s.timer = schedule.last().map(|t| timer_at(*t));
                                Commit {
                                    subscriber: Some(s),
                                    schedule: schedule.iter().map(|t| timer_at(*t)).collect(),
                                    cancel: cancel.iter().map(|t| timer_at(*t)).collect(),
                                    outgoing: (0..*queued).map(|i| (format!("m{i}"), false)).collect(),
                                    ..Commit::default()
                                }
                            })
                            .collect();
                        store.commit_many(&commits, base).expect("commit");
                    }
                    Change::Erase(n) => {
                        store.erase(&phone(*n)).expect("erase");
                    }
                    Change::Finish { twice } => {
                        if let Some(Ok((id, msg))) = store.outbox().next() {
                            let done = sent(&msg.phone, &format!("SM{id}"));
                            store.outbox_finish(id, &done).expect("finish");
                            if *twice {
                                store.outbox_finish(id, &done).expect("finish again");
                            }
                        }
                    }
                    Change::Fire => {
                        if let Some(due) = store.due_timers(far, 1).expect("due").pop() {
                            let s = Subscriber::new(due.phone.clone(), base);
                            let commit = Commit {
                                subscriber: Some(s),
                                fired: Some(due),
                                ..Commit::default()
                            };
                            store.commit_many(&[commit], base).expect("fire");
                        }
                    }
                }
                let (kept, scanned) = kept_and_scanned(&store, far);
                proptest::prop_assert_eq!(kept, scanned, "after {:?}", change);
            }
            store.flush().expect("flush");
        }
        let store = reopen(|| Store::open(dir.path()));
        let (kept, scanned) = kept_and_scanned(&store, far);
        proptest::prop_assert_eq!(kept, scanned, "after a reopen");
    }
}

/// Twilio's report that a message was delivered, now.
fn delivered() -> smsflow::store::Report {
    smsflow::store::Report {
        status: "delivered".into(),
        error_code: None,
        at: chrono::Utc::now(),
    }
}

#[test]
fn a_delivery_report_changes_only_a_message_still_on_record() {
    let (_dir, store, a, b) = two_numbers_in_a_new_store();
    let delivered = &delivered();

    let found = store.report("SMb", delivered).expect("update");
    assert_eq!(found, Some(b.clone()));
    let (_, d) = store.delivery_by_sid("SMb").expect("lookup").expect("kept");
    assert_eq!(d.status, "delivered");

    // A report that lands after an erase must not write the number's record back.
    store.erase(&a).expect("erase");
    let found = store.report("SMa", delivered).expect("update");
    assert_eq!(found, None);
    assert_eq!(messages_of(&store, &a), (0, 0));
    assert_eq!(store.report("SMnever", delivered).expect("update"), None);
}

#[test]
fn the_retention_deletes_old_records_but_keeps_queued_messages_and_the_history_they_need() {
    use smsflow::machine::Record;
    use smsflow::store::HistoryEntry;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let now = Utc::now();
    let long_ago = now - Duration::days(400);
    let phone = Phone::parse("+14155550101").expect("phone");
    let entry = |at, name: &str| HistoryEntry {
        at,
        record: Record::SequenceAssigned { name: name.into() },
    };
    let commit = Commit {
        subscriber: Some(Subscriber::new(phone.clone(), long_ago)),
        history: vec![entry(long_ago, "old"), entry(now, "new")],
        outgoing: vec![
            ("first".into(), false),
            ("second".into(), false),
            ("still queued".into(), false),
        ],
        ..Commit::default()
    };
    store.commit_many(&[commit], long_ago).expect("commit");
    let queued: Vec<u64> = store.outbox().map(|m| m.expect("readable").0).collect();
    let mut old = sent(&phone, "SMold");
    old.updated_at = long_ago;
    store.outbox_finish(queued[0], &old).expect("finish old");
    store
        .outbox_finish(queued[1], &sent(&phone, "SMnew"))
        .expect("finish new");

    // While a message of the number is still queued its history stays: the send-time check
    // reads it (an opt-out after the message was queued stops it).
    let (history, deliveries) = store
        .prune(now - Duration::days(180), || false)
        .expect("prune");
    assert_eq!((history, deliveries), (0, 1));
    assert_eq!(store.history(&phone, 50).expect("history").len(), 2);
    assert!(store.delivery_by_sid("SMold").expect("lookup").is_none());
    // The old message still queued stays: only what is finished is deleted.
    assert_eq!(messages_of(&store, &phone), (1, 1));
    // Nor may a retention forget the number, silent as it has been (see the admin tests).
    let forgettable = |store: &Store| {
        store
            .forgettable_after(None, now - Duration::days(180), 10, 100)
            .expect("walk")
    };
    assert_eq!(forgettable(&store), (vec![], None));
    // Once it has gone, the old entry goes too.
    store
        .outbox_finish(queued[2], &sent(&phone, "SMlast"))
        .expect("finish the last");
    let (history, deliveries) = store
        .prune(now - Duration::days(180), || false)
        .expect("prune");
    assert_eq!((history, deliveries), (1, 0));
    let kept: Vec<Record> = store
        .history(&phone, 50)
        .expect("history")
        .into_iter()
        .map(|h| h.expect("readable").record)
        .collect();
    assert_eq!(kept, vec![Record::SequenceAssigned { name: "new".into() }]);
    assert!(store.delivery_by_sid("SMnew").expect("lookup").is_some());
    assert_eq!(messages_of(&store, &phone), (0, 2));
    assert!(store.subscriber(&phone).expect("read").is_some());
    assert_eq!(forgettable(&store), (vec![phone.clone()], None));
    // Nothing more is old enough the second time.
    assert_eq!(
        store
            .prune(now - Duration::days(180), || false)
            .expect("prune"),
        (0, 0)
    );
}

#[test]
fn erasing_a_record_that_cannot_be_read_removes_its_timer_and_no_one_elses_and_recounts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = Utc::now();
    let due = timer(now + Duration::hours(1));
    // The second number's digits extend the first's: their timer keys share a prefix.
    let short = Phone::parse("+14155550101").expect("phone");
    let long = Phone::from_stored("+141555501012".into()).expect("phone");
    {
        let store = Store::open(dir.path()).expect("open");
        let commits: Vec<Commit> = [&short, &long]
            .iter()
            .map(|p| {
                let mut s = Subscriber::new((*p).clone(), now);
                s.state = State::Verified;
                s.timer = Some(due);
                Commit {
                    subscriber: Some(s),
                    schedule: vec![due],
                    ..Commit::default()
                }
            })
            .collect();
        store.commit_many(&commits, now).expect("commit");
        store.flush().expect("flush");
    }
    {
        let db = reopen(|| sled::open(dir.path()));
        db.open_tree("subscribers")
            .and_then(|t| t.insert(short.as_str(), &[4u8, 0xff, 0xff][..]))
            .expect("damage");
        db.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    assert!(store.erase(&short).expect("erase"));
    let left = store
        .due_timers(now + Duration::days(1), usize::MAX)
        .expect("timers");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].phone, long);
    assert_eq!(store.timer_count(), 1);
    assert_eq!(counts_of(&store), ([0, 0, 1, 0, 0], [0, 0, 1, 0, 0]));
}

#[test]
fn the_outbox_can_be_read_from_after_a_given_message() {
    let (_dir, store, a, _) = two_numbers_in_a_new_store();
    let ids: Vec<u64> = store.outbox().map(|m| m.expect("readable").0).collect();
    assert_eq!(ids.len(), 2);
    let after = |id| -> Vec<u64> {
        store
            .outbox_after(id)
            .map(|m| m.expect("readable").0)
            .collect()
    };
    assert_eq!(after(None), ids);
    assert_eq!(after(Some(ids[0])), &ids[1..]);
    assert_eq!(after(Some(ids[1])), Vec::<u64>::new());
    assert_eq!(after(ids[0].checked_sub(1)), ids);

    // A number's next queued message, found through the per-number index.
    let of_a: Vec<u64> = store
        .outbox()
        .map(|m| m.expect("readable"))
        .filter(|(_, m)| m.phone == a)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(of_a.len(), 1);
    let next = store.next_queued_of(&a, 0).expect("index");
    assert_eq!(
        next.map(|(id, m)| (id, m.phone)),
        Some((of_a[0], a.clone()))
    );
    assert!(store.next_queued_of(&a, of_a[0]).expect("index").is_none());
    assert!(store.next_queued_of(&a, u64::MAX).expect("index").is_none());
}

#[test]
fn the_debug_form_of_a_queued_code_hides_its_text_and_the_number() {
    let now = Utc::now();
    let msg = |body: &str, secret: bool| smsflow::store::OutMessage {
        phone: Phone::parse("+14155550100").unwrap(),
        body: body.into(),
        secret,
        attempts: 0,
        next_try: now,
        created_at: now,
        last_error: None,
        follow_up: false,
        code_expires_at: None,
        uncertain: 0,
    };
    let code = format!("{:?}", msg("Your code is 493817", true));
    assert!(
        !code.contains("493817") && !code.contains("5550100"),
        "{code}"
    );
    let step = format!("{:?}", msg("Step one", false));
    assert!(step.contains("Step one"), "{step}");
}

#[test]
fn a_message_counts_as_opted_out_only_for_an_opt_out_written_after_it_was_queued() {
    use smsflow::machine::Record;
    use smsflow::store::HistoryEntry;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let now = Utc::now();
    let phone = Phone::parse("+14155550101").expect("phone");
    let commit = |outgoing: Vec<(String, bool)>, history: Vec<Record>| Commit {
        subscriber: Some(Subscriber::new(phone.clone(), now)),
        outgoing,
        history: history
            .into_iter()
            .map(|record| HistoryEntry { at: now, record })
            .collect(),
        ..Commit::default()
    };
    let opted_out = || Record::OptedOut {
        reason: "STOP".into(),
    };
    // An opt-out before the message, then the message, then an opt-out, then a message.
    store
        .commit_many(&[commit(vec![], vec![opted_out()])], now)
        .expect("commit");
    store
        .commit_many(&[commit(vec![("before".into(), false)], vec![])], now)
        .expect("commit");
    store
        .commit_many(&[commit(vec![], vec![opted_out()])], now)
        .expect("commit");
    store
        .commit_many(&[commit(vec![("after".into(), false)], vec![])], now)
        .expect("commit");
    let ids: Vec<(u64, String)> = store
        .outbox()
        .map(|m| m.expect("readable"))
        .map(|(id, m)| (id, m.body))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(store.opted_out_since(&phone, ids[0].0).expect("read"));
    assert!(!store.opted_out_since(&phone, ids[1].0).expect("read"));
    // Another number's opt-out is not this one's.
    let other = Phone::parse("+14155550102").expect("other");
    assert!(!store.opted_out_since(&other, 0).expect("read"));
}

/// An outbox message written by an older smsflow in the layout of `version`, as a fresh
/// store reads it back: its id and the message.
fn stored_by_an_older_smsflow(
    version: u8,
    record: &impl serde::Serialize,
) -> (u64, smsflow::store::OutMessage) {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("outbox")
            .and_then(|t| {
                t.insert(
                    7u64.to_be_bytes(),
                    smsflow::store::codec::encode(version, record),
                )
            })
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(|| Store::open(dir.path()));
    let mut read: Vec<_> = store.outbox().map(|m| m.unwrap()).collect();
    assert_eq!(read.len(), 1);
    read.remove(0)
}

/// An outbox message written by the smsflow before follow-ups were marked (version 1) is
/// read as it was, and as not a follow-up: it is sent as it would have been.
#[test]
fn a_version_1_outbox_message_is_read_as_it_was_and_not_as_a_follow_up() {
    #[derive(serde::Serialize)]
    struct V1 {
        phone: Phone,
        body: String,
        secret: bool,
        attempts: u32,
        next_try: chrono::DateTime<Utc>,
        created_at: chrono::DateTime<Utc>,
        last_error: Option<String>,
    }
    let now = Utc::now();
    let (id, m) = stored_by_an_older_smsflow(
        1,
        &V1 {
            phone: Phone::parse("+14155550100").unwrap(),
            body: "Step one".into(),
            secret: false,
            attempts: 2,
            next_try: now,
            created_at: now,
            last_error: Some("503".into()),
        },
    );
    assert_eq!(id, 7);
    assert_eq!(
        (m.body.as_str(), m.attempts, m.last_error.as_deref()),
        ("Step one", 2, Some("503"))
    );
    assert!(!m.follow_up);
    assert_eq!(m.phone.as_str(), "+14155550100");
}

/// A code queued by the smsflow before a code's expiry was kept with it (version 2) is read
/// as not saying when it expires: it is sent as it would have been.
#[test]
fn a_version_2_outbox_message_is_read_as_it_was_with_no_code_expiry() {
    #[derive(serde::Serialize)]
    struct V2 {
        phone: Phone,
        body: String,
        secret: bool,
        attempts: u32,
        next_try: chrono::DateTime<Utc>,
        created_at: chrono::DateTime<Utc>,
        last_error: Option<String>,
        follow_up: bool,
    }
    let now = Utc::now();
    let (_, m) = stored_by_an_older_smsflow(
        2,
        &V2 {
            phone: Phone::parse("+14155550100").unwrap(),
            body: "Your code is 493817".into(),
            secret: true,
            attempts: 1,
            next_try: now,
            created_at: now,
            last_error: None,
            follow_up: true,
        },
    );
    assert_eq!(
        (m.body.as_str(), m.secret, m.attempts, m.follow_up),
        ("Your code is 493817", true, 1, true)
    );
    assert_eq!(m.code_expires_at, None);
}

/// A message queued by the smsflow before tries that may have reached Twilio were counted
/// (version 3) is read as it was, with none counted.
#[test]
fn a_version_3_outbox_message_is_read_as_it_was_with_no_uncertain_tries() {
    #[derive(serde::Serialize)]
    struct V3 {
        phone: Phone,
        body: String,
        secret: bool,
        attempts: u32,
        next_try: chrono::DateTime<Utc>,
        created_at: chrono::DateTime<Utc>,
        last_error: Option<String>,
        follow_up: bool,
        code_expires_at: Option<chrono::DateTime<Utc>>,
    }
    let now = Utc::now();
    let (_, m) = stored_by_an_older_smsflow(
        3,
        &V3 {
            phone: Phone::parse("+14155550100").unwrap(),
            body: "Your code is 493817".into(),
            secret: true,
            attempts: 4,
            next_try: now,
            created_at: now,
            last_error: Some("503".into()),
            follow_up: false,
            code_expires_at: Some(now),
        },
    );
    assert_eq!(
        (m.body.as_str(), m.attempts, m.code_expires_at, m.uncertain),
        ("Your code is 493817", 4, Some(now), 0)
    );
}

/// Stored enums are written by variant number: a variant inserted in the middle would make
/// every stored record after it read as its neighbour, with no error. New variants go at the
/// end; this pins each one's number.
#[test]
fn stored_enum_variants_keep_their_numbers() {
    use smsflow::machine::Record;
    fn number<T: serde::Serialize>(value: &T) -> u32 {
        let bytes = bincode::serialize(value).expect("serialize");
        u32::from_le_bytes(bytes[..4].try_into().expect("a variant number"))
    }
    let s = |x: &str| x.to_string();
    let records = [
        Record::OptedIn { via: s("sms") },
        Record::CodeSent,
        Record::CodeWithdrawn,
        Record::CodeRateLimited,
        Record::CodeRejected { reason: s("wrong") },
        Record::Verified { via: s("sms") },
        Record::FieldSaved {
            key: s("k"),
            value: s("v"),
        },
        Record::SequenceAssigned { name: s("n") },
        Record::StepSent {
            sequence: s("n"),
            step: 0,
        },
        Record::Answered {
            sequence: s("n"),
            step: 0,
        },
        Record::AnswerTimedOut {
            sequence: s("n"),
            step: 0,
        },
        Record::SequenceFinished { name: s("n") },
        Record::SequenceEnded {
            name: s("n"),
            reason: s("r"),
        },
        Record::Deferred { until: Utc::now() },
        Record::OptedOut { reason: s("stop") },
    ];
    for (n, r) in records.iter().enumerate() {
        assert_eq!(number(r) as usize, n, "{r:?}");
    }
    let states = [
        State::Unverified,
        State::AwaitingCode,
        State::Verified,
        State::InSequence {
            name: s("n"),
            step: 0,
            waiting: false,
        },
        State::OptedOut,
    ];
    for (n, st) in states.iter().enumerate() {
        assert_eq!(number(st) as usize, n, "{st:?}");
    }
    for (n, k) in [TimerKind::Step, TimerKind::AskTimeout].iter().enumerate() {
        assert_eq!(number(k) as usize, n, "{k:?}");
    }
}

/// A report for a message not yet recorded is kept only while a send is in flight (see
/// `Store::report`); one no message claims goes ten minutes later, when another is kept or
/// at a start.
#[test]
fn an_early_delivery_report_is_kept_only_while_a_send_is_in_flight_and_not_for_long() {
    let dir = tempfile::tempdir().expect("temp dir");
    let now = Utc::now();
    let report = |at| smsflow::store::Report { at, ..delivered() };
    {
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.report("SMidle", &report(now)).expect("report"), None);
        assert_eq!(store.early_report_count(), 0, "nothing in flight");
        let _sending = store.send_in_flight();
        let old = report(now - Duration::minutes(11));
        assert_eq!(store.report("SMold", &old).expect("report"), None);
        assert_eq!(store.early_report_count(), 1);
        store.flush().expect("flush");
    }
    let store = reopen(|| Store::open(dir.path()));
    assert_eq!(store.early_report_count(), 0, "dropped at a start");
    let sending = store.send_in_flight();
    store
        .report("SMold", &report(now - Duration::minutes(11)))
        .expect("report");
    store.report("SMnew", &report(now)).expect("report");
    assert_eq!(
        store.early_report_count(),
        1,
        "dropped when another was kept"
    );
    drop(sending);
    store.report("SMafter", &report(now)).expect("report");
    assert_eq!(store.early_report_count(), 1, "the send is over");
}

/// Two reports for a message in flight, out of order: the record gets the furthest status
/// and keeps the error code the other had, and its time does not move back; a later success
/// keeps no error code.
#[test]
fn early_delivery_reports_are_applied_when_their_message_is_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let now = Utc::now();
    let phone = Phone::parse("+14155550100").expect("phone");
    let queued = Commit {
        subscriber: Some(Subscriber::new(phone.clone(), now)),
        outgoing: vec![("in flight".into(), false)],
        ..Commit::default()
    };
    store.commit_many(&[queued], now).expect("commit");
    let (id, _) = store.outbox().next().expect("queued").expect("readable");
    let sending = store.send_in_flight();
    let early = |status: &str, error_code| smsflow::store::Report {
        status: status.into(),
        error_code,
        at: now - Duration::minutes(1),
    };
    store
        .report("SM1", &early("undelivered", Some(30003)))
        .expect("report");
    store.report("SM1", &early("failed", None)).expect("report");
    let recorded = sent(&phone, "SM1");
    store.outbox_finish(id, &recorded).expect("finish");
    drop(sending);
    let (_, d) = store
        .delivery_by_sid("SM1")
        .expect("lookup")
        .expect("recorded");
    assert_eq!((d.status.as_str(), d.error_code), ("failed", Some(30003)));
    assert_eq!(d.updated_at, recorded.updated_at, "not moved back");
    assert_eq!(store.early_report_count(), 0, "taken");
    // Delivered after all (a carrier's late word): no error stays with it.
    store
        .report("SM1", &early("delivered", None))
        .expect("report");
    let (_, d) = store
        .delivery_by_sid("SM1")
        .expect("lookup")
        .expect("recorded");
    assert_eq!((d.status.as_str(), d.error_code), ("delivered", None));
    // Read comes after delivered; a late `sent` does not move it back.
    store.report("SM1", &early("read", None)).expect("report");
    store
        .report("SM1", &early("delivered", None))
        .expect("report");
    store.report("SM1", &early("sent", None)).expect("report");
    let (_, d) = store
        .delivery_by_sid("SM1")
        .expect("lookup")
        .expect("recorded");
    assert_eq!(d.status, "read");
}

/// A data dir smsflow creates is its owner's alone: it holds live codes and every answer.
#[test]
fn a_data_dir_smsflow_creates_only_its_owner_may_read() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().expect("temp dir");
    let dir = parent.path().join("data");
    drop(Store::open(&dir).expect("open"));
    let mode = std::fs::metadata(&dir).expect("made").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
}

/// A store file cut short or overwritten (a disk fault, a bad restore) is refused as
/// damaged, naming the data dir and what to do; sled's own panic on it is not a crash.
#[test]
fn a_damaged_store_is_refused_with_advice_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now();
        for i in 0..400 {
            let mut sub = Subscriber::new(Phone::parse(&format!("+1415555{i:04}")).unwrap(), now);
            sub.fields.insert("name".into(), "x".repeat(2000));
            let commit = Commit {
                subscriber: Some(sub),
                ..Commit::default()
            };
            store.commit_many(&[commit], now).unwrap();
        }
        store.flush().unwrap();
    }
    // Opened again, sled writes a snapshot of where its pages are (as a store that ran a
    // while has one): recovery then looks for pages past the cut below.
    drop(reopen(|| Store::open(dir.path())));
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    // Cut short, as a bad copy leaves it: the snapshot names pages past the end.
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(len / 3).unwrap();
    drop(file);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("snap.")),
        "sled wrote a snapshot"
    );
    // A copy for the command below, untouched by the open that follows.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir(copy.path().join("blobs")).unwrap();
    let refused = loop {
        match Store::open(dir.path()) {
            Err(e) if e.to_string().contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(e) => break format!("{e:#}"),
            Ok(_) => panic!("a store cut to a third opened"),
        }
    };
    assert!(
        refused.contains(&dir.path().display().to_string())
            && refused.contains("damaged")
            && refused.contains("backup"),
        "{refused}"
    );
    // The daemon says so in its own words alone (no panic report first), and exits 3.
    // (Which way sled fails on this damage, a panic or an error, varies from run to run.)
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--flows",
            "flows",
            "--data",
        ])
        .arg(copy.path())
        .env_remove("TWILIO_ACCOUNT_SID")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(serve.status.code(), Some(3), "{said}");
    assert!(
        said.contains("damaged") && !said.contains("panicked"),
        "{said}"
    );
}

/// A page too large for sled's log goes to a file of its own under `blobs/`, which the
/// flush syncs too (sled does not): a flush with one is no error, and the record reads back.
#[test]
fn a_record_large_enough_for_a_blob_file_is_flushed_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = Utc::now();
    let phone = Phone::parse("+14155550100").unwrap();
    let mut sub = Subscriber::new(phone.clone(), now);
    sub.fields.insert("essay".into(), "x".repeat(1 << 20));
    let commit = Commit {
        subscriber: Some(sub.clone()),
        ..Commit::default()
    };
    store.commit_many(&[commit], now).unwrap();
    store.flush().unwrap();
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert!(blobs > 0, "sled wrote no blob file");
    store.flush().unwrap();
    assert_eq!(store.subscriber(&phone).unwrap(), Some(sub));
}

/// A store's trees by name, each with its keys and values in order.
type Trees = std::collections::BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every tree of a store at `dir`, key by key (the store closed again).
fn every_key(dir: &std::path::Path) -> Trees {
    let db = sled::Config::new().path(dir).open().expect("open");
    let trees = (db.tree_names().into_iter()).map(|name| {
        let tree = db.open_tree(&name).expect("tree");
        let kvs = (tree.iter())
            .map(|kv| kv.expect("read"))
            .map(|(k, v)| (k.to_vec(), v.to_vec()));
        (name.to_vec(), kvs.collect())
    });
    trees.collect()
}

fn bytes_under(dir: &std::path::Path) -> u64 {
    (std::fs::read_dir(dir).expect("list").flatten())
        .map(|e| match e.metadata().expect("stat") {
            m if m.is_dir() => bytes_under(&e.path()),
            m => m.len(),
        })
        .sum()
}

/// `smsflow compact` rewrites a store that erasures left mostly garbage into a smaller one
/// holding every key, swaps it in, and keeps the old one beside it; message ids go on past the
/// old ones. It refuses while the old one is still there, and while a daemon holds the dir.
#[test]
fn compacting_keeps_every_key_and_message_id_and_the_old_store_beside_it() {
    let parent = tempfile::tempdir().expect("temp dir");
    let dir = parent.path().join("data");
    let now = Utc::now();
    let phone = |i: u32| Phone::parse(&format!("+1415555{i:04}")).expect("phone");
    let old_ids: Vec<u64> = {
        let store = Store::open(&dir).expect("open");
        let entry = |i: u32| smsflow::store::HistoryEntry {
            at: now,
            record: smsflow::machine::Record::SequenceAssigned {
                name: format!("sequence {i} {}", "x".repeat(200)),
            },
        };
        for chunk in (0..3000).collect::<Vec<u32>>().chunks(500) {
            let commits: Vec<Commit> = (chunk.iter())
                .map(|&i| Commit {
                    subscriber: Some(Subscriber::new(phone(i), now)),
                    history: (0..5).map(entry).collect(),
                    outgoing: vec![(format!("hello {i}"), false)],
                    ..Commit::default()
                })
                .collect();
            store.commit_many(&commits, now).expect("commit");
        }
        for i in 100..3000 {
            store.erase(&phone(i)).expect("erase");
        }
        store.flush().expect("flush");
        store.outbox().map(|m| m.expect("readable").0).collect()
    };
    assert_eq!(old_ids.len(), 100);
    let (keys, size) = (every_key(&dir), bytes_under(&dir));
    let compact_in = |cwd: &std::path::Path, data: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .current_dir(cwd)
            .arg("compact")
            .arg("--data")
            .arg(data)
            .output()
            .expect("run");
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), said)
    };
    // A store this test just closed may stay locked a moment (see `reopen`): a compaction
    // meant to run waits for it, as `reopen` does.
    let compact = || {
        reopen(|| match compact_in(parent.path(), &dir) {
            (_, said) if said.contains("is in use") => Err(said),
            done => Ok(done),
        })
    };
    let (code, said) = compact();
    assert_eq!(code, Some(0), "{said}");
    let old = parent.path().join("data.before-compact");
    assert!(
        said.contains("compacted") && said.contains("data.before-compact"),
        "{said}"
    );
    assert_eq!(every_key(&dir), keys, "every key of every tree, as it was");
    assert_eq!(every_key(&old), keys, "the old store kept as it was");
    assert!(
        !dir.join(".smsflow-compacted-copy").exists(),
        "its mark removed"
    );
    let now_size = bytes_under(&dir);
    assert!(now_size < size, "{now_size} bytes, not less than {size}");
    // A message queued now takes an id past every one the old store gave.
    let store = Store::open(&dir).expect("open the compacted store");
    let commit = Commit {
        subscriber: Some(Subscriber::new(phone(1), now)),
        outgoing: vec![("after".into(), false)],
        ..Commit::default()
    };
    store.commit_many(&[commit], now).expect("commit");
    let newest = store.outbox().map(|m| m.expect("readable").0).max();
    assert!(newest > old_ids.iter().copied().max(), "{newest:?}");
    // Held by a daemon (here, this test): refused, and nothing moved.
    std::fs::remove_dir_all(&old).expect("remove the old store");
    let (code, said) = compact_in(parent.path(), &dir);
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("stop the daemon first"), "{said}");
    assert!(!old.exists() && !parent.path().join("data.compacting").exists());
    drop(store);
    // From inside the data dir: refused (the swap would leave the shell in the old store).
    let (code, said) = compact_in(&dir, std::path::Path::new("."));
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("the working directory is in the data dir"),
        "{said}"
    );
    // A copy a crash left unfinished is removed, and the compaction goes on (the copy of a
    // store just compacted may be no smaller: then it is not swapped in, and says so).
    let copying = parent.path().join("data.compacting");
    std::fs::create_dir(&copying).expect("an unfinished copy");
    let (code, said) = compact();
    assert_eq!(code, Some(0), "{said}");
    assert!(!copying.exists(), "{said}");
    assert_eq!(every_key(&dir).len(), keys.len());
    // One left after the swap holds the old store: named, not touched.
    let _ = std::fs::remove_dir_all(&old);
    std::fs::create_dir(&copying).expect("the old store, left");
    std::fs::write(dir.join(".smsflow-compacted-copy"), "").expect("the swapped copy's mark");
    let (code, said) = compact();
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("data.compacting holds the old store"),
        "{said}"
    );
    assert!(copying.exists());
    // And not while the store an earlier compaction kept is still beside it.
    std::fs::remove_dir(&copying).expect("remove");
    std::fs::create_dir(&old).expect("a kept store");
    let (code, said) = compact();
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("data.before-compact is there"), "{said}");
}
