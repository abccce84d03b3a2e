//! Who is in which room, on this node and on the others it hears from: the
//! state behind [`super::Presence`], with no task and no I/O.
//!
//! Promises:
//! - a user is present in a room while at least one of their connections
//!   has joined it, here or on a node heard from within the expiry;
//! - each change of a room's users reaches the room's watchers once, in the
//!   order it happened: a `join` when a user becomes present, a `leave` when
//!   the last connection of the user, on any node, left (two tabs, or two
//!   nodes, of one user are one entry);
//! - what other nodes announce is bounded ([`Bounds`]): users per room and
//!   node, rooms per node, nodes; what is over a bound is not kept (and
//!   counted), so a node cannot grow this one's memory without end. This
//!   node's own entries are bounded by its connection limits.
//!
//! A watcher whose queue is full is kicked as a slow consumer
//! ([`Member::offer`]): a dropped change would leave its list wrong for
//! good, while a reconnect asks again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use schemas::protocol::ServerFrame;
use tokio::time::{Duration, Instant};

use crate::{Frame, Member};

/// The most a node's announcements may hold here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Users of one room on one node (and listed in one answer).
    pub users_per_room: usize,
    /// Rooms of one node.
    pub rooms_per_node: usize,
    /// Other nodes.
    pub nodes: usize,
}

/// One other node, as last heard.
struct Remote {
    heard: Instant,
    rooms: HashMap<String, RemoteRoom>,
}

struct RemoteRoom {
    users: HashSet<String>,
    heard: Instant,
}

#[derive(Default)]
pub(crate) struct State {
    /// Per room: this node's users and how many of their connections joined.
    local: HashMap<String, HashMap<String, u32>>,
    /// Per room: the members told of its changes, by member id.
    watchers: HashMap<String, HashMap<u64, Arc<Member>>>,
    /// Per other node (its source id).
    remote: HashMap<String, Remote>,
    /// Per room and user: how many nodes (this one included) hold the user.
    holders: HashMap<String, HashMap<String, u32>>,
    /// Rooms whose local users changed since they were last announced.
    pub(crate) dirty: HashSet<String>,
    /// A node not heard before spoke: announce every room soon, so it
    /// learns this node's users without waiting for a heartbeat.
    pub(crate) want_full: bool,
    /// Announcements (or parts of them) left out for a bound.
    pub(crate) over_bounds: u64,
    /// (room, user) entries in `holders`, kept as they change.
    entries: usize,
}

/// A change of one room's users.
#[derive(Default)]
struct Change {
    join: Vec<String>,
    leave: Vec<String>,
}

impl State {
    /// A connection of `member`'s user joined `room`.
    pub(crate) fn joined(&mut self, room: &str, member: &Arc<Member>) {
        let count = self
            .local
            .entry(room.to_owned())
            .or_default()
            .entry(member.user().to_owned())
            .or_insert(0);
        *count += 1;
        if *count == 1 {
            self.dirty.insert(room.to_owned());
            if self.hold(room, member.user()) {
                self.tell(
                    room,
                    Change {
                        join: vec![member.user().to_owned()],
                        ..Change::default()
                    },
                );
            }
        }
    }

    /// A connection of `member`'s user left `room` (or closed); it watches
    /// the room no more.
    pub(crate) fn left(&mut self, room: &str, member: &Member) {
        if let Some(w) = self.watchers.get_mut(room) {
            w.remove(&member.id);
            if w.is_empty() {
                self.watchers.remove(room);
            }
        }
        let Some(users) = self.local.get_mut(room) else {
            return;
        };
        let Some(count) = users.get_mut(member.user()) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        users.remove(member.user());
        if users.is_empty() {
            self.local.remove(room);
        }
        self.dirty.insert(room.to_owned());
        if self.release(room, member.user()) {
            self.tell(
                room,
                Change {
                    leave: vec![member.user().to_owned()],
                    ..Change::default()
                },
            );
        }
    }

    /// `member` is told of `room`'s changes from now on (until it leaves);
    /// returns the users present now, sorted, at most `most`, and how many
    /// more there are. Under the same lock as the changes, so the member
    /// gets every change after this list and none before it.
    pub(crate) fn watch(
        &mut self,
        room: &str,
        member: &Arc<Member>,
        most: usize,
    ) -> (Vec<String>, u64) {
        self.watchers
            .entry(room.to_owned())
            .or_default()
            .insert(member.id, member.clone());
        self.users(room, most)
    }

    /// The users present in `room`, sorted, at most `most`, and how many
    /// more there are.
    pub(crate) fn users(&self, room: &str, most: usize) -> (Vec<String>, u64) {
        let Some(holders) = self.holders.get(room) else {
            return (Vec::new(), 0);
        };
        let mut users: Vec<String> = holders.keys().cloned().collect();
        users.sort_unstable();
        let more = users.len().saturating_sub(most) as u64;
        users.truncate(most);
        (users, more)
    }

    /// What this node announces now: its users of each room that changed
    /// since the last announcement, and with `full` of every room it has
    /// users in too; each list sorted and at most `most`. A room nobody
    /// here is in any more has an empty list (the others must hear that,
    /// heartbeat or not).
    pub(crate) fn announcement(&mut self, full: bool, most: usize) -> Vec<(String, Vec<String>)> {
        let mut rooms = std::mem::take(&mut self.dirty);
        if full {
            rooms.extend(self.local.keys().cloned());
        }
        let mut out: Vec<(String, Vec<String>)> = rooms
            .into_iter()
            .map(|room| {
                let mut users: Vec<String> = self
                    .local
                    .get(&room)
                    .map(|u| u.keys().cloned().collect())
                    .unwrap_or_default();
                users.sort_unstable();
                users.truncate(most);
                (room, users)
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Node `source` announced the users it has in each of `rooms` (the
    /// whole set of each room; an empty one: nobody there any more).
    pub(crate) fn announce(
        &mut self,
        source: &str,
        rooms: Vec<(String, Vec<String>)>,
        now: Instant,
        bounds: Bounds,
    ) {
        if !self.remote.contains_key(source) {
            if self.remote.len() >= bounds.nodes {
                self.over_bounds += 1;
                return;
            }
            self.remote.insert(
                source.to_owned(),
                Remote {
                    heard: now,
                    rooms: HashMap::new(),
                },
            );
            self.want_full = true;
        }
        let mut changes = Vec::new();
        {
            let node = self.remote.get_mut(source).expect("inserted above");
            node.heard = now;
            for (room, users) in rooms {
                if users.len() > bounds.users_per_room {
                    self.over_bounds += 1;
                }
                let users: HashSet<String> =
                    users.into_iter().take(bounds.users_per_room).collect();
                let full = node.rooms.len() >= bounds.rooms_per_node;
                let before = match node.rooms.get_mut(&room) {
                    Some(r) => {
                        r.heard = now;
                        std::mem::take(&mut r.users)
                    }
                    None if users.is_empty() => continue,
                    None if full => {
                        self.over_bounds += 1;
                        continue;
                    }
                    None => HashSet::new(),
                };
                let join: Vec<String> = users.difference(&before).cloned().collect();
                let leave: Vec<String> = before.difference(&users).cloned().collect();
                if users.is_empty() {
                    node.rooms.remove(&room);
                } else {
                    node.rooms
                        .insert(room.clone(), RemoteRoom { users, heard: now });
                }
                changes.push((room, join, leave));
            }
        }
        for (room, join, leave) in changes {
            self.apply(&room, join, leave);
        }
    }

    /// Node `source` said goodbye: its users leave every room.
    pub(crate) fn bye(&mut self, source: &str) {
        if let Some(node) = self.remote.remove(source) {
            for (room, r) in node.rooms {
                self.apply(&room, Vec::new(), r.users.into_iter().collect());
            }
        }
    }

    /// Forgets what other nodes announced longer than `expiry` ago (a node
    /// that died, or lost its way to the log): its users leave.
    pub(crate) fn expire(&mut self, now: Instant, expiry: Duration) {
        let mut gone = Vec::new();
        self.remote.retain(|_, node| {
            node.rooms.retain(|room, r| {
                let keep = now.duration_since(r.heard) < expiry;
                if !keep {
                    gone.push((room.clone(), std::mem::take(&mut r.users)));
                }
                keep
            });
            now.duration_since(node.heard) < expiry || !node.rooms.is_empty()
        });
        for (room, users) in gone {
            self.apply(&room, Vec::new(), users.into_iter().collect());
        }
    }

    /// Other nodes heard from within the expiry.
    pub(crate) fn nodes(&self) -> usize {
        self.remote.len()
    }

    /// (room, user) entries present, over every node.
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }

    /// True when no node (this one included) has anyone in any room.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.local.is_empty() && self.entries == 0
    }

    /// One node more holds `user` in `room`; true when the user was not
    /// present before.
    fn hold(&mut self, room: &str, user: &str) -> bool {
        let count = self
            .holders
            .entry(room.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_insert(0);
        *count += 1;
        let new = *count == 1;
        self.entries += usize::from(new);
        new
    }

    /// One node fewer holds `user` in `room`; true when nobody does now.
    fn release(&mut self, room: &str, user: &str) -> bool {
        let Some(users) = self.holders.get_mut(room) else {
            return false;
        };
        let Some(count) = users.get_mut(user) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        users.remove(user);
        if users.is_empty() {
            self.holders.remove(room);
        }
        self.entries -= 1;
        true
    }

    /// Holds the `join`ed users and releases the `leave`s of one node in
    /// `room`, and tells the watchers what that changed.
    fn apply(&mut self, room: &str, join: Vec<String>, leave: Vec<String>) {
        let mut change = Change::default();
        for user in join {
            if self.hold(room, &user) {
                change.join.push(user);
            }
        }
        for user in leave {
            if self.release(room, &user) {
                change.leave.push(user);
            }
        }
        self.tell(room, change);
    }

    /// Sends `change` to the watchers of `room`, one frame per kind.
    fn tell(&self, room: &str, mut change: Change) {
        let Some(watchers) = self.watchers.get(room) else {
            return;
        };
        change.join.sort_unstable();
        change.leave.sort_unstable();
        let frame = |join: Option<&[String]>, leave: Option<&[String]>| {
            Frame::from(
                ServerFrame::Presence {
                    room,
                    users: None,
                    more: 0,
                    join,
                    leave,
                }
                .to_json(),
            )
        };
        let mut frames = Vec::new();
        if !change.join.is_empty() {
            frames.push(frame(Some(&change.join), None));
        }
        if !change.leave.is_empty() {
            frames.push(frame(None, Some(&change.leave)));
        }
        for f in frames {
            for member in watchers.values() {
                member.offer(f.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;

    const BOUNDS: Bounds = Bounds {
        users_per_room: 3,
        rooms_per_node: 2,
        nodes: 2,
    };
    const EXPIRY: Duration = Duration::from_secs(15);

    fn member(user: &str) -> (Arc<Member>, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(64);
        (Member::new(user, tx, CancellationToken::new()), rx)
    }

    fn frames(rx: &mut mpsc::Receiver<Frame>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            out.push(serde_json::from_str(f.as_str()).unwrap());
        }
        out
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn two_tabs_of_one_user_are_one_entry_and_leave_once() {
        let mut st = State::default();
        let (watcher, mut seen) = member("carol");
        st.joined("r", &watcher);
        assert_eq!(st.watch("r", &watcher, 10), (names(&["carol"]), 0));
        let (tab1, _) = member("bob");
        let (tab2, _) = member("bob");
        st.joined("r", &tab1);
        st.joined("r", &tab2);
        assert_eq!(st.users("r", 10).0, names(&["bob", "carol"]));
        st.left("r", &tab1);
        assert_eq!(
            st.users("r", 10).0,
            names(&["bob", "carol"]),
            "one tab is still open"
        );
        st.left("r", &tab2);
        assert_eq!(st.users("r", 10).0, names(&["carol"]));
        let told = frames(&mut seen);
        assert_eq!(
            told,
            vec![
                serde_json::json!({"type": "presence", "room": "r", "join": ["bob"]}),
                serde_json::json!({"type": "presence", "room": "r", "leave": ["bob"]}),
            ]
        );
        st.left("r", &watcher);
        assert!(st.is_empty());
    }

    #[test]
    fn a_user_on_two_nodes_leaves_when_both_are_gone() {
        let mut st = State::default();
        let now = Instant::now();
        let (watcher, mut seen) = member("carol");
        st.joined("r", &watcher);
        st.watch("r", &watcher, 10);
        let (here, _) = member("bob");
        st.joined("r", &here);
        st.announce(
            "gw-b/1",
            vec![("r".into(), names(&["bob", "dave"]))],
            now,
            BOUNDS,
        );
        assert!(
            st.want_full,
            "a node heard for the first time asks for everything"
        );
        assert_eq!(st.users("r", 10).0, names(&["bob", "carol", "dave"]));
        st.left("r", &here);
        assert_eq!(
            st.users("r", 10).0,
            names(&["bob", "carol", "dave"]),
            "bob is still on gw-b"
        );
        st.announce("gw-b/1", vec![("r".into(), names(&["dave"]))], now, BOUNDS);
        st.bye("gw-b/1");
        assert_eq!(st.users("r", 10).0, names(&["carol"]));
        let told = frames(&mut seen);
        let kinds: Vec<(String, Value)> = told
            .iter()
            .map(|f| {
                let kind = if f.get("join").is_some() {
                    "join"
                } else {
                    "leave"
                };
                (kind.to_owned(), f[kind].clone())
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("join".into(), serde_json::json!(["bob"])),
                ("join".into(), serde_json::json!(["dave"])),
                ("leave".into(), serde_json::json!(["bob"])),
                ("leave".into(), serde_json::json!(["dave"])),
            ]
        );
    }

    #[test]
    fn a_node_not_heard_within_the_expiry_leaves_and_a_heartbeat_keeps_it() {
        let mut st = State::default();
        let start = Instant::now();
        st.announce("a/1", vec![("r".into(), names(&["ann"]))], start, BOUNDS);
        st.announce("b/1", vec![("r".into(), names(&["ben"]))], start, BOUNDS);
        // a's heartbeat arrives, b's does not.
        let later = start + EXPIRY / 2;
        st.announce("a/1", vec![("r".into(), names(&["ann"]))], later, BOUNDS);
        st.expire(start + EXPIRY, EXPIRY);
        assert_eq!(st.users("r", 10).0, names(&["ann"]));
        assert_eq!(st.nodes(), 1);
        st.expire(later + EXPIRY, EXPIRY);
        assert!(st.is_empty());
        assert_eq!(st.nodes(), 0);
    }

    #[test]
    fn what_a_node_announces_beyond_the_bounds_is_not_kept() {
        let mut st = State::default();
        let now = Instant::now();
        st.announce(
            "a/1",
            vec![("r1".into(), names(&["u1", "u2", "u3", "u4"]))],
            now,
            BOUNDS,
        );
        assert_eq!(st.users("r1", 10).0.len(), 3, "users per room and node");
        st.announce(
            "a/1",
            vec![("r2".into(), names(&["u"])), ("r3".into(), names(&["u"]))],
            now,
            BOUNDS,
        );
        assert_eq!(st.users("r3", 10).0.len(), 0, "rooms per node");
        st.announce("b/1", vec![], now, BOUNDS);
        st.announce("c/1", vec![("r1".into(), names(&["z"]))], now, BOUNDS);
        assert_eq!(st.nodes(), 2, "nodes");
        assert_eq!(st.over_bounds, 3);
        // An answer lists at most what it is asked for, and says how many more.
        assert_eq!(st.users("r1", 2), (names(&["u1", "u2"]), 1));
        assert_eq!(st.entries(), 4);
    }

    #[test]
    fn an_announcement_names_the_changed_rooms_and_a_full_one_every_room_too() {
        let mut st = State::default();
        let (a, _) = member("ann");
        st.joined("r1", &a);
        assert_eq!(
            st.announcement(false, 10),
            vec![("r1".into(), names(&["ann"]))]
        );
        assert_eq!(st.announcement(false, 10), vec![], "nothing changed since");
        st.joined("r2", &a);
        st.left("r2", &a);
        // A heartbeat while r2 emptied: it still says r2 is empty.
        assert_eq!(
            st.announcement(true, 10),
            vec![("r1".into(), names(&["ann"])), ("r2".into(), vec![])]
        );
        assert_eq!(
            st.announcement(true, 10),
            vec![("r1".into(), names(&["ann"]))]
        );
    }
}
