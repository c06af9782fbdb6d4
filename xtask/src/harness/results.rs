//! The scenarios' result lines, parsed.
//!
//! Each check prints one line, `KILN-TEST <scenario>/<check> ok` or
//! `KILN-TEST <scenario>/<check> FAIL <reason>`; the runner ends with
//! `KILN-DONE`. Anything else on the console is the guests' own output.

/// What a run reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Names of the checks that passed.
    pub passed: Vec<String>,
    /// Names and reasons of the checks that failed.
    pub failed: Vec<(String, String)>,
    /// Whether the runner reached its end marker.
    pub done: bool,
    /// Whether the run was killed for printing nothing for too long: the
    /// test machine had stopped, not a check.
    pub stalled: bool,
}

const TEST_PREFIX: &str = "KILN-TEST ";
const DONE_MARKER: &str = "KILN-DONE";

impl Summary {
    /// Takes one console line into account.
    pub fn take_line(&mut self, line: &str) {
        // Serial consoles may add carriage returns or prefix the kernel's noise.
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim() == DONE_MARKER {
            self.done = true;
            return;
        }
        let Some(start) = line.find(TEST_PREFIX) else {
            return;
        };
        let rest = &line[start + TEST_PREFIX.len()..];
        let (name, verdict) = rest.split_once(' ').unwrap_or((rest, ""));
        match verdict
            .split_once(' ')
            .map_or((verdict, ""), |(v, r)| (v, r))
        {
            ("ok", _) => self.passed.push(name.to_string()),
            ("FAIL", reason) => self.failed.push((name.to_string(), reason.to_string())),
            _ => self
                .failed
                .push((name.to_string(), format!("unreadable result line: {line}"))),
        }
    }

    /// Adds a later run's results to these; its end is the end.
    pub fn absorb(&mut self, later: Summary) {
        self.passed.extend(later.passed);
        self.failed.extend(later.failed);
        self.done = later.done;
        self.stalled = later.stalled;
    }

    /// These results without those of `scenario`.
    pub fn without_scenario(mut self, scenario: &str) -> Summary {
        let prefix = format!("{scenario}/");
        self.passed.retain(|name| !name.starts_with(&prefix));
        self.failed.retain(|(name, _)| !name.starts_with(&prefix));
        self
    }

    /// True when every check passed, at least one ran, and the runner finished.
    pub fn success(&self) -> bool {
        self.done && self.failed.is_empty() && !self.passed.is_empty()
    }

    /// The closing line: `N passed, M failed`.
    pub fn closing_line(&self) -> String {
        format!("{} passed, {} failed", self.passed.len(), self.failed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(text: &str) -> Summary {
        let mut summary = Summary::default();
        text.lines().for_each(|line| summary.take_line(line));
        summary
    }

    #[test]
    fn passes_failures_and_noise() {
        let s = summary(
            "[    0.1] Linux version 6.1\nKILN-TEST boot/line ok\r\n\
             hello from the guest\nKILN-TEST boot/exit FAIL expected 3, got 0\nKILN-DONE\n",
        );
        assert_eq!(s.passed, ["boot/line"]);
        assert_eq!(
            s.failed,
            [("boot/exit".to_string(), "expected 3, got 0".to_string())]
        );
        assert!(s.done);
        assert!(!s.success());
        assert_eq!(s.closing_line(), "1 passed, 1 failed");
    }

    #[test]
    fn a_run_without_the_end_marker_or_any_check_fails() {
        assert!(!summary("KILN-TEST a/b ok\n").success());
        assert!(!summary("KILN-DONE\n").success());
        assert!(summary("KILN-TEST a/b ok\nKILN-DONE\n").success());
    }

    #[test]
    fn garbled_result_lines_count_as_failures() {
        let s = summary("KILN-TEST a/b maybe\nKILN-TEST lonely\nKILN-DONE\n");
        assert_eq!(s.failed.len(), 2);
        assert!(s.failed[0].1.contains("unreadable"));
    }

    #[test]
    fn a_result_after_kernel_noise_on_the_same_line_still_counts() {
        let s = summary("[  1.2] random: crng init done KILN-TEST a/b ok\n");
        assert_eq!(s.passed, ["a/b"]);
    }

    #[test]
    fn a_stopped_scenario_s_results_are_dropped_and_a_later_run_absorbed() {
        let first = summary("KILN-TEST a/x ok\nKILN-TEST b/y ok\nKILN-TEST b/z FAIL no\n");
        let mut total = Summary::default();
        total.absorb(first.without_scenario("b"));
        assert_eq!(
            (total.passed.len(), total.failed.len(), total.done),
            (1, 0, false)
        );
        total.absorb(summary("KILN-TEST b/y ok\nKILN-TEST b/z ok\nKILN-DONE\n"));
        assert_eq!(total.passed, ["a/x", "b/y", "b/z"]);
        assert!(total.success());
    }
}
