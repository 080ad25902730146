//! Progress bars on stderr, only when stderr is a terminal (scripts and logs get none).
//!
//! Rate and ETA are the average since the first byte moved, not since the bar was made: a seal first
//! opens the file, allocates device memory and parses the header, and indicatif's own estimate,
//! started with the bar, would show a crawl ("1.46 MiB/s eta 22m") for the first seconds of a 5 s
//! seal. Until half a second of transfer has been seen, they show `-`.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::style::ProgressTracker;
use indicatif::{
    HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle,
};

/// How long the transfer must have run before a rate and an ETA are shown.
const SETTLE: Duration = Duration::from_millis(500);

/// A byte-count progress bar for `total` bytes, hidden unless stderr is a terminal.
pub fn bytes_bar(total: u64, label: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {pace}")
        .map(|s| s.progress_chars("=> ").with_key("pace", Pace::default()))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(label.to_owned());
    bar
}

/// The bar as a seal-progress callback.
pub fn callback(bar: &ProgressBar) -> vram_residency::manager::Progress {
    let bar = bar.clone();
    Arc::new(move |done| bar.set_position(done))
}

/// The `{pace}` key: `RATE/s eta DURATION`, averaged from the first position above zero.
#[derive(Clone, Default)]
struct Pace {
    /// When the position first left zero, and that position.
    first: Option<(Instant, u64)>,
    /// What `write` prints, computed at the last tick.
    shown: String,
}

impl ProgressTracker for Pace {
    fn clone_box(&self) -> Box<dyn ProgressTracker> {
        Box::new(self.clone())
    }

    fn tick(&mut self, state: &ProgressState, now: Instant) {
        let pos = state.pos();
        if self.first.is_none() && pos > 0 {
            self.first = Some((now, pos));
        }
        let (rate, eta) = match self.first {
            Some((start, base)) => pace(
                pos.saturating_sub(base),
                now.saturating_duration_since(start),
                state.len().unwrap_or(pos).saturating_sub(pos),
            ),
            None => (None, None),
        };
        self.shown.clear();
        let _ = match (rate, eta) {
            (Some(rate), Some(eta)) => write!(
                self.shown,
                "{}/s eta {}",
                HumanBytes(rate),
                HumanDuration(eta)
            ),
            (Some(rate), None) => write!(self.shown, "{}/s", HumanBytes(rate)),
            _ => write!(self.shown, "-/s eta -"),
        };
    }

    fn reset(&mut self, _: &ProgressState, _: Instant) {
        self.first = None;
        self.shown.clear();
    }

    fn write(&self, _: &ProgressState, w: &mut dyn std::fmt::Write) {
        let _ = w.write_str(&self.shown);
    }
}

/// Average rate (bytes/s) of `moved` bytes in `elapsed`, and the time `remaining` bytes take at that
/// rate; `None` until [`SETTLE`] has passed or while nothing has moved.
fn pace(moved: u64, elapsed: Duration, remaining: u64) -> (Option<u64>, Option<Duration>) {
    if elapsed < SETTLE || moved == 0 {
        return (None, None);
    }
    #[allow(clippy::cast_precision_loss)] // a display estimate
    let rate = moved as f64 / elapsed.as_secs_f64();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // finite and positive
    let shown_rate = rate.round() as u64;
    #[allow(clippy::cast_precision_loss)] // a display estimate
    let eta = Duration::try_from_secs_f64(remaining as f64 / rate).ok();
    (Some(shown_rate), eta)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::pace;

    #[test]
    fn no_rate_or_eta_before_the_transfer_has_settled() {
        assert_eq!(
            pace(1 << 20, Duration::from_millis(100), 1 << 30),
            (None, None)
        );
        assert_eq!(pace(0, Duration::from_secs(3), 1 << 30), (None, None));
    }

    #[test]
    fn rate_and_eta_are_the_average_since_the_first_byte() {
        // 2 GiB in 1 s with 8 GiB left: 2 GiB/s and 4 s, whatever happened before the first byte.
        let (rate, eta) = pace(2 << 30, Duration::from_secs(1), 8 << 30);
        assert_eq!(rate, Some(2 << 30));
        assert_eq!(eta, Some(Duration::from_secs(4)));
        assert_eq!(
            pace(1 << 30, Duration::from_secs(2), 0).1,
            Some(Duration::ZERO)
        );
    }
}
