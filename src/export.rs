//! The dataset: one CSV row per phone with its state and every form field; choice fields hold
//! their category label, and with one-hot an indicator column per category. Streamed.

use std::io::Write;

use crate::flows::{Expect, Flows, StepAction};
use crate::machine::Subscriber;
use crate::store::{Listed, Store};

/// The fixed columns, before the fields.
pub const COLUMNS: [&str; 8] = [
    "phone",
    "state",
    "opted_in",
    "verified_at",
    "sequence",
    "step",
    "created_at",
    "last_inbound_at",
];

/// What the columns are for one flow set.
pub struct Layout {
    fields: Vec<String>,
    /// (field, category) pairs for the one-hot columns.
    one_hot: Vec<(String, String)>,
}

impl Layout {
    pub fn new(flows: &Flows, one_hot: bool) -> Layout {
        let fields: Vec<String> = flows.form.all_keys().map(str::to_string).collect();
        let mut categories: Vec<(String, String)> = Vec::new();
        if one_hot {
            let mut add = |key: &str, expect: &Expect| {
                for label in expect.categories().unwrap_or_default() {
                    let pair = (key.to_string(), label.to_string());
                    if !categories.contains(&pair) {
                        categories.push(pair);
                    }
                }
            };
            for f in &flows.form.fields {
                add(&f.key, &f.expect);
            }
            for s in flows.sequences.iter().flat_map(|s| &s.steps) {
                if let StepAction::Ask(q) = &s.action {
                    if let Some(key) = &q.save {
                        add(key, &q.expect);
                    }
                }
            }
        }
        Layout {
            fields,
            one_hot: categories,
        }
    }

    pub fn header(&self) -> Vec<String> {
        COLUMNS
            .iter()
            .map(|c| c.to_string())
            .chain(self.fields.iter().cloned())
            .chain(self.one_hot.iter().map(|(k, c)| format!("{k}={c}")))
            .collect()
    }

    pub fn row(&self, s: &Subscriber) -> Vec<String> {
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| t.to_rfc3339()).unwrap_or_default()
        };
        let (sequence, step) = s.sequence_step();
        let mut row = vec![
            s.phone.to_string(),
            s.state.name().to_string(),
            s.opted_in().to_string(),
            time(s.verified_at),
            sequence.unwrap_or_default().to_string(),
            step.map(|n| n.saturating_add(1).to_string())
                .unwrap_or_default(),
            s.created_at.to_rfc3339(),
            time(s.last_inbound_at),
        ];
        row.extend(
            self.fields
                .iter()
                .map(|f| s.fields.get(f).map(|v| inert(v)).unwrap_or_default()),
        );
        row.extend(
            self.one_hot
                .iter()
                .map(|(k, c)| if s.fields.get(k) == Some(c) { "1" } else { "0" }.to_string()),
        );
        row
    }
}

/// A value a texter typed, made safe to open in a spreadsheet: one that a spreadsheet would
/// run as a formula (it starts with `=`, `+`, `-`, `@`, a tab or a carriage return, and is
/// not a plain number) gets a leading `'` (OWASP's advice against CSV injection). `-inf` or
/// `+NaN` parse as numbers in Rust but not in a spreadsheet, so they get it too.
fn inert(value: &str) -> String {
    let risky = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let number = value.trim().parse::<f64>().is_ok_and(f64::is_finite);
    if risky && !number {
        format!("'{value}")
    } else {
        value.to_string()
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub rows: u64,
    /// Records left out because they cannot be read (each logged, masked).
    pub unreadable: u64,
}

/// Writes the whole dataset to `out`, one subscriber at a time.
pub fn write_csv<W: Write>(
    store: &Store,
    flows: &Flows,
    one_hot: bool,
    out: W,
) -> anyhow::Result<Exported> {
    let layout = Layout::new(flows, one_hot);
    let mut w = csv::Writer::from_writer(out);
    w.write_record(layout.header())?;
    let mut done = Exported {
        rows: 0,
        unreadable: 0,
    };
    for listed in store.subscribers_after(None) {
        match listed? {
            Listed::Readable(s) => {
                w.write_record(layout.row(&s))?;
                done.rows += 1;
            }
            // One damaged record must not cost the operator the whole dataset; it is named
            // (masked) here and in full by `GET /admin/subscribers`, whence it can be erased.
            Listed::Unreadable { key, error } => {
                done.unreadable += 1;
                tracing::warn!(
                    "export: leaving out the record of {}, which cannot be read: {error}",
                    Listed::masked_key(&key)
                );
            }
        }
    }
    w.flush()?;
    Ok(done)
}

/// Peak resident memory of this process in KiB (Linux), for reports.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::inert;

    #[test]
    fn a_typed_value_a_spreadsheet_would_run_is_made_inert_and_numbers_are_not() {
        assert_eq!(
            inert("=HYPERLINK(\"http://x\",\"a\")"),
            "'=HYPERLINK(\"http://x\",\"a\")"
        );
        assert_eq!(inert("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(inert("+1+cmd|' /C calc'!A0"), "'+1+cmd|' /C calc'!A0");
        assert_eq!(inert("-5"), "-5");
        assert_eq!(inert("+3.5"), "+3.5");
        assert_eq!(inert("-1e3"), "-1e3");
        assert_eq!(inert("-inf"), "'-inf");
        assert_eq!(inert("+NaN"), "'+NaN");
        assert_eq!(inert("-Infinity"), "'-Infinity");
        assert_eq!(inert("Ann"), "Ann");
        assert_eq!(inert(""), "");
    }
}
