//! The gateway a run talks to, given as a URL such as `ws://127.0.0.1:8080`.
//!
//! Runs on this project's machines may only send traffic to the machine
//! itself, so a target must resolve to a loopback address (127.0.0.0/8 or
//! ::1); anything else is refused before a single packet is sent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context};

/// A resolved gateway address and the path of its WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as given, for the HTTP `Host` header and reports.
    pub authority: String,
    pub addr: SocketAddr,
    /// Path of the WebSocket endpoint, `/ws` unless the URL names one.
    pub path: String,
}

impl Target {
    /// Parses `ws://HOST:PORT[/PATH]` (also `http://` or a bare `HOST:PORT`)
    /// and resolves it to a loopback address.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .unwrap_or(url);
        if rest.contains("://") {
            bail!("only ws:// targets are supported, got {url}");
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = match path {
            "" | "/" => "/ws".to_owned(),
            p => p.to_owned(),
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .collect();
        let Some(addr) = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
        else {
            bail!("{authority} resolves to no address");
        };
        if !addr.ip().is_loopback() {
            bail!(
                "{authority} resolves to {}, which is not a loopback address: \
                 chat-load only sends traffic to this machine (127.0.0.0/8, ::1)",
                addr.ip()
            );
        }
        Ok(Target {
            authority: authority.to_owned(),
            addr,
            path,
        })
    }

    /// The URL of connection `user`'s WebSocket.
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}{}?user={user}", self.authority, self.path)
    }

    /// The source address connection `index` binds before connecting, when
    /// connections are spread over `sources` loopback addresses
    /// (127.0.0.1, 127.0.0.2, ...). None for an IPv6 target.
    pub fn source_for(&self, index: usize, sources: usize) -> Option<SocketAddr> {
        match self.addr.ip() {
            IpAddr::V4(_) => {
                let host = 1 + (index % sources.clamp(1, 254)) as u8;
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                    0,
                ))
            }
            IpAddr::V6(_) => None,
        }
    }
}

/// Source addresses to spread `connections` over when none are asked for:
/// one per 10,000 connections, well inside one address's ephemeral ports.
pub fn auto_sources(connections: usize) -> usize {
    connections.div_ceil(10_000).clamp(1, 254)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_targets_resolve_and_others_are_refused() {
        let t = Target::resolve("ws://127.0.0.1:8080").await.unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/ws");
        assert_eq!(t.ws_url("u1"), "ws://127.0.0.1:8080/ws?user=u1");
        let t = Target::resolve("localhost:9000/gw").await.unwrap();
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.path, "/gw");
        assert!(Target::resolve("ws://127.9.9.9:1/ws").await.is_ok());
        let err = Target::resolve("ws://10.0.0.1:8080").await.unwrap_err();
        assert!(err.to_string().contains("not a loopback"), "{err}");
        assert!(Target::resolve("wss://127.0.0.1:1").await.is_err());
    }

    #[tokio::test]
    async fn connections_spread_over_source_addresses() {
        let t = Target::resolve("ws://127.0.0.1:8080").await.unwrap();
        assert_eq!(t.source_for(0, 3), Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(t.source_for(5, 3), Some("127.0.0.3:0".parse().unwrap()));
        assert_eq!(auto_sources(1), 1);
        assert_eq!(auto_sources(20_000), 2);
        assert_eq!(auto_sources(20_001), 3);
    }
}
