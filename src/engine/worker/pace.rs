//! How many leased steps a worker holds, from how long its recent steps took.

use std::time::Duration;

/// Short steps are prefetched: a worker holds more leased steps than it has slots, so
/// claims and completions batch and a freed slot starts the next step without a round
/// trip, while only `concurrency` execute at once. It holds as many as keep a held step
/// waiting about `HELD_WAIT` (from the recent average), at most `PREFETCH` × concurrency;
/// steps that take `HELD_WAIT` or longer are never held waiting in one worker.
const HELD_WAIT: Duration = Duration::from_millis(100);
const PREFETCH: usize = 64;
/// The pace looks back, so a worker whose steps were tiny may hold long ones it cannot
/// start soon: a held step that has waited this long for a slot goes back to the queue
/// for any worker, and counts in the pace as a step that long (one is enough to stop
/// the holding).
pub(super) const HELD_LIMIT: Duration = Duration::from_secs(1);

/// How long recent steps took (an exponential moving average).
#[derive(Default)]
pub(super) struct Pace {
    average: Duration,
    samples: u32,
}

impl Pace {
    pub(super) fn record(&mut self, took: Duration) {
        self.samples = self.samples.saturating_add(1);
        self.average = if self.samples == 1 {
            took
        } else {
            (self.average * 7 + took) / 8
        };
    }

    /// How many steps a worker with `concurrency` slots may hold, running or waiting.
    pub(super) fn capacity(&self, concurrency: usize) -> usize {
        if self.samples < 8 {
            return concurrency;
        }
        let rounds = HELD_WAIT.as_secs_f64() / self.average.as_secs_f64().max(1e-6);
        // Each slot runs `rounds` steps in HELD_WAIT; it holds that many, itself included.
        concurrency * (rounds.floor() as usize).clamp(1, PREFETCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(average_ms: f64, samples: u32) -> Pace {
        Pace {
            average: Duration::from_secs_f64(average_ms / 1000.0),
            samples,
        }
    }

    #[test]
    fn held_steps_follow_the_pace() {
        // Too few samples to know: no prefetch.
        assert_eq!(pace(0.1, 7).capacity(16), 16);
        // Tiny steps: the most.
        assert_eq!(pace(0.1, 8).capacity(16), 16 * PREFETCH);
        // 20 ms steps: five rounds in 100 ms.
        assert_eq!(pace(20.0, 100).capacity(16), 80);
        assert_eq!(pace(60.0, 100).capacity(4), 4);
        // Long steps are never held waiting.
        assert_eq!(pace(5_000.0, 100).capacity(4), 4);
        assert_eq!(pace(0.0, 100).capacity(1), PREFETCH);
    }
}
