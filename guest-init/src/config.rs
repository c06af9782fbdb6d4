//! The run configuration: what guest-init starts, and how.
//!
//! The image builder writes it as JSON at [`CONFIG_PATH`]:
//!
//! ```json
//! {
//!   "entrypoint": ["/bin/sh", "-c"],
//!   "cmd": ["echo hello; exit 3"],
//!   "env": {"PATH": "/usr/local/bin:/usr/bin:/bin"},
//!   "workdir": "/",
//!   "uid": 0,
//!   "gid": 0,
//!   "user": "nobody:nogroup",
//!   "hostname": "kiln"
//! }
//! ```
//!
//! The program run is `entrypoint` followed by `cmd` (Docker's Entrypoint
//! and Cmd: `kiln run IMAGE -- CMD…` replaces only `cmd`); together they
//! must name a program (`argv[0]` absolute or found in `PATH`). `user`,
//! when present, is `USER[:GROUP]` by name or number, looked up in the
//! image's /etc/passwd and /etc/group when the process starts
//! (`guest_init::user`), and takes the place of `uid` and `gid`. Every
//! field but one of `entrypoint` and `cmd` is optional, with the defaults
//! shown (`user`: none; `cmd`: empty).
//!
//! ## Overrides from the kernel command line
//! guest-init reads `/proc/cmdline` itself: the kernel drops dotted
//! parameters it does not know instead of passing them to init.
//! - `kiln.entrypoint=PROG` or `kiln.entrypoint="PROG ARG…"` (split on
//!   spaces): the whole argv (`cmd` is dropped)
//! - `kiln.cmd="ARG…"`: replaces `cmd`; words split on spaces, each then
//!   percent-decoded (`%20` a space, `%22` a double quote, `%25` a `%`), so
//!   that any argv survives the command line (`kiln run IMAGE -- CMD…`)
//! - `kiln.workdir=/DIR`, `kiln.hostname=NAME`
//! - `kiln.user=USER[:GROUP]` (percent-decoded): replaces `user`
//! - `kiln.env=KEY=VALUE` (repeatable; adds or replaces one variable)
//!
//! With an entrypoint on the command line, the file may be absent. The
//! network's words (`kiln.net.*`) are not part of the run configuration:
//! `guest_init::network` reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the image builder puts the run configuration.
pub const CONFIG_PATH: &str = "/etc/kiln/init.json";

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Why a run configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON does not parse or has unknown fields.
    #[error("invalid JSON")]
    Json(#[source] serde_json::Error),
    /// A field parsed but its value is not acceptable.
    #[error("field `{field}`: {problem}")]
    Field {
        /// The field's name in the JSON.
        field: &'static str,
        /// Its value, and what was expected instead.
        problem: String,
    },
    /// A `kiln.*` kernel parameter is malformed.
    #[error("kernel parameter `{param}`: {problem}")]
    Cmdline {
        /// The parameter as the command line has it (`kiln.env=NOEQUALS`).
        param: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// How guest-init starts the entrypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The program and its first arguments. Once [`RunConfig::resolve`]d,
    /// the whole argv: `cmd` appended, and never empty.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Arguments after `entrypoint`, the part a run's command replaces
    /// (Docker's Cmd); empty once resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// The entrypoint's whole environment.
    #[serde(default = "default_env")]
    pub env: BTreeMap<String, String>,
    /// Its working directory (absolute).
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// The user it runs as.
    #[serde(default)]
    pub uid: u32,
    /// The group it runs as.
    #[serde(default)]
    pub gid: u32,
    /// `USER[:GROUP]`, names or numbers, resolved in the guest's
    /// /etc/passwd and /etc/group; set, it replaces `uid` and `gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Supplementary group ids, filled in when `user` is resolved
    /// (`guest_init::user::apply`); never in the file.
    #[serde(skip)]
    pub groups: Vec<u32>,
    /// The guest's hostname.
    #[serde(default = "default_hostname")]
    pub hostname: String,
}

fn default_env() -> BTreeMap<String, String> {
    BTreeMap::from([("PATH".to_string(), DEFAULT_PATH.to_string())])
}

fn default_workdir() -> String {
    "/".to_string()
}

fn default_hostname() -> String {
    "kiln".to_string()
}

impl RunConfig {
    /// A configuration that runs `entrypoint` with every default.
    pub fn new(entrypoint: Vec<String>) -> Self {
        RunConfig {
            entrypoint,
            cmd: Vec::new(),
            env: default_env(),
            workdir: default_workdir(),
            uid: 0,
            gid: 0,
            user: None,
            groups: Vec::new(),
            hostname: default_hostname(),
        }
    }

    /// Parses and validates the JSON file's contents.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: RunConfig = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// The JSON the image builder writes (validated first).
    pub fn to_json_pretty(&self) -> Result<String, ConfigError> {
        self.validate()?;
        serde_json::to_string_pretty(self).map_err(ConfigError::Json)
    }

    /// The program and its arguments: `entrypoint` then `cmd`.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// The configuration guest-init runs: the file's (if any) with the
    /// command line's `kiln.*` overrides applied, validated, and `cmd`
    /// appended to `entrypoint`.
    pub fn resolve(file: Option<&[u8]>, cmdline: &str) -> Result<Self, ConfigError> {
        let params = kiln_params(cmdline)?;
        let has_entrypoint = params
            .iter()
            .any(|(key, _)| matches!(*key, "entrypoint" | "cmd"));
        let mut config = match file {
            Some(bytes) => Self::from_json(bytes)?,
            None if has_entrypoint => Self::new(Vec::new()),
            None => {
                return Err(ConfigError::Field {
                    field: "entrypoint",
                    problem: "the file is missing and no kiln.entrypoint= was given".to_string(),
                });
            }
        };
        for (key, value) in params {
            config.apply(key, value)?;
        }
        config.validate()?;
        config.entrypoint = config.argv();
        config.cmd.clear();
        Ok(config)
    }

    /// The base of a container VM's processes (`kiln.container=1`: the
    /// containerd shim runs each of them through the exec port, with its
    /// own argv): no entrypoint, the command line's `kiln.*` overrides
    /// (the hostname above all) applied.
    pub fn for_container(cmdline: &str) -> Result<Self, ConfigError> {
        let mut config = Self::new(Vec::new());
        for (key, value) in kiln_params(cmdline)? {
            config.apply(key, value)?;
        }
        Ok(config)
    }

    fn apply(&mut self, key: &str, value: String) -> Result<(), ConfigError> {
        match key {
            "entrypoint" => {
                self.entrypoint = words(&value).map(String::from).collect();
                self.cmd.clear();
            }
            "cmd" => {
                self.cmd = words(&value)
                    .map(|word| percent_decoded(word, "cmd"))
                    .collect::<Result<_, _>>()?
            }
            "user" => self.user = Some(percent_decoded(&value, "user")?),
            "workdir" => self.workdir = value,
            "hostname" => self.hostname = value,
            "env" => {
                let (name, val) = value.split_once('=').ok_or_else(|| ConfigError::Cmdline {
                    param: format!("kiln.env={value}"),
                    problem: "expected kiln.env=KEY=VALUE",
                })?;
                self.env.insert(name.to_string(), val.to_string());
            }
            // Other kiln.* parameters are read elsewhere: by the VMM
            // (kiln.vmm), `metadata` (kiln.meta.*, kiln.user-data) and
            // `network` (kiln.net.*).
            _ => {}
        }
        Ok(())
    }

    /// Checks every field's value (what [`RunConfig::from_json`] and
    /// [`RunConfig::resolve`] check).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |field, problem: &str| ConfigError::Field {
            field,
            problem: problem.to_string(),
        };
        if self
            .entrypoint
            .iter()
            .chain(&self.cmd)
            .next()
            .is_none_or(|prog| prog.is_empty())
        {
            return Err(field(
                "entrypoint",
                "with cmd, must name a program (a non-empty argv)",
            ));
        }
        if self.user.as_deref().is_some_and(str::is_empty) {
            return Err(field("user", "must be USER[:GROUP], got an empty string"));
        }
        if let Some(key) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(field("env", &format!("invalid variable name {key:?}")));
        }
        if !self.workdir.starts_with('/') {
            return Err(field(
                "workdir",
                &format!("must be an absolute path, got {:?}", self.workdir),
            ));
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return Err(field("hostname", "must be 1 to 64 bytes long"));
        }
        Ok(())
    }
}

/// A parameter's words: split on spaces, empty ones dropped.
fn words(value: &str) -> impl Iterator<Item = &str> {
    value.split(' ').filter(|word| !word.is_empty())
}

/// `word` with each `%XX` (two hex digits) replaced by that byte; the
/// bytes must make UTF-8.
fn percent_decoded(word: &str, key: &'static str) -> Result<String, ConfigError> {
    let bad = |problem| ConfigError::Cmdline {
        param: format!("kiln.{key}={word}"),
        problem,
    };
    let mut bytes = Vec::with_capacity(word.len());
    let mut rest = word.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            bytes.push(byte);
            rest = tail;
            continue;
        }
        let hex = tail
            .get(..2)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("expected %XX with two hex digits after each %"))?;
        bytes.push(hex);
        rest = &tail[2..];
    }
    String::from_utf8(bytes).map_err(|_| bad("the decoded bytes are not UTF-8"))
}

/// `word` as [`percent_decoded`] reads it back: `%`, `"`, spaces and
/// control characters escaped, everything else as it is. What the host
/// writes for `kiln.cmd=` and `kiln.user=`.
pub fn percent_encoded(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '%' || c == '"' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `kiln.KEY=VALUE` parameters of a kernel command line, in order,
/// with one level of double quotes removed from values.
pub fn kiln_params(cmdline: &str) -> Result<Vec<(&str, String)>, ConfigError> {
    let mut params = Vec::new();
    for word in split_cmdline(cmdline) {
        let Some(rest) = word.strip_prefix("kiln.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        params.push((key, value.replace('"', "")));
    }
    // A quote left open swallows the rest of the line: say so.
    if cmdline.matches('"').count() % 2 == 1 {
        return Err(ConfigError::Cmdline {
            param: cmdline.trim().to_string(),
            problem: "unbalanced double quote",
        });
    }
    Ok(params)
}

/// Splits like the kernel's `next_arg`: on spaces outside double quotes.
fn split_cmdline(cmdline: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in cmdline.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    words.push(&cmdline[s..i]);
                }
                continue;
            }
            _ => {}
        }
        start.get_or_insert(i);
    }
    if let Some(s) = start {
        words.push(&cmdline[s..]);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_the_documented_defaults() {
        let config = RunConfig::from_json(br#"{"entrypoint": ["/bin/hello"]}"#).unwrap();
        assert_eq!(config, RunConfig::new(vec!["/bin/hello".into()]));
        assert_eq!(config.env["PATH"], DEFAULT_PATH);
        assert_eq!(
            (config.workdir.as_str(), config.uid, config.gid),
            ("/", 0, 0)
        );
        assert_eq!(config.hostname, "kiln");
    }

    #[test]
    fn full_file_round_trips_through_json() {
        let mut config = RunConfig::new(vec!["/bin/sh".into(), "-c".into(), "exit 3".into()]);
        config.env.insert("GREETING".into(), "hi there".into());
        config.workdir = "/srv".into();
        (config.uid, config.gid) = (1000, 100);
        let json = config.to_json_pretty().unwrap();
        assert_eq!(RunConfig::from_json(json.as_bytes()).unwrap(), config);
    }

    #[test]
    fn bad_files_name_the_field() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"entrypoint": []}"#, "entrypoint"),
            (br#"{"entrypoint": [""]}"#, "entrypoint"),
            (br#"{"entrypoint": ["/x"], "workdir": "srv"}"#, "workdir"),
            (br#"{"entrypoint": ["/x"], "env": {"A=B": "c"}}"#, "env"),
            (br#"{"entrypoint": ["/x"], "hostname": ""}"#, "hostname"),
            (br#"{"entrypoint": ["/x"], "colour": "red"}"#, "colour"),
        ];
        for (json, field) in cases {
            let err = crate::one_line(&RunConfig::from_json(json).unwrap_err());
            assert!(err.contains(field), "{err} should name {field}");
        }
        assert!(matches!(
            RunConfig::from_json(b"{"),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn cmdline_overrides_apply_in_order() {
        let file = br#"{"entrypoint": ["/bin/app"], "env": {"A": "1"}}"#;
        let cmdline = "console=ttyS0 kiln.vmm=1 kiln.entrypoint=/tests/exit7.sh kiln.env=A=2 \
                       kiln.env=B=x=y kiln.workdir=/tmp kiln.hostname=box quiet\n";
        let config = RunConfig::resolve(Some(file), cmdline).unwrap();
        assert_eq!(config.entrypoint, ["/tests/exit7.sh"]);
        assert_eq!(config.env["A"], "2");
        assert_eq!(config.env["B"], "x=y");
        assert_eq!(
            (config.workdir.as_str(), config.hostname.as_str()),
            ("/tmp", "box")
        );
    }

    #[test]
    fn quoted_entrypoint_splits_on_spaces() {
        let config =
            RunConfig::resolve(None, r#"ro kiln.entrypoint="/bin/sh /tests/x.sh  arg" rw"#)
                .unwrap();
        assert_eq!(config.entrypoint, ["/bin/sh", "/tests/x.sh", "arg"]);
        assert_eq!(config.env, default_env());
    }

    #[test]
    fn missing_file_without_override_and_bad_params_are_errors() {
        let err = RunConfig::resolve(None, "console=ttyS0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("file is missing"), "{err}");
        let err = RunConfig::resolve(None, "kiln.entrypoint=/x kiln.env=NOEQUALS").unwrap_err();
        assert!(err.to_string().contains("kiln.env=NOEQUALS"), "{err}");
        let err = RunConfig::resolve(None, r#"kiln.entrypoint="/x"#).unwrap_err();
        assert!(err.to_string().contains("unbalanced"), "{err}");
    }

    #[test]
    fn cmd_follows_entrypoint_and_its_override_replaces_only_cmd() {
        let file = br#"{"entrypoint": ["/entry.sh"], "cmd": ["serve", "--port", "80"]}"#;
        let config = RunConfig::resolve(Some(file), "").unwrap();
        assert_eq!(config.entrypoint, ["/entry.sh", "serve", "--port", "80"]);
        assert!(config.cmd.is_empty());
        let args = ["sh", "-c", "echo \"100%\" done"]
            .map(percent_encoded)
            .join(" ");
        let config =
            RunConfig::resolve(Some(file), &format!("kiln.cmd=\"{args}\" kiln.user=nobody"))
                .unwrap();
        assert_eq!(
            config.entrypoint,
            ["/entry.sh", "sh", "-c", "echo \"100%\" done"]
        );
        assert_eq!(config.user.as_deref(), Some("nobody"));
        // An image of Cmd only runs it; kiln.entrypoint= replaces both.
        let cmd_only = br#"{"cmd": ["/bin/sh"]}"#;
        assert_eq!(
            RunConfig::resolve(Some(cmd_only), "").unwrap().entrypoint,
            ["/bin/sh"]
        );
        let config = RunConfig::resolve(Some(file), "kiln.entrypoint=/bin/true").unwrap();
        assert_eq!(config.entrypoint, ["/bin/true"]);
        let err = RunConfig::resolve(Some(file), "kiln.cmd=%zz").unwrap_err();
        assert!(err.to_string().contains("kiln.cmd=%zz"), "{err}");
        let err = RunConfig::resolve(Some(br#"{"cmd": []}"#), "").unwrap_err();
        assert!(err.to_string().contains("entrypoint"), "{err}");
    }

    #[test]
    fn split_follows_quotes() {
        assert_eq!(split_cmdline(r#"a b="c d" e"#), ["a", r#"b="c d""#, "e"]);
        assert_eq!(split_cmdline("  "), Vec::<&str>::new());
    }
}
