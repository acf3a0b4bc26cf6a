//! The runtime seam: the only place that reads the clock. Everything above
//! it uses `tokio` as the workspace renames it (madsim-tokio), so under
//! `--cfg madsim` time, timers, tasks and the network are the simulator's.
//! madsim also intercepts `clock_gettime`, so `SystemTime` here is simulated
//! time inside a simulation and real time outside it. Randomness that
//! shapes behaviour (jitter) comes from here too, for the same reason.

use std::time::{Duration, UNIX_EPOCH};

use crate::core::Millis;

/// Now, as the core counts time: milliseconds since the Unix epoch. In a
/// normal build it is the wall clock at start plus monotonic time since, so
/// a clock step (NTP) neither fires every timeout at once nor stalls them; in
/// a simulation it is the simulator's clock.
#[allow(clippy::disallowed_methods)] // the seam is where the clock is read
pub fn now() -> Millis {
    #[cfg(madsim)]
    {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Millis(since_epoch.as_millis() as u64)
    }
    #[cfg(not(madsim))]
    {
        static START: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
        let (epoch_ms, instant) = START.get_or_init(|| {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            (since_epoch.as_millis() as u64, std::time::Instant::now())
        });
        Millis(epoch_ms + instant.elapsed().as_millis() as u64)
    }
}

/// Sleeps until the core's clock reads `deadline` (returns at once if it has).
pub async fn sleep_until(deadline: Millis) {
    let wait_ms = deadline.0.saturating_sub(now().0);
    if wait_ms > 0 {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

/// A random number for things like backoff jitter: the simulator's seeded
/// generator in a simulation (so a seed replays exactly), the operating
/// system's otherwise. Not for secrets (tokens use the OS directly).
pub fn random_u64() -> u64 {
    #[cfg(madsim)]
    {
        madsim::rand::random::<u64>()
    }
    #[cfg(not(madsim))]
    {
        getrandom::u64().unwrap_or(0)
    }
}

/// `tokio::select!`, with its branches tried in the written order in a
/// simulation. tokio picks a random start branch from a per-thread generator
/// seeded with a process-wide counter, which the simulator does not control:
/// two runs of one seed in one process would differ. Outside a simulation
/// it is `tokio::select!` as is (random start, so no branch starves).
#[cfg(madsim)]
#[macro_export]
macro_rules! select {
    ($($branches:tt)*) => { ::tokio::select! { biased; $($branches)* } };
}

/// `tokio::select!` (see the simulation build's version of this macro).
#[cfg(not(madsim))]
#[macro_export]
macro_rules! select {
    ($($branches:tt)*) => { ::tokio::select! { $($branches)* } };
}

/// hyper's timer (for its header read timeout) on the seam's clock: the
/// simulator's in a simulation, tokio's otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct HyperTimer;

struct HyperSleep(std::pin::Pin<Box<tokio::time::Sleep>>);

impl std::future::Future for HyperSleep {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HyperSleep {}

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep(Box::pin(tokio::time::sleep(duration))))
    }

    #[allow(clippy::disallowed_methods)] // hyper counts in std's Instant
    fn sleep_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(std::time::Instant::now()))
    }
}

/// Waits for the signal to stop (SIGTERM or SIGINT) and names it. In a
/// simulation nothing sends one: it never comes.
pub async fn stop_signal() -> &'static str {
    #[cfg(madsim)]
    {
        std::future::pending().await
    }
    #[cfg(not(madsim))]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => crate::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
}

/// Runs `work` (file system work that may take a while) off the async
/// threads; in a simulation, where nothing may block outside the
/// simulator's sight, in place.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    #[cfg(madsim)]
    {
        work()
    }
    #[cfg(not(madsim))]
    {
        match tokio::task::spawn_blocking(work).await {
            Ok(value) => value,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
