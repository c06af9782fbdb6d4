//! The warm environments `kiln fn serve` keeps for a `runtime-api`
//! function, as Lambda keeps execution environments: an event takes a
//! warm one (its runtime waiting in `invocation/next`, no restore), or
//! restores a new clone while fewer than `max_concurrency` exist, or waits
//! for one to come free. After its event an environment waits warm; one
//! idle for `keep_warm` is killed ([`Pool::expire`]), as is one whose
//! runtime timed out or exited (it serves no more events), and every one
//! at [`Pool::shutdown`]. Each environment is a lean clone
//! ([`super::clone_vm`]): a VM process of this serve's own.
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_init::function::{EventResult, EventStatus};
use kiln_vmm::devices::lock;

use super::clone_vm::{CloneVm, Template};
use super::invoke_api::{Backend, Input, PoolStatus};
use super::runtime::Session;
use super::{FunctionConfig, FunctionError, restore_clone};

/// One clone and its session; dropping it kills the clone.
pub struct Warm {
    clone: CloneVm,
    session: Session,
    idle_since: Instant,
}

#[derive(Default)]
struct State {
    /// Waiting for an event, the most recently used last.
    idle: Vec<Warm>,
    /// Running an event, or being restored for one.
    busy: usize,
}

/// A function's environments.
pub struct Pool {
    template: Template,
    config: FunctionConfig,
    max_concurrency: usize,
    keep_warm: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

impl Pool {
    /// An empty pool for `config`'s function (a `runtime-api` one), whose
    /// clones are restored from `template`.
    pub fn new(
        template: Template,
        config: FunctionConfig,
        max_concurrency: usize,
        keep_warm: Duration,
    ) -> Self {
        Pool {
            template,
            config,
            max_concurrency: max_concurrency.max(1),
            keep_warm,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        }
    }

    /// A warm environment, else a new clone if there is room, else the
    /// first one to come free.
    fn acquire(&self) -> Result<Warm, FunctionError> {
        let mut state = lock(&self.state);
        loop {
            if let Some(warm) = state.idle.pop() {
                state.busy += 1;
                return Ok(warm);
            }
            if state.busy < self.max_concurrency {
                state.busy += 1;
                drop(state);
                return self.restore().inspect_err(|_| self.release(None));
            }
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn restore(&self) -> Result<Warm, FunctionError> {
        let (clone, session) = restore_clone(&self.template)?;
        Ok(Warm {
            clone,
            session,
            idle_since: Instant::now(),
        })
    }

    /// Gives a busy slot back, with its environment if it can serve more.
    fn release(&self, warm: Option<Warm>) {
        let mut state = lock(&self.state);
        state.busy -= 1;
        if let Some(mut warm) = warm {
            warm.idle_since = Instant::now();
            state.idle.push(warm);
        }
        self.freed.notify_one();
    }

    /// Kills the environments idle for longer than `keep_warm`.
    pub fn expire(&self) {
        let expired: Vec<Warm> = {
            let mut state = lock(&self.state);
            let now = Instant::now();
            let (old, kept) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|w| now.duration_since(w.idle_since) >= self.keep_warm);
            state.idle = kept;
            old
        };
        drop(expired);
    }

    /// Kills every idle environment (call once no event runs).
    pub fn shutdown(&self) {
        drop(std::mem::take(&mut lock(&self.state).idle));
    }
}

impl Backend for Pool {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn invoke(&self, input: &Input) -> Result<EventResult, FunctionError> {
        let mut warm = self.acquire()?;
        let result = warm.session.invoke(&self.config, input);
        if result.is_ok() {
            self.template.learn_working_set(&warm.clone);
        }
        let reusable = result
            .as_ref()
            .is_ok_and(|r| !matches!(r.status, EventStatus::Timeout | EventStatus::Exited));
        if reusable {
            self.release(Some(warm));
        } else {
            // Its runtime is gone (or its session broke): a fresh clone
            // takes the next event, once this one is killed.
            drop(warm);
            self.release(None);
        }
        result
    }

    fn status(&self) -> PoolStatus {
        let state = lock(&self.state);
        PoolStatus {
            warm: state.idle.len(),
            busy: state.busy,
        }
    }
}
