//! Prometheus metrics: counters and the webhook latency histogram through the `metrics`
//! facade; per-daemon gauges (subscribers by state, timers, outbox), flow reloads and the
//! writer's counters (commits, events, time committing and flushing) computed at scrape time.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;
use crate::machine::State;

pub const INBOUND: &str = "smsflow_inbound_messages_total";
pub const OUTBOUND: &str = "smsflow_outbound_messages_total";
pub const RELOADS: &str = "smsflow_flow_reloads_total";
pub const WEBHOOK_SECONDS: &str = "smsflow_webhook_duration_seconds";
pub const HISTORY: &str = "smsflow_history_entries_total";
pub const REPORTS: &str = "smsflow_delivery_reports_total";
pub const RESPONSES: &str = "smsflow_http_responses_total";

/// The outcomes `inbound` counts (see `http::outcome_label`), present from the start at 0.
const INBOUND_OUTCOMES: [&str; 10] = [
    "handled",
    "code_sent",
    "verified",
    "wrong_code",
    "expired_code",
    "locked",
    "rate_limited",
    "opted_out",
    "ignored",
    "duplicate",
];

/// The statuses `outbound` counts, present from the start at 0.
const OUTBOUND_STATUSES: [&str; 4] = ["sent", "retried", "failed", "suppressed"];

/// Twilio's delivery statuses; a report with any other is counted as `other` (a label per
/// word a request can make up would have no bound).
const REPORT_STATUSES: [&str; 13] = [
    "accepted",
    "scheduled",
    "queued",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "read",
    "receiving",
    "received",
    "canceled",
    "partially_delivered",
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls (tests start many daemons in one
/// process) share it.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(WEBHOOK_SECONDS.to_string()),
                    &[
                        // Up to Twilio's 15 s timeout (a body trickling in may take 10).
                        0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        15.0,
                    ],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

/// The recorded families' help, and their series known beforehand at 0 (a rate over a
/// series that appears with its first event misses that event).
fn describe() {
    use metrics::{counter, describe_counter, describe_histogram, Unit};
    describe_counter!(
        INBOUND,
        "Inbound texts by outcome (duplicate: a MessageSid already answered)."
    );
    describe_counter!(
        OUTBOUND,
        "Sends to the provider (texts, and the OTP API's calls) by result: sent, retried, failed, or suppressed (not sent after all: the number opted out or was erased, a code expired or was displaced, a sequence ended)."
    );
    describe_counter!(
        HISTORY,
        "Entries written to numbers' histories, by kind: code_sent counts every code issued \
         (by text, call or the OTP API), verified every verification."
    );
    describe_counter!(REPORTS, "Delivery reports by Twilio's status.");
    describe_counter!(
        RESPONSES,
        "Answers of the webhook, OTP and admin routes by route and HTTP status (403: a refused \
         signature)."
    );
    describe_histogram!(
        WEBHOOK_SECONDS,
        Unit::Seconds,
        "Time to answer a Twilio webhook, by route."
    );
    for outcome in INBOUND_OUTCOMES {
        counter!(INBOUND, "outcome" => outcome).absolute(0);
    }
    for status in OUTBOUND_STATUSES {
        counter!(OUTBOUND, "status" => status).absolute(0);
    }
    for kind in crate::machine::Record::NAMES {
        counter!(HISTORY, "kind" => kind).absolute(0);
    }
}

/// The whole exposition: recorded metrics plus this daemon's own figures; `reloads` is
/// (made live, refused).
pub fn render(engine: &Engine, reloads: (u64, u64)) -> String {
    let mut out = match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    };
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    };
    // A family with one label, a sample per value.
    let labelled = |out: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    label: &str,
                    rows: &[(&str, u64)]| {
        head(out, name, kind, help);
        for (value, n) in rows {
            out.push_str(&format!("{name}{{{label}=\"{value}\"}} {n}\n"));
        }
    };
    let states: Vec<(&str, u64)> = State::NAMES
        .iter()
        .zip(engine.state_counts())
        .map(|(name, n)| (*name, n.max(0) as u64))
        .collect();
    labelled(
        &mut out,
        "smsflow_subscribers",
        "gauge",
        "Subscribers by state.",
        "state",
        &states,
    );
    labelled(
        &mut out,
        RELOADS,
        "counter",
        "Flow reloads by result: ok (made live) or failed (refused; the previous flows stay).",
        "result",
        &[("ok", reloads.0), ("failed", reloads.1)],
    );
    let work = engine.writer_work();
    for (name, kind, help, value) in [
        (
            "smsflow_pending_timers",
            "gauge",
            "Timers waiting to fire.",
            engine.store.timer_count().to_string(),
        ),
        (
            "smsflow_outbox_depth",
            "gauge",
            "Messages waiting in the outbox.",
            engine.store.outbox_len().to_string(),
        ),
        (
            "smsflow_early_reports",
            "gauge",
            "Delivery reports kept for a message whose send is not yet recorded (one ten \
             minutes old is dropped when another is kept, or at a start).",
            engine.store.early_report_count().to_string(),
        ),
        (
            "smsflow_store_commits_total",
            "counter",
            "Commits the writer made durable (a batch that carried events, or an erase).",
            work.commits.to_string(),
        ),
        (
            "smsflow_store_committed_events_total",
            "counter",
            "Events those commits carried (an erase carries none).",
            work.events.to_string(),
        ),
        (
            "smsflow_store_commit_seconds_total",
            "counter",
            "Time the writer spent reading, stepping and committing them.",
            work.commit.as_secs_f64().to_string(),
        ),
        (
            "smsflow_store_flush_seconds_total",
            "counter",
            "Time the writer spent waiting for them to reach the disk.",
            work.flush.as_secs_f64().to_string(),
        ),
    ] {
        head(&mut out, name, kind, help);
        out.push_str(&format!("{name} {value}\n"));
    }
    out
}

/// Folds recorded histogram samples into their buckets every few seconds, so memory stays
/// bounded even when nobody scrapes `/metrics`.
pub async fn upkeep(mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                if let Some(h) = handle() {
                    h.run_upkeep();
                }
            }
            _ = stop.changed() => return,
        }
    }
}

pub fn inbound(outcome: &'static str) {
    let _ = handle();
    metrics::counter!(INBOUND, "outcome" => outcome).increment(1);
}

pub fn outbound(status: &'static str) {
    let _ = handle();
    metrics::counter!(OUTBOUND, "status" => status).increment(1);
}

pub fn webhook_seconds(route: &'static str, secs: f64) {
    let _ = handle();
    metrics::histogram!(WEBHOOK_SECONDS, "route" => route).record(secs);
}

/// Counts history entries by kind (`machine::Record::name`), once their commit is durable.
pub fn recorded(kinds: &[&'static str]) {
    if kinds.is_empty() {
        return;
    }
    let _ = handle();
    let mut counted: Vec<(&'static str, u64)> = Vec::new();
    for kind in kinds {
        match counted.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += 1,
            None => counted.push((kind, 1)),
        }
    }
    for (kind, n) in counted {
        metrics::counter!(HISTORY, "kind" => kind).increment(n);
    }
}

pub fn delivery_report(status: &str) {
    let _ = handle();
    let status = REPORT_STATUSES
        .iter()
        .find(|s| **s == status)
        .copied()
        .unwrap_or("other");
    metrics::counter!(REPORTS, "status" => status).increment(1);
}

pub fn http_response(route: &'static str, status: axum::http::StatusCode) {
    let _ = handle();
    // The statuses the daemon answers with need no label built per request.
    let label: metrics::SharedString = match ANSWERED.iter().find(|c| **c == status.as_str()) {
        Some(c) => (*c).into(),
        None => status.as_str().to_string().into(),
    };
    metrics::counter!(RESPONSES, "route" => route, "status" => label).increment(1);
}

/// The statuses the routes answer with (any other is counted all the same).
const ANSWERED: [&str; 16] = [
    "200", "201", "204", "400", "401", "403", "404", "405", "409", "413", "415", "422", "429",
    "431", "500", "503",
];
