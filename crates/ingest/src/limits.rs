//! Abuse limits: how fast a connection and a user may send, how many
//! connections an address and a user may hold, how many rooms a connection
//! may join, how large a frame and a request body may be, how long a silent
//! connection lives, and which web origins may open one.
//!
//! Each limit answers the one request that broke it (docs/protocol.md,
//! Limits) and appends nothing: every check here runs before a send claims
//! its id. Send rates are token buckets (GCRA, the `governor` crate): one
//! per connection, and one per user shared by that user's connections and
//! posts on this node. Counts of connections are a map under a std mutex,
//! taken only to count (never across an await); a [`Slot`] gives its
//! connection back when dropped, however the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use schemas::protocol::{ErrorCode, FrameError};

/// A token bucket: `per_second` sends on average, `burst` at once. A rate
/// of 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };

    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst).unwrap_or(per_second);
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

/// Which web pages may open a WebSocket, by their `Origin` header. A
/// request without one (not from a browser) is never refused for it: the
/// check protects browsers' users from pages of other sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// An `Origin` whose host and port are the request's `Host`.
    SameHost,
    /// Any origin.
    Any,
    /// Exactly these origins (`https://chat.example.com`), compared without
    /// case and without a trailing `/`.
    List(Vec<String>),
}

impl Origins {
    /// The policy of the `--allowed-origin` values: none is
    /// [`Origins::SameHost`], a `*` among them [`Origins::Any`].
    pub fn from_flags(values: &[String]) -> Origins {
        if values.is_empty() {
            Origins::SameHost
        } else if values.iter().any(|v| v == "*") {
            Origins::Any
        } else {
            Origins::List(values.iter().map(|v| normalize(v)).collect())
        }
    }

    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        match self {
            Origins::Any => true,
            Origins::List(allowed) => allowed.contains(&normalize(origin)),
            Origins::SameHost => {
                let authority = origin
                    .split_once("://")
                    .map_or("", |(_, rest)| rest.trim_end_matches('/'));
                host.is_some_and(|h| !authority.is_empty() && authority.eq_ignore_ascii_case(h))
            }
        }
    }
}

fn normalize(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Every limit, each set by a `chat serve` flag.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sends and typing frames of one connection.
    pub send_rate: Rate,
    /// Sends and typing frames of one user, over all its connections and
    /// posts on this node.
    pub user_send_rate: Rate,
    /// Open WebSocket connections from one IP address; 0 is no limit.
    pub connections_per_ip: usize,
    /// Open WebSocket connections of one user on this node; 0 is no limit.
    pub connections_per_user: usize,
    /// Rooms one connection may have joined at once; 0 is no limit.
    pub rooms_per_connection: usize,
    /// Largest WebSocket frame or message; a larger one closes with 1009.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body; a larger one is `too_large` (413).
    pub max_body_bytes: usize,
    /// How often the server pings a connection; zero: never.
    pub ping_every: Duration,
    /// How long a connection may stay silent (no frame, no pong) before it
    /// is closed with 4002; zero: forever.
    pub idle_timeout: Duration,
    pub origins: Origins,
    /// Proxies whose `X-Forwarded-For` names the client's address for the
    /// per-address count; without them, the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            send_rate: Rate {
                per_second: 20,
                burst: 100,
            },
            user_send_rate: Rate {
                per_second: 50,
                burst: 200,
            },
            connections_per_ip: 1000,
            connections_per_user: 50,
            rooms_per_connection: 500,
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 64 * 1024,
            ping_every: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            origins: Origins::SameHost,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Limits {
    /// No rate or count limit (sizes as by default): for benchmarks and
    /// tests that send as fast as they can.
    pub fn unlimited() -> Limits {
        Limits {
            send_rate: Rate::OFF,
            user_send_rate: Rate::OFF,
            connections_per_ip: 0,
            connections_per_user: 0,
            rooms_per_connection: 0,
            ping_every: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            origins: Origins::Any,
            ..Limits::default()
        }
    }
}

impl Limits {
    /// The address a connection counts against: the TCP `peer`, or, when
    /// the peer is a trusted proxy, the right-most address of
    /// `X-Forwarded-For` that is not a trusted proxy itself (the one the
    /// nearest untrusted hop connected from; entries left of it could be
    /// made up by the client).
    pub fn client_ip(&self, peer: Option<IpAddr>, forwarded_for: &[&str]) -> Option<IpAddr> {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        let peer = peer?;
        if !trusted(&peer) {
            return Some(peer);
        }
        let mut hops = forwarded_for
            .iter()
            .rev()
            .flat_map(|header| header.rsplit(','))
            .map(str::trim);
        let mut client = peer;
        for hop in &mut hops {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted(&ip) => client = ip,
                Ok(ip) => return Some(ip),
                // Not an address: nothing further left can be believed.
                Err(_) => return Some(client),
            }
        }
        Some(client)
    }
}

/// The limits of one node, and what they count.
pub(crate) struct Guard {
    pub(crate) limits: Limits,
    users: Option<DefaultKeyedRateLimiter<String>>,
    /// Size of the user map that triggers the next sweep of full buckets.
    sweep_at: AtomicUsize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
}

/// Smallest user map that is swept; a sweep then waits for twice the size
/// it left, so sweeping costs O(1) per check on average.
const SWEEP_FLOOR: usize = 4096;

impl Guard {
    pub(crate) fn new(limits: Limits) -> Arc<Guard> {
        Arc::new(Guard {
            users: limits.user_send_rate.quota().map(RateLimiter::keyed),
            limits,
            sweep_at: AtomicUsize::new(SWEEP_FLOOR),
            counts: Mutex::default(),
        })
    }

    /// The bucket of one new connection, if sends are limited.
    pub(crate) fn connection_bucket(&self) -> Option<DefaultDirectRateLimiter> {
        self.limits.send_rate.quota().map(RateLimiter::direct)
    }

    /// Takes one send of `user` from its connection's bucket and the user's;
    /// when either is empty, the `rate_limited` error for the request `id`.
    /// `user` is the map's key type, so an accepted send allocates nothing;
    /// `id` is copied only into a refusal.
    #[allow(clippy::ptr_arg)]
    pub(crate) fn take_send(
        &self,
        connection: Option<&DefaultDirectRateLimiter>,
        user: &String,
        id: Option<&str>,
    ) -> Result<(), FrameError> {
        if let Some(bucket) = connection {
            if let Err(until) = bucket.check() {
                // The bucket's own clock: making a clock calibrates it
                // (CPUID, a trap to the hypervisor on a VM: ~30 us).
                let wait = until.wait_time_from(bucket.clock().now());
                return Err(rate_limited("this connection sends too fast", id, wait));
            }
        }
        let Some(users) = &self.users else {
            return Ok(());
        };
        let checked = users.check_key(user);
        self.sweep(users);
        match checked {
            Ok(()) => Ok(()),
            Err(until) => {
                let wait = until.wait_time_from(users.clock().now());
                Err(rate_limited("this user sends too fast", id, wait))
            }
        }
    }

    /// Forgets the buckets that are full again (their users idle), once the
    /// map has doubled since the last sweep.
    fn sweep(&self, users: &DefaultKeyedRateLimiter<String>) {
        let at = self.sweep_at.load(Ordering::Relaxed);
        if users.len() < at {
            return;
        }
        users.retain_recent();
        users.shrink_to_fit();
        let next = (users.len() * 2).max(SWEEP_FLOOR);
        self.sweep_at.store(next, Ordering::Relaxed);
    }

    /// Counts a new connection from `ip` of `user` (none: a dev-mode
    /// connection without a user, closed at once), or says which limit it
    /// breaks.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        user: Option<&str>,
    ) -> Result<Slot, FrameError> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let per_ip = self.limits.connections_per_ip;
        let per_user = self.limits.connections_per_user;
        if let Some(ip) = ip {
            if per_ip > 0 && counts.per_ip.get(&ip).copied().unwrap_or(0) >= per_ip {
                return Err(limit_reached(format!(
                    "{ip} holds {per_ip} connections, the most one address may"
                )));
            }
        }
        if let Some(user) = user {
            if per_user > 0 && counts.per_user.get(user).copied().unwrap_or(0) >= per_user {
                return Err(limit_reached(format!(
                    "{user} holds {per_user} connections on this node, the most one user may"
                )));
            }
        }
        if let Some(ip) = ip {
            *counts.per_ip.entry(ip).or_default() += 1;
        }
        if let Some(user) = user {
            *counts.per_user.entry(user.to_owned()).or_default() += 1;
        }
        Ok(Slot {
            guard: self.clone(),
            ip,
            user: user.map(str::to_owned),
        })
    }

    /// Open connections counted for `ip` and for `user`.
    #[cfg(test)]
    pub(crate) fn held(&self, ip: IpAddr, user: &str) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (
            counts.per_ip.get(&ip).copied().unwrap_or(0),
            counts.per_user.get(user).copied().unwrap_or(0),
        )
    }
}

/// One counted connection; dropping it gives the connection back.
pub(crate) struct Slot {
    guard: Arc<Guard>,
    ip: Option<IpAddr>,
    user: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.guard.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = self.ip {
            release(&mut counts.per_ip, &ip);
        }
        if let Some(user) = &self.user {
            release(&mut counts.per_user, user);
        }
    }
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

fn rate_limited(what: &str, id: Option<&str>, wait: Duration) -> FrameError {
    FrameError::rate_limited(
        format!("{what}; nothing was appended; try again later"),
        id.map(str::to_owned),
        wait,
    )
}

/// A request past a limit that waiting does not lift.
pub(crate) fn limit_reached(message: String) -> FrameError {
    FrameError::new(ErrorCode::LimitReached, message, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_burst_through_then_says_how_long_to_wait() {
        let guard = Guard::new(Limits {
            send_rate: Rate {
                per_second: 1,
                burst: 3,
            },
            user_send_rate: Rate::OFF,
            ..Limits::default()
        });
        let bucket = guard.connection_bucket();
        let alice = "alice".to_owned();
        for _ in 0..3 {
            guard.take_send(bucket.as_ref(), &alice, None).unwrap();
        }
        let e = guard
            .take_send(bucket.as_ref(), &alice, Some("m4"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.id.as_deref(), Some("m4"));
        // One token a second: the next comes in at most a second.
        let wait = e.retry_after_ms.unwrap();
        assert!((1..=1000).contains(&wait), "{wait}");
    }

    #[test]
    fn a_users_bucket_is_shared_by_its_connections_not_by_others() {
        let guard = Guard::new(Limits {
            send_rate: Rate::OFF,
            user_send_rate: Rate {
                per_second: 1,
                burst: 2,
            },
            ..Limits::default()
        });
        let (a, b) = (guard.connection_bucket(), guard.connection_bucket());
        let alice = "alice".to_owned();
        guard.take_send(a.as_ref(), &alice, None).unwrap();
        guard.take_send(b.as_ref(), &alice, None).unwrap();
        assert!(guard.take_send(a.as_ref(), &alice, None).is_err());
        guard
            .take_send(a.as_ref(), &"bob".to_owned(), None)
            .unwrap();
    }

    #[test]
    fn connections_are_counted_per_address_and_user_and_given_back() {
        let guard = Guard::new(Limits {
            connections_per_ip: 2,
            connections_per_user: 1,
            ..Limits::default()
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let alice = guard.admit(Some(ip), Some("alice")).unwrap();
        let e = guard.admit(Some(ip), Some("alice")).err().unwrap();
        assert_eq!(e.code, ErrorCode::LimitReached);
        let bob = guard.admit(Some(ip), Some("bob")).unwrap();
        assert_eq!(
            guard.admit(Some(ip), Some("carol")).err().unwrap().code,
            ErrorCode::LimitReached
        );
        assert_eq!(guard.held(ip, "alice"), (2, 1));
        drop(alice);
        drop(bob);
        assert_eq!(guard.held(ip, "alice"), (0, 0));
        guard.admit(Some(ip), Some("alice")).unwrap();
    }

    #[test]
    fn the_client_address_is_the_peer_unless_a_trusted_proxy_forwards_it() {
        let limits = Limits {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Limits::default()
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            limits.client_ip(ip("203.0.113.9"), &["1.2.3.4"]),
            ip("203.0.113.9")
        );
        // A trusted proxy: the right-most untrusted hop.
        assert_eq!(
            limits.client_ip(ip("10.0.0.5"), &["6.6.6.6, 198.51.100.7, 10.0.0.9"]),
            ip("198.51.100.7")
        );
        // Several headers read as one list, the last header last.
        assert_eq!(
            limits.client_ip(ip("10.0.0.5"), &["6.6.6.6", "198.51.100.7"]),
            ip("198.51.100.7")
        );
        // No header, only proxies, or garbage: the last address believed.
        assert_eq!(limits.client_ip(ip("10.0.0.5"), &[]), ip("10.0.0.5"));
        assert_eq!(
            limits.client_ip(ip("10.0.0.5"), &["10.1.1.1"]),
            ip("10.1.1.1")
        );
        assert_eq!(
            limits.client_ip(ip("10.0.0.5"), &["1.1.1.1, junk"]),
            ip("10.0.0.5")
        );
        assert_eq!(
            Limits::default().client_ip(ip("10.0.0.5"), &["1.1.1.1"]),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn origins_same_host_by_default_a_list_or_any() {
        let same = Origins::from_flags(&[]);
        assert!(same.allows(None, Some("chat.test:8080")));
        assert!(same.allows(Some("http://chat.test:8080"), Some("chat.test:8080")));
        assert!(same.allows(Some("https://CHAT.test:8080/"), Some("chat.test:8080")));
        assert!(!same.allows(Some("http://evil.test"), Some("chat.test:8080")));
        assert!(!same.allows(Some("http://chat.test"), Some("chat.test:8080")));
        assert!(!same.allows(Some("null"), Some("chat.test:8080")));
        let list = Origins::from_flags(&["https://app.example.com/".into()]);
        assert!(list.allows(Some("https://APP.example.com"), Some("chat.test")));
        assert!(!list.allows(Some("https://chat.test"), Some("chat.test")));
        let any = Origins::from_flags(&["https://a.test".into(), "*".into()]);
        assert!(any.allows(Some("http://evil.test"), None));
    }
}
