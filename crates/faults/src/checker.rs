//! The checker: what the history and the clients' records must satisfy.
//!
//! Pure: it takes the records and the histories and returns a [`Report`];
//! a run passes when every violation count is zero.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::client::Record;

/// Room -> (offset, id), oldest first.
pub type History = BTreeMap<String, Vec<(i64, String)>>;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub backend: crate::Backend,
    pub duration_s: f64,
    /// SIGKILLs by process.
    pub kills: BTreeMap<String, u64>,
    /// SIGSTOP/SIGCONT stalls by process.
    pub stalls: BTreeMap<String, u64>,
    /// Network partitions from the broker, by node.
    pub partitions: BTreeMap<String, u64>,
    pub clients: usize,
    pub sent: usize,
    /// Distinct ids acked.
    pub acked: usize,
    /// Sent, never acked (the client gave up waiting); not a violation.
    pub unacked: usize,
    pub reconnects: u64,
    /// Joins with `since` (resumes), and how many were answered
    /// `recovered:true`.
    pub resumes: usize,
    pub resumes_recovered: usize,
    /// POSTs the clients abandoned mid-flight (and retried).
    pub abandoned_posts: u64,
    pub delivered: usize,
    /// Acked ids missing from a complete history.
    pub lost: usize,
    /// Acked ids in no store of the projector group (its members split the
    /// partitions, so together they must hold everything).
    pub lost_by_projector_group: usize,
    /// An id twice in one history.
    pub duplicated_in_history: usize,
    /// An id delivered twice to one client.
    pub duplicated_deliveries: usize,
    /// A client received a room's messages out of offset order, or a
    /// history is not in offset order.
    pub order_violations: usize,
    /// A message in history after a client's join position that the client
    /// never received.
    pub gaps: usize,
    /// A message in history that nobody sent.
    pub phantoms: usize,
    /// A resume answered `recovered:true` after which a message between its
    /// `since` and the head it was given never reached the client.
    pub false_recovered: usize,
    /// Sends a gateway never answered on a connection that stayed open
    /// (see [`crate::client::REQUEST_BOUND`]).
    pub never_ended: usize,
    /// Complete histories (gateways with their own stores) that differ.
    pub divergent_histories: usize,
    /// Error frames clients got, by code.
    pub errors: BTreeMap<String, u64>,
    /// A few examples of each violation, for debugging.
    pub examples: Vec<String>,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.lost
            + self.lost_by_projector_group
            + self.duplicated_in_history
            + self.duplicated_deliveries
            + self.order_violations
            + self.gaps
            + self.phantoms
            + self.false_recovered
            + self.never_ended
            + self.divergent_histories
    }

    pub fn passed(&self) -> bool {
        self.violations() == 0
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 20 {
            self.examples.push(text);
        }
    }

    /// One line for humans and CI logs.
    pub fn summary(&self) -> String {
        format!(
            "{:?}: {} kills, {} stalls, {} partitions, {} abandoned posts, {} sent, {} acked, {} resumes ({} recovered), {} lost, {} lost by the projector group, {} duplicated in history, {} duplicated deliveries, {} order violations, {} gaps, {} false recovered, {} requests never ended, {} phantoms, {} divergent histories -> {}",
            self.backend,
            self.kills.values().sum::<u64>(),
            self.stalls.values().sum::<u64>(),
            self.partitions.values().sum::<u64>(),
            self.abandoned_posts,
            self.sent,
            self.acked,
            self.resumes,
            self.resumes_recovered,
            self.lost,
            self.lost_by_projector_group,
            self.duplicated_in_history,
            self.duplicated_deliveries,
            self.order_violations,
            self.gaps,
            self.false_recovered,
            self.never_ended,
            self.phantoms,
            self.divergent_histories,
            if self.passed() { "PASS" } else { "FAIL" },
        )
    }
}

/// Checks the clients' records against the histories of the nodes:
/// `complete` ones must hold everything, `partial` ones (projectors sharing
/// a group, each with its own store) a consistent subset.
pub fn check(
    records: &[Record],
    complete: &BTreeMap<String, History>,
    partial: &BTreeMap<String, History>,
    sent: &HashSet<String>,
) -> Report {
    let mut r = Report {
        clients: records.len(),
        sent: sent.len(),
        ..Default::default()
    };
    let acked: HashSet<&str> = records
        .iter()
        .flat_map(|c| c.acks.keys().map(String::as_str))
        .collect();
    r.acked = acked.len();
    r.unacked = records.iter().map(|c| c.unacked.len()).sum();
    r.reconnects = records.iter().map(|c| c.reconnects).sum();
    r.abandoned_posts = records.iter().map(|c| c.abandoned_posts).sum();
    r.resumes = records.iter().map(|c| c.resumes.len()).sum();
    r.resumes_recovered = records
        .iter()
        .flat_map(|c| &c.resumes)
        .filter(|j| j.recovered)
        .count();
    for c in records {
        r.never_ended += c.never_ended.len();
        for id in c.never_ended.iter().take(3) {
            r.example(format!("{}: send {id} never answered", c.user));
        }
    }
    for c in records {
        for (code, n) in &c.errors {
            *r.errors.entry(code.clone()).or_default() += n;
        }
    }

    for (node, history) in complete.iter().chain(partial) {
        let is_complete = complete.contains_key(node);
        let mut ids: HashSet<&str> = HashSet::new();
        for (room, rows) in history {
            for w in rows.windows(2) {
                if w[0].0 >= w[1].0 {
                    r.order_violations += 1;
                    r.example(format!(
                        "{node}: history of {room} out of order at {}",
                        w[1].0
                    ));
                }
            }
            for (offset, id) in rows {
                if !ids.insert(id) {
                    r.duplicated_in_history += 1;
                    r.example(format!(
                        "{node}: {id} twice in history (again at {room}/{offset})"
                    ));
                }
                if !sent.contains(id) {
                    r.phantoms += 1;
                    r.example(format!("{node}: {id} at {room}/{offset} was never sent"));
                }
            }
        }
        if is_complete {
            for id in &acked {
                if !ids.contains(id) {
                    r.lost += 1;
                    r.example(format!("{node}: acked {id} missing"));
                }
            }
        }
    }
    // Projectors of one group split the partitions, each into its own
    // store: what was acked must be in one of them.
    if !partial.is_empty() {
        let held: HashSet<&str> = partial
            .values()
            .flat_map(|h| h.values().flatten().map(|(_, id)| id.as_str()))
            .collect();
        for id in &acked {
            if !held.contains(id) {
                r.lost_by_projector_group += 1;
                r.example(format!(
                    "projector group: acked {id} in no projector's store"
                ));
            }
        }
    }
    let mut reference: Option<(&String, &History)> = None;
    for (node, history) in complete {
        match reference {
            None => reference = Some((node, history)),
            Some((first, h)) if h != history => {
                r.divergent_histories += 1;
                r.example(format!("histories of {first} and {node} differ"));
            }
            Some(_) => {}
        }
    }

    // What each client received, against the reference history.
    if let Some((_, reference)) = reference {
        for c in records {
            for room in &c.rooms {
                let got = c.received.get(room).cloned().unwrap_or_default();
                r.delivered += got.len();
                let mut seen: HashMap<&str, i64> = HashMap::new();
                for w in got.windows(2) {
                    if w[0].0 >= w[1].0 {
                        r.order_violations += 1;
                        r.example(format!(
                            "{}: {room} delivered {} after {}",
                            c.user, w[1].0, w[0].0
                        ));
                    }
                }
                for (offset, id) in &got {
                    if let Some(first) = seen.insert(id, *offset) {
                        r.duplicated_deliveries += 1;
                        r.example(format!(
                            "{}: {id} delivered at {first} and {offset}",
                            c.user
                        ));
                    }
                }
                for j in c.resumes.iter().filter(|j| j.recovered && &j.room == room) {
                    let missed = reference
                        .get(room)
                        .into_iter()
                        .flatten()
                        .find(|(offset, id)| {
                            (j.since + 1..=j.head).contains(offset)
                                && !seen.contains_key(id.as_str())
                        });
                    if let Some((offset, id)) = missed {
                        r.false_recovered += 1;
                        r.example(format!(
                            "{}: joined {room} since {} recovered:true, never got {offset} ({id})",
                            c.user, j.since
                        ));
                    }
                }
                let Some(start) = c.start.get(room) else {
                    continue;
                };
                for (offset, id) in reference.get(room).into_iter().flatten() {
                    if offset > start && !seen.contains_key(id.as_str()) {
                        r.gaps += 1;
                        r.example(format!(
                            "{}: {room}/{offset} ({id}) never delivered",
                            c.user
                        ));
                    }
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(received: &[(i64, &str)], acks: &[&str]) -> Record {
        let mut c = Record {
            user: "c".into(),
            rooms: vec!["r".into()],
            ..Default::default()
        };
        c.start.insert("r".into(), -1);
        c.received.insert(
            "r".into(),
            received.iter().map(|(o, i)| (*o, i.to_string())).collect(),
        );
        for a in acks {
            c.acks.insert(a.to_string(), vec![0]);
            c.sent.push((a.to_string(), "r".into()));
        }
        c
    }

    fn history(rows: &[(i64, &str)]) -> BTreeMap<String, History> {
        let h: History = [(
            "r".to_owned(),
            rows.iter().map(|(o, i)| (*o, i.to_string())).collect(),
        )]
        .into();
        [("gw".to_owned(), h)].into()
    }

    fn sent(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let c = client(&[(0, "a"), (1, "b")], &["a", "b"]);
        let r = check(
            &[c],
            &history(&[(0, "a"), (1, "b")]),
            &BTreeMap::new(),
            &sent(&["a", "b"]),
        );
        assert!(r.passed(), "{:?}", r.examples);
        assert_eq!((r.acked, r.delivered), (2, 2));
    }

    #[test]
    fn every_violation_is_counted() {
        // b acked but lost; a delivered twice; c out of order; d never
        // delivered; z never sent.
        let c = client(&[(0, "a"), (0, "a"), (5, "c"), (3, "x")], &["a", "b"]);
        let h = history(&[(0, "a"), (3, "x"), (5, "c"), (6, "d"), (7, "z")]);
        let r = check(
            &[c],
            &h,
            &BTreeMap::new(),
            &sent(&["a", "b", "c", "d", "x"]),
        );
        assert_eq!(r.lost, 1);
        assert_eq!(r.duplicated_deliveries, 1);
        assert!(r.order_violations >= 1);
        assert_eq!(r.gaps, 2, "d and z were never delivered");
        assert_eq!(r.phantoms, 1);
        assert!(!r.passed());
    }

    #[test]
    fn a_resume_that_missed_a_message_is_a_false_recovered() {
        let mut c = client(&[(0, "a"), (2, "c")], &["a", "c"]);
        let resume = |since, recovered| crate::client::Resume {
            room: "r".into(),
            since,
            head: 2,
            recovered,
        };
        c.resumes.push(resume(0, true));
        c.resumes.push(resume(1, true));
        c.resumes.push(resume(0, false));
        c.never_ended.push("c".into());
        let h = history(&[(0, "a"), (1, "b"), (2, "c")]);
        let r = check(&[c], &h, &BTreeMap::new(), &sent(&["a", "b", "c"]));
        assert_eq!(
            r.false_recovered, 1,
            "since 0 missed b; since 1 and recovered:false did not promise it"
        );
        assert_eq!((r.resumes, r.resumes_recovered), (3, 2));
        assert_eq!(r.never_ended, 1);
        assert!(!r.passed());
    }

    #[test]
    fn duplicates_and_divergence_in_histories_are_counted() {
        let mut complete = history(&[(0, "a"), (1, "a")]);
        complete.insert("gw2".into(), history(&[(0, "a")]).remove("gw").unwrap());
        let r = check(&[], &complete, &BTreeMap::new(), &sent(&["a"]));
        assert_eq!(r.duplicated_in_history, 1);
        assert_eq!(r.divergent_histories, 1);
    }

    #[test]
    fn a_projector_group_must_hold_every_acked_message_between_its_members() {
        let c = client(&[(0, "a"), (1, "b"), (2, "c")], &["a", "b", "c"]);
        let complete = history(&[(0, "a"), (1, "b"), (2, "c")]);
        let mut group = BTreeMap::new();
        group.insert("p1".to_owned(), history(&[(0, "a")]).remove("gw").unwrap());
        group.insert("p2".to_owned(), history(&[(1, "b")]).remove("gw").unwrap());
        let r = check(
            std::slice::from_ref(&c),
            &complete,
            &group,
            &sent(&["a", "b", "c"]),
        );
        assert_eq!(
            r.lost_by_projector_group, 1,
            "c is in neither projector's store"
        );
        assert_eq!(r.lost, 0, "the gateway holds it");
        assert!(!r.passed());

        group.insert(
            "p2".to_owned(),
            history(&[(1, "b"), (2, "c")]).remove("gw").unwrap(),
        );
        let r = check(&[c], &complete, &group, &sent(&["a", "b", "c"]));
        assert!(r.passed(), "{:?}", r.examples);
    }
}
