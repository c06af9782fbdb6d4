//! Who a process runs as: `USER[:GROUP]` resolved in the guest's own
//! /etc/passwd and /etc/group, with the rules runc follows
//! (libcontainer's `GetExecUser`):
//!
//! - USER is a name (it must have a passwd entry) or a number (an entry
//!   is used when there is one, and none is needed);
//! - GROUP is a name (it must have a group entry) or a number; without
//!   one, the primary group is the passwd entry's, and the supplementary
//!   groups are every group that lists the user's name;
//! - HOME is the passwd entry's home directory, or `/`, unless the
//!   environment sets it; PATH is [`DEFAULT_PATH`] unless it is set.
use std::io;
use std::path::{Path, PathBuf};

use crate::config::RunConfig;

/// The PATH a process gets when its environment has none (runc's and
/// Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// /etc/passwd or /etc/group exists but could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A user name that /etc/passwd does not have.
    #[error("user {0:?}: no such user in /etc/passwd")]
    NoUser(String),
    /// A group name that /etc/group does not have.
    #[error("group {0:?}: no such group in /etc/group")]
    NoGroup(String),
}

/// The ids and home directory a process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary group ids (`setgroups`), the primary one first.
    pub groups: Vec<u32>,
    /// The passwd entry's home directory, if the user has one.
    pub home: Option<String>,
}

/// One line of /etc/passwd.
struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One line of /etc/group.
struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// The well-formed entries of an /etc/passwd; other lines are skipped,
/// as libc's getpwent skips them.
fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            [name, _, uid, gid, _, home, ..] if !name.starts_with('#') => Some(Passwd {
                name,
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
                home,
            }),
            _ => None,
        }
    })
}

/// The well-formed entries of an /etc/group.
fn group_entries(text: &str) -> impl Iterator<Item = Group<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            [name, _, gid, members, ..] if !name.starts_with('#') => Some(Group {
                name,
                gid: gid.parse().ok()?,
                members: members.split(',').filter(|m| !m.is_empty()).collect(),
            }),
            _ => None,
        }
    })
}

/// Resolves `spec` (`USER[:GROUP]`) against the two files' contents.
pub fn lookup(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| UserError::NoUser(user.to_string()))?,
        ),
    };
    let uid = entry
        .as_ref()
        .map_or_else(|| user.parse().unwrap_or(0), |e| e.uid);
    let (gid, mut groups) = match group_spec {
        Some(name) => (group_id(name, group)?, Vec::new()),
        None => {
            let gid = entry.as_ref().map_or(0, |e| e.gid);
            let member_of = entry.as_ref().map_or_else(Vec::new, |e| {
                group_entries(group)
                    .filter(|g| g.members.contains(&e.name))
                    .map(|g| g.gid)
                    .collect()
            });
            (gid, member_of)
        }
    };
    groups.retain(|&g| g != gid);
    groups.insert(0, gid);
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.map(|e| e.home.to_string()),
    })
}

/// A group's id: a number as it is, a name from /etc/group.
fn group_id(name: &str, group: &str) -> Result<u32, UserError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    group_entries(group)
        .find(|g| g.name == name)
        .map(|g| g.gid)
        .ok_or_else(|| UserError::NoGroup(name.to_string()))
}

/// Reads `root`'s `relative` file; a missing one reads as empty (an image
/// without /etc/passwd runs numeric users only).
fn read_or_empty(root: &Path, relative: &str) -> Result<String, UserError> {
    let path = root.join(relative);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UserError::Read { path, source }),
    }
}

/// The identity a configuration runs with, looked up under `root`: its
/// `user` when it has one, else `UID:GID` of its `uid` and `gid`.
pub fn resolve(config: &RunConfig, root: &Path) -> Result<Identity, UserError> {
    let spec = match &config.user {
        Some(spec) => spec.clone(),
        None => format!("{}:{}", config.uid, config.gid),
    };
    lookup(
        &spec,
        &read_or_empty(root, "etc/passwd")?,
        &read_or_empty(root, "etc/group")?,
    )
}

/// `config` made ready to start as `identity`: `uid`, `gid` and
/// `groups` set, `user` cleared, HOME and PATH given defaults.
pub fn apply(config: &mut RunConfig, identity: Identity) {
    config.uid = identity.uid;
    config.gid = identity.gid;
    config.groups = identity.groups;
    config.user = None;
    let home = identity.home.filter(|h| !h.is_empty());
    config
        .env
        .entry("HOME".into())
        .or_insert_with(|| home.unwrap_or_else(|| "/".into()));
    config
        .env
        .entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          broken line\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:root,app\naudio:x:29:app\n";

    fn id(uid: u32, gid: u32, groups: &[u32], home: Option<&str>) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.map(String::from),
        }
    }

    #[test]
    fn names_resolve_with_their_groups_and_home() {
        assert_eq!(
            lookup("app", PASSWD, GROUP).unwrap(),
            id(1000, 1000, &[1000, 10, 29], Some("/home/app"))
        );
        // An explicit group replaces the membership-derived ones.
        assert_eq!(
            lookup("app:wheel", PASSWD, GROUP).unwrap(),
            id(1000, 10, &[10], Some("/home/app"))
        );
        assert_eq!(
            lookup("1000:29", PASSWD, GROUP).unwrap(),
            id(1000, 29, &[29], Some("/home/app"))
        );
    }

    #[test]
    fn numbers_need_no_entry_and_names_do() {
        assert_eq!(
            lookup("4242", PASSWD, GROUP).unwrap(),
            id(4242, 0, &[0], None)
        );
        assert_eq!(
            lookup("4242:4343", "", "").unwrap(),
            id(4242, 4343, &[4343], None)
        );
        let err = lookup("nobody", PASSWD, GROUP).unwrap_err().to_string();
        assert!(
            err.contains("\"nobody\"") && err.contains("/etc/passwd"),
            "{err}"
        );
        let err = lookup("app:staff", PASSWD, GROUP).unwrap_err().to_string();
        assert!(
            err.contains("\"staff\"") && err.contains("/etc/group"),
            "{err}"
        );
    }

    #[test]
    fn a_numeric_config_gets_the_users_home_and_path() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(root.path().join("etc/group"), GROUP).unwrap();
        let mut config = RunConfig::new(vec!["/bin/id".into()]);
        (config.uid, config.gid) = (1000, 1000);
        config.env.clear();
        let identity = resolve(&config, root.path()).unwrap();
        assert_eq!(identity, id(1000, 1000, &[1000], Some("/home/app")));
        apply(&mut config, identity);
        assert_eq!(config.env["HOME"], "/home/app");
        assert_eq!(config.env["PATH"], DEFAULT_PATH);
        config.user = Some("root".into());
        config.env.insert("HOME".into(), "/kept".into());
        let identity = resolve(&config, root.path()).unwrap();
        apply(&mut config, identity);
        assert_eq!((config.uid, config.gid, config.user), (0, 0, None));
        assert_eq!(config.groups, [0, 10]);
        assert_eq!(config.env["HOME"], "/kept");
        // No /etc at all: numbers still work.
        let empty = tempfile::tempdir().unwrap();
        config.user = Some("7:8".into());
        assert_eq!(
            resolve(&config, empty.path()).unwrap(),
            id(7, 8, &[8], None)
        );
    }
}
