//! The store's own bookkeeping, below the daemon.

use chrono::{Duration, Utc};
use smsflow::machine::{State, Subscriber, Timer, TimerKind};
use smsflow::phone::Phone;
use smsflow::store::{Commit, Delivery, Store};

/// Opens a data dir that a store in this process just closed. sled lets go of its file lock
/// only when its deferred cleanup runs, which can lag a moment behind the drop.
fn reopen<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("reopen: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("reopening: {e}"),
        }
    }
}

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

#[test]
fn erasing_a_number_removes_its_queued_and_sent_messages_and_no_one_elses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let (a, b) = (
        Phone::parse("+14155550101").expect("a"),
        Phone::parse("+14155550102").expect("b"),
    );
    two_numbers_with_messages(&store, &a, &b);
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
    }
    {
        // Upgraded: schema 2 now, which an older smsflow refuses.
        let db = reopen(|| sled::open(dir.path()));
        let schema = db
            .open_tree("meta")
            .and_then(|m| m.get("schema"))
            .expect("read");
        assert_eq!(schema.as_deref(), Some(&2u64.to_be_bytes()[..]));
        db.open_tree("meta")
            .and_then(|m| m.insert("schema", &3u64.to_be_bytes()))
            .expect("future schema");
        db.flush().expect("flush");
    }
    let refused = loop {
        match Store::open(dir.path()) {
            Err(e) if e.to_string().contains("schema 3") => break e.to_string(),
            // sled lets go of its lock a moment after the drop (see `reopen`).
            Err(e) if e.to_string().contains("in use") => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    };
    assert!(refused.contains("upgrade smsflow"), "{refused}");
}
