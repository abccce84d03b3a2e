//! What a run does: one of the presets, with its numbers. Every number has
//! a preset default (full size for measurements, `tiny` for the CI smoke
//! run) and can be overridden from the command line.
//!
//! Every scenario is bounded: a fixed number of connections, phases of fixed
//! length, a drain with a timeout, at most `max_steps` steps, and an overall
//! deadline after which the run stops whatever it is doing.

use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// The presets of `chat-load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Steps the offered rate up; reports the highest rate sustained with
    /// p99 ack latency under the bound. Every connection sends, alone in its
    /// room (one ack and one delivery per message, as the bare baseline).
    IngestMax,
    /// One sender and 100 receivers per room: deliveries/s and end-to-end
    /// latency.
    Fanout,
    /// Holds N idle connections (each joined to a room): server RSS per
    /// connection. Ends with one message per room to check they are alive.
    Connections,
    /// Many connections, one sender per room of ten, moderate fan-out.
    Mixed,
    /// Light chat: 500 connections in 50 rooms of 10, one sender per room
    /// at 5 msgs/s, 128-byte bodies (250 msgs/s, 2,500 deliveries/s): what
    /// a message costs when traffic is too thin to batch.
    RoomsLight,
    /// Busy chat: 2,000 connections in 200 rooms of 10, one sender per room
    /// at 10 msgs/s, 128-byte bodies (2,000 msgs/s, 20,000 deliveries/s).
    RoomsBusy,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::IngestMax => "ingest-max",
            Preset::Fanout => "fanout",
            Preset::Connections => "connections",
            Preset::Mixed => "mixed",
            Preset::RoomsLight => "rooms-light",
            Preset::RoomsBusy => "rooms-busy",
        }
    }
}

/// Every number of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub preset: Preset,
    pub connections: usize,
    pub rooms: usize,
    /// Connections that send (the first ones, one room each in turn).
    pub senders: usize,
    /// Offered messages per second, all senders together (the first step
    /// of `ingest-max`).
    pub rate: f64,
    /// Body bytes per message.
    pub body: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    /// Idle time with every connection open before traffic (`connections`).
    pub hold_s: f64,
    /// `ingest-max`: each step's rate is the last passing one times this.
    pub step_factor: f64,
    /// `ingest-max`: highest rate tried.
    pub max_rate: f64,
    /// `ingest-max`: most steps, refinements included.
    pub max_steps: usize,
    /// `ingest-max`: steps spent bisecting between the last passing and the
    /// first failing rate.
    pub refine: usize,
    /// `ingest-max`: a step passes when its p99 ack latency is at most this.
    pub p99_bound_ms: f64,
    /// `ingest-max`: run a failed step once more before it counts.
    #[serde(default)]
    pub confirm_failures: bool,
    /// `ingest-max`: ... and at least this share of the offered rate is acked.
    pub sustain_ratio: f64,
    /// Loopback source addresses to connect from; 0 = one per 10,000.
    pub sources: usize,
    pub connect_concurrency: usize,
    pub connect_timeout_s: f64,
    /// Interval of the time series and chart.
    pub interval_s: f64,
    /// The whole run stops after this, wherever it is.
    pub deadline_s: f64,
    /// Read buffer of each client socket.
    pub read_buffer: usize,
}

impl Scenario {
    /// The preset's numbers for a measurement on the 2-core machine.
    pub fn full(preset: Preset) -> Scenario {
        let base = Scenario {
            preset,
            connections: 64,
            rooms: 64,
            senders: 64,
            rate: 2_000.0,
            body: 100,
            warmup_s: 1.0,
            duration_s: 4.0,
            drain_s: 10.0,
            hold_s: 0.0,
            step_factor: 1.5,
            max_rate: 1_000_000.0,
            max_steps: 20,
            refine: 2,
            confirm_failures: true,
            p99_bound_ms: 25.0,
            sustain_ratio: 0.95,
            sources: 0,
            connect_concurrency: 128,
            connect_timeout_s: 30.0,
            interval_s: 0.5,
            deadline_s: 900.0,
            read_buffer: 8 * 1024,
        };
        match preset {
            Preset::IngestMax => base,
            Preset::Fanout => Scenario {
                connections: 10 * 101,
                rooms: 10,
                senders: 10,
                rate: 200.0,
                warmup_s: 2.0,
                duration_s: 10.0,
                ..base
            },
            Preset::Connections => Scenario {
                // The open-files hard limit here is 20,000 per process, for
                // the server as for this tool: see benches/RESULTS.md.
                connections: 19_500,
                rooms: 195,
                senders: 195,
                rate: 195.0,
                body: 16,
                warmup_s: 0.0,
                duration_s: 1.0,
                hold_s: 10.0,
                interval_s: 1.0,
                ..base
            },
            Preset::Mixed => Scenario {
                connections: 2_000,
                rooms: 200,
                senders: 200,
                rate: 2_000.0,
                body: 200,
                warmup_s: 2.0,
                duration_s: 10.0,
                ..base
            },
            // Long windows: the server's CPU time is read in clock ticks
            // (10 ms), and the light preset uses little of it.
            Preset::RoomsLight => Scenario {
                connections: 500,
                rooms: 50,
                senders: 50,
                rate: 50.0 * 5.0,
                body: 128,
                warmup_s: 3.0,
                duration_s: 30.0,
                interval_s: 1.0,
                ..base
            },
            Preset::RoomsBusy => Scenario {
                connections: 2_000,
                rooms: 200,
                senders: 200,
                rate: 200.0 * 10.0,
                body: 128,
                warmup_s: 3.0,
                duration_s: 20.0,
                interval_s: 1.0,
                ..base
            },
        }
    }

    /// Seconds-long numbers for the CI smoke run: checks the tool and the
    /// server work, measures nothing worth keeping. Timeouts are generous,
    /// since CI runs tests side by side on two cores.
    pub fn tiny(preset: Preset) -> Scenario {
        let base = Scenario {
            connections: 4,
            rooms: 4,
            senders: 4,
            rate: 40.0,
            body: 32,
            warmup_s: 0.2,
            duration_s: 0.8,
            drain_s: 30.0,
            hold_s: 0.0,
            step_factor: 2.0,
            max_steps: 2,
            refine: 0,
            confirm_failures: false,
            interval_s: 0.2,
            deadline_s: 300.0,
            // A loaded CI machine stalls for tens of milliseconds; the
            // smoke run checks the stepping, not the latency bound.
            p99_bound_ms: 10_000.0,
            sustain_ratio: 0.5,
            ..Scenario::full(preset)
        };
        match preset {
            Preset::IngestMax => base,
            Preset::Fanout => Scenario {
                connections: 2 * 11,
                rooms: 2,
                senders: 2,
                rate: 20.0,
                ..base
            },
            Preset::Connections => Scenario {
                connections: 60,
                rooms: 6,
                senders: 6,
                rate: 12.0,
                warmup_s: 0.0,
                duration_s: 0.5,
                hold_s: 0.5,
                ..base
            },
            Preset::Mixed | Preset::RoomsLight | Preset::RoomsBusy => Scenario {
                connections: 40,
                rooms: 4,
                senders: 4,
                rate: 40.0,
                ..base
            },
        }
    }

    /// Checks the numbers make a bounded, valid run.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.rooms == 0 {
            bail!("a run needs at least one connection and one room");
        }
        if self.connections > crate::ids::MsgId::MAX_CONN as usize {
            bail!("at most {} connections", crate::ids::MsgId::MAX_CONN);
        }
        if self.senders > self.connections {
            bail!(
                "senders ({}) > connections ({})",
                self.senders,
                self.connections
            );
        }
        if !(1..=schemas::protocol::MAX_BODY_BYTES).contains(&self.body) {
            bail!(
                "body must be 1 to {} bytes",
                schemas::protocol::MAX_BODY_BYTES
            );
        }
        for (name, v) in [
            ("rate", self.rate),
            ("warmup", self.warmup_s),
            ("duration", self.duration_s),
            ("drain", self.drain_s),
            ("hold", self.hold_s),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} must be a finite number >= 0");
            }
        }
        if self.duration_s <= 0.0 || self.interval_s <= 0.0 || self.deadline_s <= 0.0 {
            bail!("duration, interval and deadline must be > 0");
        }
        if self.preset == Preset::IngestMax
            && (self.step_factor <= 1.0 || self.max_steps == 0 || self.rate <= 0.0)
        {
            bail!("ingest-max needs a rate > 0, a step factor > 1 and at least one step");
        }
        // Messages a phase may send, to keep every run bounded in count.
        let per_phase = self.rate.max(
            self.max_rate
                .min(self.rate * self.step_factor.powi(self.max_steps as i32)),
        ) * (self.warmup_s + self.duration_s);
        if per_phase > 1e9 {
            bail!("a phase would send {per_phase:.0} messages; at most 1e9");
        }
        Ok(())
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.deadline_s)
    }
}

/// Parses `250ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 5s or 2m, got {s:?}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("duration must be >= 0, got {s:?}"));
    }
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_full_and_tiny() {
        for p in [
            Preset::IngestMax,
            Preset::Fanout,
            Preset::Connections,
            Preset::Mixed,
            Preset::RoomsLight,
            Preset::RoomsBusy,
        ] {
            Scenario::full(p).validate().unwrap();
            let tiny = Scenario::tiny(p);
            tiny.validate().unwrap();
            assert!(tiny.connections <= 100 && tiny.duration_s <= 1.0);
        }
        let fanout = Scenario::full(Preset::Fanout);
        assert_eq!(
            fanout.connections / fanout.rooms,
            101,
            "1 sender, 100 receivers"
        );
    }

    #[test]
    fn bad_numbers_are_refused() {
        let mut s = Scenario::tiny(Preset::Mixed);
        s.senders = s.connections + 1;
        assert!(s.validate().is_err());
        let mut s = Scenario::tiny(Preset::Mixed);
        s.body = 5000;
        assert!(s.validate().is_err());
        let mut s = Scenario::tiny(Preset::IngestMax);
        s.step_factor = 1.0;
        assert!(s.validate().is_err());
        let mut s = Scenario::tiny(Preset::Mixed);
        s.rate = 1e12;
        assert!(s.validate().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_seconds("250ms").unwrap(), 0.25);
        assert_eq!(parse_seconds("5s").unwrap(), 5.0);
        assert_eq!(parse_seconds("2m").unwrap(), 120.0);
        assert_eq!(parse_seconds("1.5").unwrap(), 1.5);
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("-1").is_err());
    }
}
