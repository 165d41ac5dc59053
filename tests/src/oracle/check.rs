//! The oracle: compares the ledger (what the relay promised) with what the
//! receivers got and what the relay says it did, and lists every
//! difference. Pure: the run gathers the inputs, this decides.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use super::client::{Answer, Entry};
use super::receiver::{Arrival, Report, Stray};
use super::workload::{fate_of, POSTMASTER, SENDER_DOMAIN};

/// One line of a relay's delivery log, as far as the oracle cares.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub message_id: String,
    pub recipient: String,
    pub outcome: String,
}

/// Everything the oracle looks at after a run.
pub struct Observed<'a> {
    pub ledger: &'a [Entry],
    pub arrivals: &'a [Arrival],
    pub strays: &'a [Stray],
    pub log: &'a [LogLine],
    /// `messages` of `/api/v1/queue` on each node that holds a queue
    /// (`None`: it did not answer).
    pub queued: &'a [Option<u64>],
    /// Whether any fault was injected: only then may a recipient be
    /// delivered twice or expire although its receiver would take it.
    pub faults: bool,
    /// Whether a relay process was killed: only then may the delivery log
    /// miss the line of an outcome (the process died between the two).
    pub kills: bool,
    /// Whether the relay logs an outcome only once it is stored (the
    /// Redis backends): then a logged delivery is one the relay knew of
    /// for good.
    pub logged_when_stored: bool,
}

/// The counts of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: usize,
    pub accepted: usize,
    pub uncertain: usize,
    pub refused: usize,
    pub recipients: usize,
    pub delivered: usize,
    pub bounced: usize,
    /// Failed recipients of messages from `<>`: no report, by rule.
    pub dropped: usize,
    /// Recipients whose failure report could not be delivered and went to
    /// the postmaster instead (a double bounce); not reported to the sender.
    pub double_bounced: usize,
    /// Recipients the receiver would have taken that expired (faults only).
    pub expired: usize,
    pub duplicate_deliveries: usize,
    pub duplicate_reports: usize,
    pub lost: usize,
    /// Uncertain messages that arrived after all.
    pub uncertain_arrived: usize,
    pub reports: usize,
    /// Notices to the postmaster.
    pub notices: usize,
}

/// The oracle's verdict.
#[derive(Debug, Default)]
pub struct Verdict {
    pub counts: Counts,
    pub violations: Vec<String>,
    /// Allowed under faults, listed for the record.
    pub notes: Vec<String>,
}

/// What happened to one promised recipient.
#[derive(Clone, Debug, Default)]
struct Fates {
    delivered: usize,
    /// Statuses of the failure reports naming it.
    reports: Vec<String>,
    /// Statuses of its failures in notices to the postmaster: its report
    /// failed, or (from `<>`) it did.
    double_bounced: Vec<String>,
    logged_delivered: usize,
    logged_failed: usize,
}

struct Index<'a> {
    entries: HashMap<&'a str, &'a Entry>,
    /// (oracle id, recipient) → times delivered.
    delivered: HashMap<(String, String), usize>,
    /// (oracle id, recipient) → report statuses.
    reported: HashMap<(String, String), Vec<String>>,
    /// (oracle id, recipient) → statuses in notices to the postmaster.
    double_bounced: HashMap<(String, String), Vec<String>>,
    /// (queue id, recipient) → (delivered, failed) lines.
    logged: HashMap<(String, String), (usize, usize)>,
}

impl<'a> Index<'a> {
    fn new(observed: &Observed<'a>) -> Index<'a> {
        let entries = observed
            .ledger
            .iter()
            .map(|e| (e.oracle_id.as_str(), e))
            .collect();
        let mut delivered: HashMap<(String, String), usize> = HashMap::new();
        let mut reported: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut double_bounced: HashMap<(String, String), Vec<String>> = HashMap::new();
        for arrival in observed.arrivals {
            match (&arrival.report, &arrival.oracle_id) {
                (Some(Ok(report)), _) => {
                    // A notice names the failures of the report it returns,
                    // or those of a message from `<>`.
                    let (report, into) = match &report.inner {
                        Some(inner) if is_notice(arrival) => (&**inner, &mut double_bounced),
                        _ if is_notice(arrival) => (report, &mut double_bounced),
                        _ => (report, &mut reported),
                    };
                    let Some(id) = report.envid.clone().or(report.oracle_id.clone()) else {
                        continue;
                    };
                    for (rcpt, action, status) in &report.recipients {
                        if action == "failed" {
                            into.entry((id.clone(), rcpt.clone()))
                                .or_default()
                                .push(status.clone());
                        }
                    }
                }
                (None, Some(id)) => {
                    for rcpt in &arrival.rcpts {
                        *delivered.entry((id.clone(), rcpt.clone())).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        let mut logged: HashMap<(String, String), (usize, usize)> = HashMap::new();
        for line in observed.log {
            let counts = logged
                .entry((line.message_id.clone(), line.recipient.to_ascii_lowercase()))
                .or_default();
            match line.outcome.as_str() {
                "delivered" => counts.0 += 1,
                "failed" => counts.1 += 1,
                _ => {}
            }
        }
        Index {
            entries,
            delivered,
            reported,
            double_bounced,
            logged,
        }
    }

    /// The submitted message a report (`kind`) is about, by its envelope
    /// id or returned `X-Oracle-Id`; a violation when there is none.
    fn about(
        &self,
        report: &Report,
        kind: &str,
        violations: &mut Vec<String>,
    ) -> Option<&'a Entry> {
        let found = report
            .envid
            .as_deref()
            .or(report.oracle_id.as_deref())
            .and_then(|id| self.entries.get(id).copied());
        if found.is_none() {
            violations.push(format!(
                "A {kind} FOR NO SUBMITTED MESSAGE: envid {:?}, X-Oracle-Id {:?}",
                report.envid, report.oracle_id
            ));
        }
        found
    }

    fn fates(&self, entry: &Entry, rcpt: &str) -> Fates {
        let key = (entry.oracle_id.clone(), rcpt.to_string());
        let (logged_delivered, logged_failed) = match &entry.answer {
            Answer::Accepted { queue_id } => self
                .logged
                .get(&(queue_id.clone(), rcpt.to_string()))
                .copied()
                .unwrap_or_default(),
            _ => (0, 0),
        };
        Fates {
            delivered: self.delivered.get(&key).copied().unwrap_or(0),
            reports: self.reported.get(&key).cloned().unwrap_or_default(),
            double_bounced: self.double_bounced.get(&key).cloned().unwrap_or_default(),
            logged_delivered,
            logged_failed,
        }
    }
}

/// Promised recipients with no outcome yet: neither delivered, nor
/// reported, nor (from `<>`) logged as failed.
pub fn unresolved(observed: &Observed) -> usize {
    let index = Index::new(observed);
    promised(observed.ledger)
        .filter(|(entry, rcpt)| {
            let f = index.fates(entry, rcpt);
            f.delivered == 0
                && f.reports.is_empty()
                && f.double_bounced.is_empty()
                && !(entry.sender.is_none() && f.logged_failed > 0)
        })
        .count()
}

/// A notice to the postmaster (a double bounce), not a report to a sender.
fn is_notice(arrival: &Arrival) -> bool {
    arrival.domain == SENDER_DOMAIN && arrival.rcpts == [POSTMASTER]
}

fn promised(ledger: &[Entry]) -> impl Iterator<Item = (&Entry, &str)> {
    ledger
        .iter()
        .filter(|e| matches!(e.answer, Answer::Accepted { .. }))
        .flat_map(|e| e.accepted.iter().map(move |r| (e, r.as_str())))
}

/// Checks a run.
pub fn check(observed: &Observed) -> Verdict {
    let index = Index::new(observed);
    let mut v = Verdict::default();
    let c = &mut v.counts;
    c.messages = observed.ledger.len();
    for entry in observed.ledger {
        match entry.answer {
            Answer::Accepted { .. } => c.accepted += 1,
            Answer::Uncertain { .. } => c.uncertain += 1,
            Answer::Refused { .. } => c.refused += 1,
        }
    }
    let mut violations = Vec::new();
    let mut notes = Vec::new();

    for (entry, rcpt) in promised(observed.ledger) {
        c.recipients += 1;
        let f = index.fates(entry, rcpt);
        let fate = fate_of(rcpt);
        let reports = f.reports.len();
        let double_bounced = f.double_bounced.len();
        // Every failure status it got, to its sender or the postmaster.
        let statuses: Vec<&String> = f.reports.iter().chain(&f.double_bounced).collect();
        let what = format!(
            "{} {rcpt} (fate {}, from {}, queue id {}, submitted at {:?}): delivered {}×, \
             reported {}× {:?}, to the postmaster {}× {:?}, relay log delivered {}× failed {}×",
            entry.oracle_id,
            fate.map_or("?".into(), |f| f.to_string()),
            entry.sender.as_deref().unwrap_or("<>"),
            match &entry.answer {
                Answer::Accepted { queue_id } => queue_id.as_str(),
                _ => "-",
            },
            entry.at,
            f.delivered,
            reports,
            f.reports,
            double_bounced,
            f.double_bounced,
            f.logged_delivered,
            f.logged_failed
        );
        let dropped = entry.sender.is_none() && f.logged_failed > 0 && f.delivered == 0;
        if f.delivered == 0 && statuses.is_empty() && !dropped {
            if entry.sender.is_none() && observed.kills {
                // From `<>` a failure leaves only its delivery log line,
                // which a kill right after the outcome was stored loses.
                notes.push(format!("FAILED FROM <> WITHOUT A LOG LINE: {what}"));
            } else {
                c.lost += 1;
                violations.push(format!("LOST: {what}"));
            }
            continue;
        }
        if f.delivered > 0 {
            c.delivered += 1;
        }
        if reports > 0 {
            c.bounced += 1;
        }
        if dropped {
            c.dropped += 1;
        }
        if double_bounced > 0 {
            c.double_bounced += 1;
            if entry.sender.is_some() && reports == 0 {
                notes.push(format!("REPORT UNDELIVERABLE, TO THE POSTMASTER: {what}"));
            }
        }
        let all_expired = !statuses.is_empty() && statuses.iter().all(|s| *s == "5.4.7");
        if f.delivered > 0 && (!statuses.is_empty() || dropped) {
            // A fault can hide a done delivery from the relay (its `250`
            // lost, or the process killed before it stored the outcome);
            // it tries again, and when the lifetime has run out meanwhile
            // it reports the recipient expired: at-least-once, seen from
            // the other side.
            let knew = f.logged_delivered > 0 && (observed.logged_when_stored || !observed.kills);
            if observed.faults && all_expired && !knew {
                notes.push(format!("DELIVERED, THEN EXPIRED AFTER A FAULT: {what}"));
            } else {
                violations.push(format!("DELIVERED AND FAILED: {what}"));
            }
        }
        if entry.sender.is_none() && reports > 0 {
            violations.push(format!("REPORT FOR A MESSAGE FROM <>: {what}"));
        }
        // A report that arrived and also went to the postmaster counts
        // once as a duplicate report.
        let reported_twice = reports > 1 || (reports > 0 && double_bounced > 0);
        if f.delivered > 1 || reported_twice || double_bounced > 1 {
            c.duplicate_deliveries += f.delivered.saturating_sub(1);
            c.duplicate_reports += statuses.len().saturating_sub(1);
            let line = format!("DUPLICATE: {what}");
            if observed.faults {
                notes.push(line);
            } else {
                violations.push(line);
            }
        }
        match fate {
            None => violations.push(format!("NO FATE IN THE ADDRESS: {what}")),
            Some(fate) if !fate.delivers() => {
                if f.delivered > 0 {
                    violations.push(format!("DELIVERED ALTHOUGH REFUSED: {what}"));
                }
                if statuses.iter().any(|s| !s.starts_with('5')) {
                    violations.push(format!("A FAILURE REPORT WITHOUT 5.x.x: {what}"));
                }
            }
            Some(_) if !statuses.is_empty() || dropped => {
                if observed.faults && (all_expired || statuses.is_empty()) {
                    c.expired += 1;
                    notes.push(format!("EXPIRED UNDER FAULTS: {what}"));
                } else {
                    violations.push(format!("FAILED ALTHOUGH THE RECEIVER TAKES IT: {what}"));
                }
            }
            Some(_) => {}
        }
        // The relay's own account.
        if f.logged_delivered > f.delivered {
            violations.push(format!(
                "THE RELAY LOGS MORE DELIVERIES THAN ARRIVED: {what}"
            ));
        }
        let unlogged = if f.delivered > 0 && f.logged_delivered == 0 {
            Some(format!("ARRIVED BUT NOT IN THE RELAY'S LOG: {what}"))
        } else if !statuses.is_empty() && f.logged_failed == 0 {
            Some(format!("REPORTED BUT NOT LOGGED AS FAILED: {what}"))
        } else {
            None
        };
        match unlogged {
            Some(line) if observed.kills => notes.push(line),
            Some(line) => violations.push(line),
            None => {}
        }
    }

    // Nothing arrives that was never promised.
    let mut uncertain_arrived = HashSet::new();
    for arrival in observed.arrivals {
        if is_notice(arrival) {
            c.notices += 1;
            check_notice(arrival, &index, &mut violations);
            continue;
        }
        if arrival.domain == SENDER_DOMAIN {
            c.reports += 1;
            check_report(arrival, &index, &mut violations);
            continue;
        }
        let Some(entry) = arrival
            .oracle_id
            .as_deref()
            .and_then(|id| index.entries.get(id))
        else {
            violations.push(format!(
                "ARRIVED BUT NEVER SUBMITTED: {:?} for {:?} at {}",
                arrival.oracle_id, arrival.rcpts, arrival.domain
            ));
            continue;
        };
        if arrival.digest != entry.digest {
            violations.push(format!(
                "CONTENT CHANGED: {} for {:?} ({} bytes arrived)",
                entry.oracle_id, arrival.rcpts, arrival.size
            ));
        }
        if arrival.mail_from
            != entry
                .sender
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase()
            && arrival.mail_from != entry.sender.clone().unwrap_or_default()
        {
            violations.push(format!(
                "WRONG SENDER: {} arrived from {:?}",
                entry.oracle_id, arrival.mail_from
            ));
        }
        match &entry.answer {
            Answer::Accepted { .. } => {
                for rcpt in &arrival.rcpts {
                    if !entry.accepted.contains(rcpt) {
                        violations.push(format!(
                            "ARRIVED FOR A RECIPIENT THE RELAY REFUSED: {} {rcpt}",
                            entry.oracle_id
                        ));
                    }
                }
            }
            Answer::Uncertain { .. } => {
                uncertain_arrived.insert(entry.oracle_id.clone());
            }
            Answer::Refused { why } => violations.push(format!(
                "ARRIVED ALTHOUGH REFUSED ({why}): {} for {:?}",
                entry.oracle_id, arrival.rcpts
            )),
        }
    }
    c.uncertain_arrived = uncertain_arrived.len();
    for stray in observed.strays {
        violations.push(format!(
            "A RECIPIENT NO ONE SUBMITTED: {} at {}",
            stray.line, stray.domain
        ));
    }
    for (node, queued) in observed.queued.iter().enumerate() {
        match queued {
            Some(0) => {}
            Some(n) => violations.push(format!("QUEUE NOT EMPTY: node {node} holds {n} messages")),
            None => violations.push(format!(
                "QUEUE UNKNOWN: node {node}'s admin API did not answer"
            )),
        }
    }
    v.violations = violations;
    v.notes = notes;
    v
}

/// Whether a report or notice names a recipient the relay never accepted
/// (one of an uncertain message may have been).
fn never_promised(entry: &Entry, rcpt: &String) -> bool {
    let promised = matches!(entry.answer, Answer::Accepted { .. }) && entry.accepted.contains(rcpt);
    let maybe = matches!(entry.answer, Answer::Uncertain { .. });
    !promised && !maybe
}

fn check_report(arrival: &Arrival, index: &Index, violations: &mut Vec<String>) {
    let report = match &arrival.report {
        Some(Ok(report)) => report,
        Some(Err(why)) => {
            violations.push(format!(
                "AN UNREADABLE REPORT to {:?}: {why}",
                arrival.rcpts
            ));
            return;
        }
        None => return,
    };
    if !arrival.mail_from.is_empty() {
        violations.push(format!("A REPORT NOT FROM <>: {:?}", arrival.mail_from));
    }
    if let (Some(a), Some(b)) = (&report.envid, &report.oracle_id) {
        if a != b {
            violations.push(format!(
                "A REPORT WHOSE ENVID {a} AND RETURNED X-Oracle-Id {b} DIFFER"
            ));
        }
    }
    let Some(entry) = index.about(report, "REPORT", violations) else {
        return;
    };
    let sender = entry
        .sender
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if arrival.rcpts != [sender.clone()] {
        violations.push(format!(
            "A REPORT FOR {} TO {:?}, NOT ITS SENDER {sender:?}",
            entry.oracle_id, arrival.rcpts
        ));
    }
    for (rcpt, action, status) in &report.recipients {
        if action != "failed" {
            violations.push(format!(
                "AN UNEXPECTED {action} REPORT: {} {rcpt} {status}",
                entry.oracle_id
            ));
        }
        if never_promised(entry, rcpt) {
            violations.push(format!(
                "A REPORT FOR A RECIPIENT NEVER PROMISED: {} {rcpt} ({:?})",
                entry.oracle_id, entry.answer
            ));
        }
    }
}

/// A notice to the postmaster: from `<>`, naming failures only; it returns
/// either a failed report to a sender (whose failures it names) or a
/// message from `<>` (whose failures it names itself).
fn check_notice(arrival: &Arrival, index: &Index, violations: &mut Vec<String>) {
    let notice = match &arrival.report {
        Some(Ok(report)) => report,
        Some(Err(why)) => {
            violations.push(format!("AN UNREADABLE NOTICE TO THE POSTMASTER: {why}"));
            return;
        }
        None => return,
    };
    if !arrival.mail_from.is_empty() {
        violations.push(format!("A NOTICE NOT FROM <>: {:?}", arrival.mail_from));
    }
    if let Some((rcpt, action, status)) = notice.recipients.iter().find(|r| r.1 != "failed") {
        violations.push(format!(
            "A NOTICE TO THE POSTMASTER THAT IS NOT A FAILURE: {rcpt} {action} {status}"
        ));
    }
    // The message the notice is about, and the recipients it failed for.
    let (about, failed) = match &notice.inner {
        Some(report) => (report.as_ref(), &report.recipients),
        None => (notice, &notice.recipients),
    };
    let Some(entry) = index.about(about, "NOTICE", violations) else {
        return;
    };
    match (&notice.inner, &entry.sender) {
        // The report went to the sender, and that failed.
        (Some(_), Some(sender)) => {
            let sender = sender.to_ascii_lowercase();
            if notice.recipients.iter().any(|(r, _, _)| *r != sender) {
                violations.push(format!(
                    "A NOTICE FOR {} ABOUT A REPORT NOT TO ITS SENDER {sender:?}: {:?}",
                    entry.oracle_id, notice.recipients
                ));
            }
        }
        (None, None) => {}
        (_, sender) => violations.push(format!(
            "A NOTICE FOR {} (from {sender:?}) THAT {} A REPORT",
            entry.oracle_id,
            if notice.inner.is_some() {
                "RETURNS"
            } else {
                "DOES NOT RETURN"
            }
        )),
    }
    for (rcpt, _, _) in failed {
        if never_promised(entry, rcpt) {
            violations.push(format!(
                "A NOTICE FOR A RECIPIENT NEVER PROMISED: {} {rcpt} ({:?})",
                entry.oracle_id, entry.answer
            ));
        }
    }
}

impl Verdict {
    /// The run's summary and, when it failed, the differences.
    pub fn render(&self, limit: usize) -> String {
        let mut out = format!("{:?}\n", self.counts);
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            *by_kind
                .entry(v.split(':').next().unwrap_or(""))
                .or_default() += 1;
        }
        if !by_kind.is_empty() {
            let _ = writeln!(out, "violations by kind: {by_kind:?}");
        }
        for v in self.violations.iter().take(limit) {
            let _ = writeln!(out, "  {v}");
        }
        if self.violations.len() > limit {
            let _ = writeln!(out, "  … and {} more", self.violations.len() - limit);
        }
        let _ = writeln!(out, "notes (allowed under faults): {}", self.notes.len());
        for n in self.notes.iter().take(limit) {
            let _ = writeln!(out, "  {n}");
        }
        out
    }
}

/// A short rendering of durations for reports.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::receiver::Report;

    fn entry(n: usize, sender: Option<&str>, rcpts: &[&str], answer: Answer) -> Entry {
        Entry {
            n,
            oracle_id: format!("1-{n}"),
            sender: sender.map(str::to_string),
            accepted: rcpts.iter().map(|r| r.to_string()).collect(),
            refused: Vec::new(),
            answer,
            digest: 99,
            node: 0,
            at: Duration::ZERO,
        }
    }

    fn accepted(id: &str) -> Answer {
        Answer::Accepted {
            queue_id: id.into(),
        }
    }

    fn arrival(id: &str, rcpts: &[&str]) -> Arrival {
        Arrival {
            domain: "d1.test".into(),
            mail_from: "s0@bounce.test".into(),
            rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
            oracle_id: Some(id.into()),
            digest: 99,
            size: 10,
            at: Duration::ZERO,
            report: None,
        }
    }

    fn report(id: &str, to: &str, rcpts: &[(&str, &str)]) -> Arrival {
        Arrival {
            domain: SENDER_DOMAIN.into(),
            mail_from: String::new(),
            rcpts: vec![to.into()],
            oracle_id: None,
            digest: 0,
            size: 10,
            at: Duration::ZERO,
            report: Some(Ok(Report {
                envid: Some(id.into()),
                oracle_id: Some(id.into()),
                recipients: rcpts
                    .iter()
                    .map(|(r, s)| (r.to_string(), "failed".into(), s.to_string()))
                    .collect(),
                inner: None,
            })),
        }
    }

    /// The postmaster's notice that the report `returned` to `to` failed.
    fn notice(returned: Arrival, to: &str) -> Arrival {
        let Some(Ok(inner)) = returned.report else {
            panic!("not a report")
        };
        Arrival {
            rcpts: vec![POSTMASTER.into()],
            report: Some(Ok(Report {
                envid: None,
                oracle_id: inner.oracle_id.clone(),
                recipients: vec![(to.into(), "failed".into(), "5.4.7".into())],
                inner: Some(Box::new(inner)),
            })),
            ..returned
        }
    }

    fn line(id: &str, rcpt: &str, outcome: &str) -> LogLine {
        LogLine {
            message_id: id.into(),
            recipient: rcpt.into(),
            outcome: outcome.into(),
        }
    }

    fn run(ledger: &[Entry], arrivals: &[Arrival], log: &[LogLine], faults: bool) -> Verdict {
        check(&Observed {
            ledger,
            arrivals,
            strays: &[],
            log,
            queued: &[Some(0)],
            faults,
            kills: false,
            logged_when_stored: false,
        })
    }

    #[test]
    fn a_clean_run_passes_and_counts() {
        let ok = "r0x0.ok@d1.test";
        let bad = "r0x1.p@d1.test";
        let ledger = [entry(0, Some("s0@bounce.test"), &[ok, bad], accepted("Q0"))];
        let arrivals = [
            arrival("1-0", &[ok]),
            report("1-0", "s0@bounce.test", &[(bad, "5.1.1")]),
        ];
        let log = [line("Q0", ok, "delivered"), line("Q0", bad, "failed")];
        let v = run(&ledger, &arrivals, &log, false);
        assert!(v.violations.is_empty(), "{}", v.render(10));
        assert_eq!(
            (v.counts.delivered, v.counts.bounced, v.counts.lost),
            (1, 1, 0)
        );
        assert_eq!(
            unresolved(&Observed {
                ledger: &ledger,
                arrivals: &arrivals[..1],
                strays: &[],
                log: &log,
                queued: &[],
                faults: false,
                kills: false,
                logged_when_stored: false,
            }),
            1
        );
    }

    #[test]
    fn losses_duplicates_and_double_fates_are_caught() {
        let ok = "r0x0.ok@d1.test";
        let ledger = [
            entry(0, Some("s0@bounce.test"), &[ok], accepted("Q0")),
            entry(
                1,
                Some("s1@bounce.test"),
                &["r1x0.ok@d2.test"],
                accepted("Q1"),
            ),
            entry(
                2,
                None,
                &["r2x0.ok@d2.test"],
                Answer::Refused { why: "451".into() },
            ),
        ];
        let arrivals = [
            arrival("1-0", &[ok]),
            arrival("1-0", &[ok]),
            report("1-0", "s0@bounce.test", &[(ok, "5.4.7")]),
            arrival("1-2", &["r2x0.ok@d2.test"]),
            arrival("7-7", &["r7x0.ok@d2.test"]),
        ];
        let log = [line("Q0", ok, "delivered")];
        let v = run(&ledger, &arrivals, &log, false);
        let kinds: Vec<&str> = v
            .violations
            .iter()
            .map(|v| v.split(':').next().unwrap())
            .collect();
        for kind in [
            "LOST",
            "DELIVERED AND FAILED",
            "DUPLICATE",
            "FAILED ALTHOUGH THE RECEIVER TAKES IT",
            "ARRIVED BUT NEVER SUBMITTED",
        ] {
            assert!(kinds.contains(&kind), "{kind} missing in {kinds:?}");
        }
        assert!(
            kinds
                .iter()
                .any(|k| k.starts_with("ARRIVED ALTHOUGH REFUSED")),
            "{kinds:?}"
        );
        assert_eq!(v.counts.lost, 1);
        // Under faults a duplicate is a note, not a violation.
        let v = run(&ledger[..1], &arrivals[..2], &log, true);
        assert!(v.violations.is_empty(), "{}", v.render(10));
        assert_eq!(v.counts.duplicate_deliveries, 1);
    }

    #[test]
    fn a_report_that_went_to_the_postmaster_is_not_lost() {
        let bad = "r0x0.p@d1.test";
        let sender = "s0@bounce.test";
        let ledger = [entry(0, Some(sender), &[bad], accepted("Q0"))];
        let log = [line("Q0", bad, "failed")];
        let arrivals = [notice(report("1-0", sender, &[(bad, "5.1.1")]), sender)];
        let v = run(&ledger, &arrivals, &log, false);
        assert!(v.violations.is_empty(), "{}", v.render(10));
        assert_eq!(
            (v.counts.lost, v.counts.bounced, v.counts.double_bounced),
            (0, 0, 1)
        );
        assert_eq!(v.counts.notices, 1);
        // Arriving as well as going to the postmaster is a duplicate report.
        let both = [
            arrivals[0].clone(),
            report("1-0", sender, &[(bad, "5.1.1")]),
        ];
        let v = run(&ledger, &both, &log, false);
        assert!(
            v.violations.iter().any(|v| v.starts_with("DUPLICATE")),
            "{}",
            v.render(10)
        );
        // A notice about a report to someone else is caught.
        let stray = [notice(
            report("1-0", sender, &[(bad, "5.1.1")]),
            "other@bounce.test",
        )];
        let v = run(&ledger, &stray, &log, false);
        assert!(
            v.violations
                .iter()
                .any(|v| v.contains("ABOUT A REPORT NOT TO ITS SENDER")),
            "{}",
            v.render(10)
        );
    }

    #[test]
    fn a_message_from_the_null_sender_is_dropped_not_reported() {
        let bad = "r0x0.p@d1.test";
        let ledger = [entry(0, None, &[bad], accepted("Q0"))];
        let log = [line("Q0", bad, "failed")];
        let v = run(&ledger, &[], &log, false);
        assert!(v.violations.is_empty(), "{}", v.render(10));
        assert_eq!(v.counts.dropped, 1);
        // Without the relay's word it is lost.
        let v = run(&ledger, &[], &[], false);
        assert_eq!(v.counts.lost, 1);
    }
}
