//! The store's own bookkeeping, below the daemon.

use chrono::{Duration, Utc};
use smsflow::machine::{Subscriber, Timer, TimerKind};
use smsflow::phone::Phone;
use smsflow::store::{Commit, Delivery, Store};

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
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!((store.timer_count(), store.outbox_len()), (1, 1));
    store.erase(&phone).expect("erase");
    assert_eq!((store.timer_count(), store.outbox_len()), (0, 0));
}
