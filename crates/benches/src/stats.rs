//! What a run measures, as it happens: HDR histograms of ack and end-to-end
//! latency, counts of acks, deliveries and errors, and a time series of
//! one point per interval for the chart.
//!
//! Every connection's reader records into one [`Recorder`]; its lock is held
//! for a few counter updates and never across an `.await`. Latency is
//! measured from a message's intended send time (carried in its id), so a
//! stalled server shows up as latency instead of as a slower sender.
//!
//! A traffic phase has a measurement window `[start, end)`: latencies count
//! when the message was *meant* to be sent inside it, throughput counts acks
//! and deliveries *received* inside it. Frames of another run or of an
//! earlier phase are counted as stale and otherwise ignored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::ids::MsgId;

/// Highest latency the histograms hold; larger values are clamped to it.
const MAX_LATENCY_US: u64 = 600_000_000;

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig).expect("valid histogram bounds")
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One interval of the time series.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// End of the interval, seconds since the run started.
    pub t_s: f64,
    /// Rate the schedule asked for during the interval (0 when idle).
    pub offered_per_s: f64,
    pub sent_per_s: f64,
    pub acks_per_s: f64,
    pub deliveries_per_s: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_bytes: Option<u64>,
    /// Cores the server used on average over the interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu: Option<f64>,
    /// Cores the load generator used on average over the interval.
    pub client_cpu: f64,
}

/// What one traffic phase measured.
#[derive(Debug, Clone)]
pub struct PhaseTotals {
    pub acks: u64,
    pub deliveries: u64,
    pub acks_in_window: u64,
    pub deliveries_in_window: u64,
    pub ack: Histogram<u64>,
    pub e2e: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub stale: u64,
}

impl PhaseTotals {
    fn new() -> Self {
        PhaseTotals {
            acks: 0,
            deliveries: 0,
            acks_in_window: 0,
            deliveries_in_window: 0,
            ack: histogram(3),
            e2e: histogram(3),
            errors: BTreeMap::new(),
            stale: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    phase: u8,
    start_us: u64,
    end_us: u64,
}

struct Bucket {
    acks: u64,
    deliveries: u64,
    ack: Histogram<u64>,
    e2e: Histogram<u64>,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            acks: 0,
            deliveries: 0,
            ack: histogram(2),
            e2e: histogram(2),
        }
    }
}

struct Inner {
    window: Option<Window>,
    totals: PhaseTotals,
    bucket: Bucket,
    offered_per_s: f64,
    series: Vec<Point>,
    last_tick_us: u64,
    last_sent: u64,
    last_server_cpu: Option<f64>,
    last_client_cpu: f64,
}

/// The measurements of one run.
pub struct Recorder {
    base: Instant,
    run: u16,
    inner: Mutex<Inner>,
    sent: AtomicU64,
    max_points: usize,
}

/// How a received frame was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Of the current phase.
    Yes,
    /// Of another run or an earlier phase.
    Stale,
}

impl Recorder {
    pub fn new(run: u16, max_points: usize) -> Self {
        Recorder {
            base: Instant::now(),
            run,
            inner: Mutex::new(Inner {
                window: None,
                totals: PhaseTotals::new(),
                bucket: Bucket::new(),
                offered_per_s: 0.0,
                series: Vec::new(),
                last_tick_us: 0,
                last_sent: 0,
                last_server_cpu: None,
                last_client_cpu: crate::sys::cpu_seconds(None).unwrap_or(0.0),
            }),
            sent: AtomicU64::new(0),
            max_points,
        }
    }

    pub fn run(&self) -> u16 {
        self.run
    }

    /// The instant all `*_us` times count from.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Microseconds since [`Recorder::base`].
    pub fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    pub fn at_us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }

    /// Starts phase `phase`: totals restart, latencies count for messages
    /// meant to be sent in `[start, end)`.
    pub fn begin_phase(&self, phase: u8, start: Instant, end: Instant, offered_per_s: f64) {
        let mut inner = self.inner.lock().unwrap();
        inner.window = Some(Window {
            phase,
            start_us: self.at_us(start),
            end_us: self.at_us(end),
        });
        inner.totals = PhaseTotals::new();
        inner.offered_per_s = offered_per_s;
    }

    /// Stops the schedule's offered rate for the chart (the phase keeps
    /// counting late acks until [`Recorder::end_phase`]).
    pub fn schedule_done(&self) {
        self.inner.lock().unwrap().offered_per_s = 0.0;
    }

    /// Ends the current phase and returns what it measured.
    pub fn end_phase(&self) -> PhaseTotals {
        let mut inner = self.inner.lock().unwrap();
        inner.window = None;
        inner.offered_per_s = 0.0;
        std::mem::replace(&mut inner.totals, PhaseTotals::new())
    }

    fn ours(&self, window: Option<Window>, id: &MsgId) -> Option<Window> {
        window.filter(|w| id.run == self.run && id.phase == w.phase)
    }

    /// Counts one message sent.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an `ack` received at `now_us`.
    pub fn ack(&self, id: &MsgId, now_us: u64) -> Counted {
        let latency = now_us.saturating_sub(id.intended_us).max(1);
        let mut inner = self.inner.lock().unwrap();
        let Some(w) = self.ours(inner.window, id) else {
            inner.totals.stale += 1;
            return Counted::Stale;
        };
        let t = &mut inner.totals;
        t.acks += 1;
        if (w.start_us..w.end_us).contains(&id.intended_us) {
            t.ack.saturating_record(latency);
        }
        if (w.start_us..w.end_us).contains(&now_us) {
            t.acks_in_window += 1;
        }
        inner.bucket.acks += 1;
        inner.bucket.ack.saturating_record(latency);
        Counted::Yes
    }

    /// Records a `message` delivered at `now_us`.
    pub fn delivery(&self, id: &MsgId, now_us: u64) -> Counted {
        let latency = now_us.saturating_sub(id.intended_us).max(1);
        let mut inner = self.inner.lock().unwrap();
        let Some(w) = self.ours(inner.window, id) else {
            inner.totals.stale += 1;
            return Counted::Stale;
        };
        let t = &mut inner.totals;
        t.deliveries += 1;
        if (w.start_us..w.end_us).contains(&id.intended_us) {
            t.e2e.saturating_record(latency);
        }
        if (w.start_us..w.end_us).contains(&now_us) {
            t.deliveries_in_window += 1;
        }
        inner.bucket.deliveries += 1;
        inner.bucket.e2e.saturating_record(latency);
        Counted::Yes
    }

    /// Records an `error` frame; `id` is the request it refused, if ours.
    pub fn error(&self, code: &str, id: Option<&MsgId>) -> Counted {
        let mut inner = self.inner.lock().unwrap();
        let counted = match id {
            Some(id) if self.ours(inner.window, id).is_none() => Counted::Stale,
            _ => Counted::Yes,
        };
        *inner.totals.errors.entry(code.to_owned()).or_default() += 1;
        counted
    }

    /// Closes the current interval of the time series.
    pub fn tick(&self, server_pid: Option<u32>) -> Point {
        // Read /proc outside the lock.
        let server_rss_bytes = server_pid.and_then(|p| crate::sys::rss_bytes(Some(p)));
        let server_cpu_now = server_pid.and_then(|p| crate::sys::cpu_seconds(Some(p)));
        let client_cpu_now = crate::sys::cpu_seconds(None).unwrap_or(0.0);
        let now_us = self.now_us();
        let sent = self.sent.load(Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap();
        let secs = (now_us.saturating_sub(inner.last_tick_us) as f64 / 1e6).max(1e-6);
        let bucket = std::mem::replace(&mut inner.bucket, Bucket::new());
        let server_cpu = match (server_cpu_now, inner.last_server_cpu) {
            (Some(now), Some(before)) => Some((now - before) / secs),
            _ => None,
        };
        let point = Point {
            t_s: now_us as f64 / 1e6,
            offered_per_s: inner.offered_per_s,
            sent_per_s: (sent - inner.last_sent) as f64 / secs,
            acks_per_s: bucket.acks as f64 / secs,
            deliveries_per_s: bucket.deliveries as f64 / secs,
            ack_p50_ms: quantile_ms(&bucket.ack, 0.5),
            ack_p99_ms: quantile_ms(&bucket.ack, 0.99),
            e2e_p50_ms: quantile_ms(&bucket.e2e, 0.5),
            e2e_p99_ms: quantile_ms(&bucket.e2e, 0.99),
            server_rss_bytes,
            server_cpu,
            client_cpu: (client_cpu_now - inner.last_client_cpu) / secs,
        };
        inner.last_tick_us = now_us;
        inner.last_sent = sent;
        inner.last_server_cpu = server_cpu_now;
        inner.last_client_cpu = client_cpu_now;
        if inner.series.len() < self.max_points {
            inner.series.push(point.clone());
        }
        point
    }

    /// The time series so far.
    pub fn series(&self) -> Vec<Point> {
        self.inner.lock().unwrap().series.clone()
    }
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(phase: u8, intended_us: u64) -> MsgId {
        MsgId {
            run: 9,
            phase,
            conn: 0,
            seq: 0,
            intended_us,
        }
    }

    #[test]
    fn latency_counts_from_the_intended_time_inside_the_window() {
        let r = Recorder::new(9, 10);
        let start = r.base() + Duration::from_secs(1);
        let end = r.base() + Duration::from_secs(2);
        r.begin_phase(1, start, end, 100.0);
        // Meant before the window (warm-up): counted, not in the histogram.
        assert_eq!(r.ack(&id(1, 500_000), 1_100_000), Counted::Yes);
        // Meant in the window, acked 40 ms after its intended time.
        assert_eq!(r.ack(&id(1, 1_200_000), 1_240_000), Counted::Yes);
        assert_eq!(r.delivery(&id(1, 1_200_000), 1_250_000), Counted::Yes);
        // Another phase, another run.
        assert_eq!(r.ack(&id(0, 1_200_000), 1_240_000), Counted::Stale);
        let mut other = id(1, 1_200_000);
        other.run = 10;
        assert_eq!(r.delivery(&other, 1_240_000), Counted::Stale);
        assert_eq!(r.error("rate_limited", Some(&id(1, 1))), Counted::Yes);
        let t = r.end_phase();
        assert_eq!((t.acks, t.acks_in_window, t.deliveries), (2, 2, 1));
        assert_eq!(t.stale, 2);
        assert_eq!(t.ack.len(), 1);
        let p = Percentiles::of(&t.ack);
        assert!((p.p99_ms - 40.0).abs() < 0.1, "{p:?}");
        assert!((Percentiles::of(&t.e2e).max_ms - 50.0).abs() < 0.1);
        assert_eq!(t.errors["rate_limited"], 1);
    }

    #[test]
    fn ticks_make_points_and_the_series_is_bounded() {
        let r = Recorder::new(1, 2);
        let now = Instant::now();
        r.begin_phase(0, now, now + Duration::from_secs(60), 10.0);
        r.sent();
        r.ack(&id(0, 0), 5_000);
        let mut ours = id(0, 0);
        ours.run = 1;
        r.ack(&ours, 5_000);
        let p = r.tick(None);
        assert!(p.acks_per_s > 0.0 && p.sent_per_s > 0.0);
        assert_eq!(p.offered_per_s, 10.0);
        r.tick(None);
        r.tick(None);
        assert_eq!(r.series().len(), 2);
    }
}
