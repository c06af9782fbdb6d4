//! The warm environments `kiln fn serve` keeps for a `runtime-api`
//! function, as Lambda keeps execution environments: an event takes a
//! warm one (its runtime waiting in `invocation/next`, no restore), or
//! restores a new clone while fewer than `max_concurrency` exist, or waits
//! for one to come free. After its event an environment waits warm; one
//! idle for `keep_warm` is terminated ([`Pool::expire`]), as is one whose
//! runtime timed out or exited (it serves no more events), and every one
//! at [`Pool::shutdown`].
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_init::function::{EventResult, EventStatus};
use kiln_vmm::devices::lock;
use kiln_vmm::report::one_line;

use super::invoke_api::{Backend, Input, PoolStatus};
use super::runtime::Session;
use super::{FunctionConfig, FunctionError, Functions, INSTANCE_TIMEOUT};
use crate::instance::Instance;
use crate::instance::lifecycle;

/// One clone and its session.
pub struct Warm {
    instance: Instance,
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
pub struct Pool<'a> {
    functions: &'a Functions,
    config: FunctionConfig,
    max_concurrency: usize,
    keep_warm: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

impl<'a> Pool<'a> {
    /// An empty pool for `config`'s function (a `runtime-api` one).
    pub fn new(
        functions: &'a Functions,
        config: FunctionConfig,
        max_concurrency: usize,
        keep_warm: Duration,
    ) -> Self {
        Pool {
            functions,
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
        let (instance, session) = self.functions.restore_clone(&self.config.name)?;
        Ok(Warm {
            instance,
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

    /// Terminates the environments idle for longer than `keep_warm`.
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
        for warm in expired {
            terminate(warm);
        }
    }

    /// Terminates every idle environment (call once no event runs).
    pub fn shutdown(&self) {
        let idle = std::mem::take(&mut lock(&self.state).idle);
        for warm in idle {
            terminate(warm);
        }
    }
}

fn terminate(warm: Warm) {
    let id = warm.instance.record.id.clone();
    let ended = lifecycle::terminate(warm.instance, INSTANCE_TIMEOUT)
        .map_err(FunctionError::from)
        .and_then(|instance| Ok(instance.forget()?));
    if let Err(err) = ended {
        log::warn!("fn serve: cannot terminate {id}: {}", one_line(&err));
    }
}

impl Backend for Pool<'_> {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn invoke(&self, input: &Input) -> Result<EventResult, FunctionError> {
        let mut warm = self.acquire()?;
        let result = warm.session.invoke(&self.config, input);
        let reusable = result
            .as_ref()
            .is_ok_and(|r| !matches!(r.status, EventStatus::Timeout | EventStatus::Exited));
        if reusable {
            self.release(Some(warm));
        } else {
            // Its runtime is gone (or its session broke): a fresh clone
            // takes the next event, once this one is gone.
            terminate(warm);
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
