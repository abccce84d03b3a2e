//! `chat doctor`: what the log's topics and the history store are, against
//! what chat needs of them, each shortfall with how to fix it.
//!
//! The checks are pure functions of what the brokers and the store report
//! ([`topic_findings`], [`version_findings`]), so they are tested without a
//! cluster; [`run`] asks the log and the store, and `chat doctor` prints the
//! findings and exits non-zero when one is a problem.

use serde::Serialize;

use history::versions::{VersionInfo, VersionState};

/// One thing the doctor looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What it is about: a topic, `store`, `events`.
    pub subject: String,
    /// False for a problem.
    pub ok: bool,
    pub what: String,
    /// How to fix it, for a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub(crate) fn ok(subject: &str, what: String) -> Self {
        Finding {
            subject: subject.to_owned(),
            ok: true,
            what,
            fix: None,
        }
    }

    pub(crate) fn problem(subject: &str, what: String, fix: String) -> Self {
        Finding {
            subject: subject.to_owned(),
            ok: false,
            what,
            fix: Some(fix),
        }
    }

    /// One line: `ok` or `PROBLEM`, the subject, what, and the fix.
    pub fn line(&self) -> String {
        match &self.fix {
            None => format!("ok       {}: {}", self.subject, self.what),
            Some(fix) => format!(
                "PROBLEM  {}: {}\n         fix: {fix}",
                self.subject, self.what
            ),
        }
    }
}

/// The doctor's whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The log, as `--log` names it.
    pub log: String,
    pub findings: Vec<Finding>,
    /// Findings that are problems.
    pub problems: usize,
}

impl Report {
    pub fn new(log: String, findings: Vec<Finding>) -> Self {
        let problems = findings.iter().filter(|f| !f.ok).count();
        Report {
            log,
            findings,
            problems,
        }
    }
}

/// What a topic is for, which decides what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// `chat.messages`: the source of truth, `partitions` fixed.
    Messages { partitions: u32 },
    /// `chat.dlq`: kept like the log, any partition count.
    DeadLetters,
    /// `chat.ephemeral`: presence and typing, a short retention.
    Ephemeral,
}

/// What the brokers said of a topic (`None` retention: not reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFacts<'a> {
    pub topic: &'a str,
    /// `None`: the topic does not exist.
    pub layout: Option<(u32, usize)>,
    pub retention_ms: Option<&'a str>,
    /// What `chat serve` refuses the topic for (retention, replicas).
    pub log_problems: Vec<String>,
}

/// The findings of one topic.
pub fn topic_findings(facts: &TopicFacts<'_>, role: TopicRole, replication: i32) -> Vec<Finding> {
    let topic = facts.topic;
    let Some((partitions, replicas)) = facts.layout else {
        let created = match role {
            TopicRole::Messages { partitions } => format!("{partitions} partitions, kept forever"),
            TopicRole::DeadLetters => "1 partition, kept forever".to_owned(),
            TopicRole::Ephemeral => "1 partition, kept 60 s".to_owned(),
        };
        return vec![Finding::ok(
            topic,
            format!("does not exist yet: the first `chat serve` creates it ({created}; or redpanda/bootstrap.sh)"),
        )];
    };
    let mut findings = Vec::new();
    if let TopicRole::Messages { partitions: wanted } = role {
        if partitions != wanted {
            findings.push(Finding::problem(
                topic,
                format!(
                    "{partitions} partitions, but chat is told {wanted} (--partitions): a room's partition is its key's hash modulo the count, so rooms would move"
                ),
                format!(
                    "start chat with --partitions {partitions} (CHAT_PARTITIONS); the count is fixed once the topic exists"
                ),
            ));
        }
    }
    match role {
        TopicRole::Messages { .. } | TopicRole::DeadLetters => {
            for problem in &facts.log_problems {
                let fix = if problem.starts_with("retention") {
                    format!("rpk topic alter-config {topic} --set retention.ms=-1 --set retention.bytes=-1")
                } else {
                    format!(
                        "move the partitions of {topic} to {replication} replicas (rpk cluster partitions move, or kafka-reassign-partitions), or run chat with --log-replication-factor {replicas}"
                    )
                };
                findings.push(Finding::problem(topic, problem.clone(), fix));
            }
        }
        TopicRole::Ephemeral => {
            let forever = matches!(facts.retention_ms.map(str::trim), Some("-1"));
            if forever {
                findings.push(Finding::problem(
                    topic,
                    "retention.ms=-1: presence and typing notices are kept forever, though nothing reads them after a minute".to_owned(),
                    format!("rpk topic alter-config {topic} --set retention.ms=60000"),
                ));
            }
        }
    }
    if findings.is_empty() {
        let kept = match facts.retention_ms {
            Some("-1") => "kept forever".to_owned(),
            Some(ms) => format!("retention.ms={ms}"),
            None => "retention not reported".to_owned(),
        };
        findings.push(Finding::ok(
            topic,
            format!("{partitions} partitions, {replicas} replicas at the fewest, {kept}"),
        ));
    }
    findings
}

/// The findings of the store's projection versions.
pub fn version_findings(versions: &[VersionInfo]) -> Vec<Finding> {
    let Some(current) = versions.iter().find(|v| v.current) else {
        return vec![Finding::problem(
            "store",
            "no current projection version: nothing serves history".to_owned(),
            "chat replay --switch builds one and points reads at it".to_owned(),
        )];
    };
    let mut findings = vec![Finding::ok(
        "store",
        format!(
            "projection version {} serves reads ({} records of the log covered)",
            current.name, current.records
        ),
    )];
    for v in versions.iter().filter(|v| !v.current) {
        let finding = match v.state {
            VersionState::Building => Finding::ok(
                "store",
                format!("version {} is being built (or its replay stopped: `chat replay --into {}` resumes it)", v.name, v.name),
            ),
            VersionState::Ready => Finding::ok(
                "store",
                format!(
                    "version {} is ready and unused ({} records): `chat versions drop {}` frees it",
                    v.name, v.records, v.name
                ),
            ),
        };
        findings.push(finding);
    }
    findings
}

/// What this build reads and writes of the log's events.
pub fn event_findings() -> Vec<Finding> {
    vec![Finding::ok(
        "events",
        format!(
            "this build reads event schemas {}; it writes each event with the oldest that knows it",
            schemas::event::released_versions().join(", ")
        ),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(layout: Option<(u32, usize)>, retention: Option<&'a str>) -> TopicFacts<'a> {
        TopicFacts {
            topic: "chat.messages",
            layout,
            retention_ms: retention,
            log_problems: Vec::new(),
        }
    }

    #[test]
    fn a_good_topic_is_ok_and_says_what_it_is() {
        let f = topic_findings(
            &facts(Some((16, 3)), Some("-1")),
            TopicRole::Messages { partitions: 16 },
            3,
        );
        assert_eq!(f.len(), 1);
        assert!(f[0].ok);
        assert_eq!(
            f[0].what,
            "16 partitions, 3 replicas at the fewest, kept forever"
        );
    }

    #[test]
    fn another_partition_count_is_a_problem_with_its_fix() {
        let f = topic_findings(
            &facts(Some((4, 1)), Some("-1")),
            TopicRole::Messages { partitions: 8 },
            1,
        );
        assert!(!f[0].ok);
        assert!(
            f[0].what.starts_with("4 partitions, but chat is told 8"),
            "{}",
            f[0].what
        );
        assert!(f[0].fix.as_deref().unwrap().contains("--partitions 4"));
    }

    #[test]
    fn what_serve_refuses_is_a_problem_with_the_rpk_fix() {
        let mut facts = facts(Some((16, 1)), Some("604800000"));
        facts.log_problems = vec![
            "retention.ms=604800000: the log would delete records".to_owned(),
            "1 replicas per partition at the fewest, fewer than the 3 asked for".to_owned(),
        ];
        let f = topic_findings(&facts, TopicRole::Messages { partitions: 16 }, 3);
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|f| !f.ok));
        assert!(f[0].fix.as_deref().unwrap().contains("retention.ms=-1"));
        assert!(f[1].fix.as_deref().unwrap().contains("3 replicas"));
    }

    #[test]
    fn an_ephemeral_topic_kept_forever_is_a_problem_and_a_missing_one_is_not() {
        let forever = TopicFacts {
            topic: "chat.ephemeral",
            ..facts(Some((1, 1)), Some("-1"))
        };
        assert!(!topic_findings(&forever, TopicRole::Ephemeral, 1)[0].ok);
        let missing = facts(None, None);
        let f = topic_findings(&missing, TopicRole::Messages { partitions: 16 }, 3);
        assert!(f[0].ok && f[0].what.contains("first `chat serve` creates it"));
    }

    #[test]
    fn the_store_needs_a_current_version() {
        let v = |name: &str, current, state| VersionInfo {
            name: name.into(),
            current,
            state,
            created_ms: 0,
            from: "earliest".into(),
            records: 7,
        };
        assert!(!version_findings(&[])[0].ok);
        let f = version_findings(&[
            v("v1", false, VersionState::Ready),
            v("v2", true, VersionState::Ready),
        ]);
        assert!(f.iter().all(|f| f.ok));
        assert!(f[0].what.starts_with("projection version v2 serves reads"));
        assert!(f[1].what.contains("chat versions drop v1"));
    }
}
