//! How a replay shows its progress: one bar per partition (and one for the
//! whole) with events/s and ETA when stderr is a terminal; otherwise a plain
//! line every few seconds, and a line when a partition has caught up.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use projector::replay::Progress;
use tokio::sync::watch;

/// How to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Progress bars on stderr (a terminal).
    Bars,
    /// A line on stderr every `every`.
    Lines { every: Duration },
    /// Nothing.
    Quiet,
}

impl Style {
    /// Bars on a terminal, lines every `every` otherwise.
    pub fn detect(every: Duration) -> Self {
        if std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Lines { every }
        }
    }
}

/// Draws the progress of the replay into `version` until `progress`'s
/// sender is dropped.
pub async fn render(version: &str, progress: watch::Receiver<Progress>, style: Style) {
    match style {
        Style::Bars => bars(version, progress).await,
        Style::Lines { every } => lines(version, progress, every).await,
        Style::Quiet => {
            let mut progress = progress;
            while progress.changed().await.is_ok() {}
        }
    }
}

fn rate(done: u64, elapsed_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        0.0
    } else {
        done as f64 * 1000.0 / elapsed_ms as f64
    }
}

/// One line about the whole replay.
pub fn line(version: &str, p: &Progress) -> String {
    let (done, all) = p.totals();
    let per_sec = rate(done, p.elapsed_ms);
    let left = all.saturating_sub(done);
    let eta = if left == 0 {
        "0s".to_owned()
    } else if per_sec > 0.0 {
        format!("{:.0}s", left as f64 / per_sec)
    } else {
        "?".to_owned()
    };
    let percent = if all == 0 {
        100.0
    } else {
        done as f64 * 100.0 / all as f64
    };
    let caught_up = p.partitions.iter().filter(|p| p.done).count();
    format!(
        "replay {version}: {done}/{all} events ({percent:.1}%), {per_sec:.0} events/s, eta {eta}, {caught_up}/{} partitions caught up, {} dead-lettered",
        p.partitions.len(),
        p.dead_lettered
    )
}

async fn lines(version: &str, mut progress: watch::Receiver<Progress>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut reported = Vec::new();
    let mut open = true;
    while open {
        tokio::select! {
            changed = progress.changed() => {
                open = changed.is_ok();
                let p = progress.borrow_and_update().clone();
                reported.resize(p.partitions.len(), false);
                for part in p.partitions.iter().filter(|part| part.done) {
                    if !std::mem::replace(&mut reported[part.partition as usize], true) {
                        eprintln!(
                            "replay {version}: partition {} caught up at offset {}",
                            part.partition, part.position
                        );
                    }
                }
            }
            _ = tick.tick() => eprintln!("{}", line(version, &progress.borrow())),
        }
    }
    eprintln!("{}", line(version, &progress.borrow()));
}

async fn bars(version: &str, mut progress: watch::Receiver<Progress>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
    let style = ProgressStyle::with_template(
        "{prefix:>8} [{bar:32.cyan/blue}] {human_pos:>9}/{human_len:9} {per_sec:>14} eta {eta:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let total = multi.add(ProgressBar::new(0).with_style(style.clone()));
    total.set_prefix(version.to_owned());
    let mut parts: Vec<ProgressBar> = Vec::new();
    let mut open = true;
    while open {
        open = progress.changed().await.is_ok();
        let p = progress.borrow_and_update().clone();
        while parts.len() < p.partitions.len() {
            let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
            bar.set_prefix(format!("p{}", parts.len()));
            parts.push(bar);
        }
        for (bar, part) in parts.iter().zip(&p.partitions) {
            bar.set_length(part.head - part.start);
            bar.set_position(part.position - part.start);
            if part.done && !bar.is_finished() {
                bar.finish_with_message("caught up");
            }
        }
        let (done, all) = p.totals();
        total.set_length(all);
        total.set_position(done);
        total.set_message(format!("{} dead-lettered", p.dead_lettered));
    }
    total.finish();
    for bar in &parts {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
}
