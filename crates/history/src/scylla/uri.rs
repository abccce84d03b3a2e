//! The store URI, `scylla://HOST[:PORT][,HOST[:PORT]...]/KEYSPACE[?OPTIONS]`,
//! parsed and checked before anything connects.
//!
//! Options: `replication_factor=N` (default 3) and
//! `strategy=NetworkTopologyStrategy|SimpleStrategy` (default
//! NetworkTopologyStrategy); they only shape a keyspace the store creates. A
//! host without a port gets 9042. Names are checked here so that they can be
//! spliced into CQL text unquoted: a keyspace is `[a-z][a-z0-9_]{0,47}`.

use std::fmt;

/// Port of the CQL native protocol.
pub const DEFAULT_PORT: u16 = 9042;
/// Replication factor of a keyspace the store creates, unless told otherwise.
pub const DEFAULT_REPLICATION_FACTOR: u32 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad scylla uri {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One datacenter, replicas on the next nodes of the ring: test clusters.
    Simple,
    /// Replicas per datacenter, rack-aware: production.
    NetworkTopology,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Simple => "SimpleStrategy",
            Strategy::NetworkTopology => "NetworkTopologyStrategy",
        })
    }
}

/// How a keyspace created by the store is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub strategy: Strategy,
    pub factor: u32,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            strategy: Strategy::NetworkTopology,
            factor: DEFAULT_REPLICATION_FACTOR,
        }
    }
}

impl Replication {
    /// The replication map in CQL, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`
    /// (for NetworkTopologyStrategy the factor applies to every datacenter).
    pub fn cql(&self) -> String {
        format!(
            "{{'class': '{}', 'replication_factor': {}}}",
            self.strategy, self.factor
        )
    }
}

/// A parsed store URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaUri {
    /// Contact points, `host:port` (`[v6]:port`); the driver finds the rest
    /// of the cluster from them.
    pub hosts: Vec<String>,
    pub keyspace: String,
    pub replication: Replication,
}

/// Whether `name` can stand unquoted in CQL as a keyspace or table name part.
pub(crate) fn is_plain_name(name: &str, max: usize, first_letter: bool) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && (!first_letter || name.as_bytes()[0].is_ascii_lowercase())
}

impl ScyllaUri {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let fail = |reason: &str| UriError {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = uri
            .strip_prefix("scylla://")
            .ok_or_else(|| fail("expected scylla://HOST:9042[,HOST...]/KEYSPACE"))?;
        let (hosts, rest) = rest
            .split_once('/')
            .ok_or_else(|| fail("missing /KEYSPACE after the hosts"))?;
        let (keyspace, query) = match rest.split_once('?') {
            Some((k, q)) => (k, Some(q)),
            None => (rest, None),
        };
        if !is_plain_name(keyspace, 48, true) {
            return Err(fail(
                "keyspace must be 1 to 48 of [a-z0-9_], starting with a letter",
            ));
        }
        let hosts = hosts
            .split(',')
            .map(|h| parse_host(h.trim()).map_err(|reason| fail(&reason)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut replication = Replication::default();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "replication_factor" => {
                    replication.factor = value
                        .parse()
                        .ok()
                        .filter(|&n: &u32| n >= 1)
                        .ok_or_else(|| fail("replication_factor must be a whole number >= 1"))?;
                }
                "strategy" => {
                    replication.strategy = match value.to_ascii_lowercase().as_str() {
                        "simplestrategy" | "simple" => Strategy::Simple,
                        "networktopologystrategy" | "networktopology" => Strategy::NetworkTopology,
                        _ => {
                            return Err(fail(
                                "strategy must be NetworkTopologyStrategy or SimpleStrategy",
                            ))
                        }
                    };
                }
                _ => return Err(fail("unknown option (known: replication_factor, strategy)")),
            }
        }
        Ok(ScyllaUri {
            hosts,
            keyspace: keyspace.to_owned(),
            replication,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, to `host:port`.
fn parse_host(host: &str) -> Result<String, String> {
    let bad_port = || format!("bad port in host {host:?}");
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in host {host:?}"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad_port)?),
        };
        (format!("[{addr}]"), port)
    } else {
        match host.rsplit_once(':') {
            Some((name, _)) if name.contains(':') => {
                return Err(format!("put an IPv6 host in brackets: {host:?}"))
            }
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() || name == "[]" || name.contains(['/', '?', '@', ' ']) {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(bad_port)?,
        None => DEFAULT_PORT,
    };
    Ok(format!("{name}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_with_defaults() {
        let u = ScyllaUri::parse("scylla://scylla:9042/chat").unwrap();
        assert_eq!(u.hosts, vec!["scylla:9042"]);
        assert_eq!(u.keyspace, "chat");
        assert_eq!(u.replication, Replication::default());
        assert_eq!(
            u.replication.cql(),
            "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
        );
    }

    #[test]
    fn several_hosts_default_port_and_v6() {
        let u =
            ScyllaUri::parse("scylla://a:9142, b ,10.0.0.3,[::1],[fe80::1]:19042/ks_2").unwrap();
        assert_eq!(
            u.hosts,
            vec![
                "a:9142",
                "b:9042",
                "10.0.0.3:9042",
                "[::1]:9042",
                "[fe80::1]:19042"
            ]
        );
        assert_eq!(u.keyspace, "ks_2");
    }

    #[test]
    fn replication_options() {
        let u = ScyllaUri::parse(
            "scylla://127.0.0.1:9042/chat_test?replication_factor=1&strategy=SimpleStrategy",
        )
        .unwrap();
        assert_eq!(
            u.replication,
            Replication {
                strategy: Strategy::Simple,
                factor: 1
            }
        );
        assert_eq!(
            u.replication.cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let u =
            ScyllaUri::parse("scylla://h/k?strategy=networktopology&replication_factor=5").unwrap();
        assert_eq!(u.replication.strategy, Strategy::NetworkTopology);
        assert_eq!(u.replication.factor, 5);
    }

    #[test]
    fn refuses_what_cannot_be_used() {
        for bad in [
            "kafka://h:9092/chat",
            "scylla://h:9042",
            "scylla://h:9042/",
            "scylla:///chat",
            "scylla://h:x/chat",
            "scylla://h:0/chat",
            "scylla://h:70000/chat",
            "scylla://h,,k/chat",
            "scylla://[::1/chat",
            "scylla://::1:9042/chat",
            "scylla://h/Chat",
            "scylla://h/1chat",
            "scylla://h/chat-test",
            "scylla://h/chat;drop",
            "scylla://h/chat?replication_factor=0",
            "scylla://h/chat?replication_factor=x",
            "scylla://h/chat?strategy=Everywhere",
            "scylla://h/chat?consistency=one",
        ] {
            assert!(ScyllaUri::parse(bad).is_err(), "{bad} was accepted");
        }
        let long = format!("scylla://h/{}", "k".repeat(49));
        assert!(ScyllaUri::parse(&long).is_err());
    }

    #[test]
    fn errors_name_the_uri_and_the_reason() {
        let e = ScyllaUri::parse("scylla://h/chat?x=1").unwrap_err();
        assert!(e.to_string().contains("scylla://h/chat?x=1"));
        assert!(e.to_string().contains("unknown option"));
    }
}
