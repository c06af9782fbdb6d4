//! The instance lifecycle, as EC2 has it: pending → running → stopping →
//! stopped → (start) pending …, and terminated at the end of any of them.
//! Every verb a user can say is checked against the state here, in one
//! table, before anything happens.
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its VMM is starting the VM.
    Pending,
    /// The VM runs (possibly paused).
    Running,
    /// Its VMM is ending the VM.
    Stopping,
    /// No VM runs; the root volume is kept.
    Stopped,
    /// Gone: its volumes are deleted; only the record remains.
    Terminated,
}

/// What a user asks of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// Boot a stopped instance again (`kiln start`).
    Start,
    /// End the VM, keeping the root volume (`kiln stop`).
    Stop,
    /// A fresh VM on the same root volume (`kiln reboot`).
    Reboot,
    /// Freeze the vCPUs (`kiln pause`).
    Pause,
    /// Let paused vCPUs go on (`kiln resume`).
    Resume,
    /// End the VM if any and delete the volumes (`kiln terminate`).
    Terminate,
    /// Stop, saving RAM first (`kiln stop --hibernate`).
    Hibernate,
    /// Save the running VM (`kiln snapshot create`).
    Snapshot,
}

impl State {
    /// Every state, in the order of an instance's life.
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Running,
        State::Stopping,
        State::Stopped,
        State::Terminated,
    ];

    /// Whether a VMM process should be alive in this state.
    pub fn has_vmm(self) -> bool {
        matches!(self, State::Pending | State::Running | State::Stopping)
    }
}

impl Verb {
    /// Every verb, for tests that go through the whole table.
    pub const ALL: [Verb; 8] = [
        Verb::Start,
        Verb::Stop,
        Verb::Reboot,
        Verb::Pause,
        Verb::Resume,
        Verb::Terminate,
        Verb::Hibernate,
        Verb::Snapshot,
    ];
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Terminated => "terminated",
        };
        f.write_str(name)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Reboot => "reboot",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Terminate => "terminate",
            Verb::Hibernate => "hibernate",
            Verb::Snapshot => "snapshot",
        };
        f.write_str(name)
    }
}

/// A verb the state does not allow, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} an instance that is {state}: {why}")]
pub struct Refused {
    /// What was asked.
    pub verb: Verb,
    /// The state that does not allow it.
    pub state: State,
    /// Why not, and what to do instead.
    pub why: &'static str,
}

/// Checks `verb` against `state`; `Ok` carries the state the instance
/// moves to as the verb begins.
pub fn transition(state: State, verb: Verb) -> Result<State, Refused> {
    use State::*;
    use Verb::*;
    let refuse = |why| Err(Refused { verb, state, why });
    match (state, verb) {
        (Terminated, _) => refuse("it no longer exists"),
        (Stopped, Start) => Ok(Pending),
        (Pending | Running | Stopping, Start) => refuse("it is not stopped"),
        (Pending | Running, Stop) => Ok(Stopping),
        (Stopping, Stop) => refuse("it is already stopping"),
        (Stopped, Stop) => refuse("it is already stopped"),
        (Running, Reboot | Pause | Resume | Snapshot) => Ok(Running),
        // Its RAM is only worth saving once the guest has booted.
        (Running, Hibernate) => Ok(Stopping),
        (Pending | Stopping, Reboot | Pause | Resume | Snapshot | Hibernate) => {
            refuse("it is not running yet or any more")
        }
        (Stopped, Reboot | Pause | Resume | Snapshot | Hibernate) => {
            refuse("it is stopped; start it first")
        }
        (_, Terminate) => Ok(Terminated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out: every state × verb.
    #[test]
    fn every_state_and_verb() {
        use State::*;
        use Verb::*;
        let expected = |state, verb| -> Option<State> {
            match (state, verb) {
                (Stopped, Start) => Some(Pending),
                (Pending | Running, Stop) => Some(Stopping),
                (Running, Reboot | Pause | Resume | Snapshot) => Some(Running),
                (Running, Hibernate) => Some(Stopping),
                (Pending | Running | Stopping | Stopped, Terminate) => Some(Terminated),
                _ => None,
            }
        };
        let mut allowed = 0;
        for state in State::ALL {
            for verb in Verb::ALL {
                let got = transition(state, verb);
                assert_eq!(
                    got.clone().ok(),
                    expected(state, verb),
                    "{verb} when {state}"
                );
                match got {
                    Ok(_) => allowed += 1,
                    Err(refused) => {
                        let message = refused.to_string();
                        assert!(
                            message.contains(&verb.to_string())
                                && message.contains(&state.to_string()),
                            "{message}"
                        );
                    }
                }
            }
        }
        assert_eq!(allowed, 12);
    }

    #[test]
    fn states_serialize_as_lowercase_words() {
        assert_eq!(
            serde_json::to_string(&State::Stopped).unwrap(),
            "\"stopped\""
        );
        assert_eq!(
            serde_json::from_str::<State>("\"running\"").unwrap(),
            State::Running
        );
    }
}
