//! The unprivileged user that owns and runs the cluster.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::unistd::{geteuid, Gid, Uid, User};

/// The user a cluster's files and processes belong to.
#[derive(Debug, Clone)]
pub struct Owner {
    pub name: String,
    uid: Uid,
    gid: Gid,
}

/// Created when neither the current user nor `postgres` can own the cluster.
const CREATED_USER: &str = "engine-pg";

impl Owner {
    /// The current user, unless that is root: then `postgres` (made by the distribution's
    /// packages) or `engine-pg`, created here when missing.
    pub fn for_this_process() -> Result<Self, String> {
        let uid = geteuid();
        if !uid.is_root() {
            let user = User::from_uid(uid).ok().flatten();
            return Ok(Owner {
                name: user
                    .as_ref()
                    .map_or_else(|| uid.to_string(), |u| u.name.clone()),
                uid,
                gid: nix::unistd::getegid(),
            });
        }
        if let Some(user) = lookup("postgres")? {
            return Ok(user);
        }
        if let Some(user) = lookup(CREATED_USER)? {
            return Ok(user);
        }
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                CREATED_USER,
            ])
            .status()
            .map_err(|e| format!("running useradd to create user {CREATED_USER}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "useradd could not create user {CREATED_USER} ({status})"
            ));
        }
        lookup(CREATED_USER)?
            .ok_or_else(|| format!("user {CREATED_USER} is missing right after useradd"))
    }

    pub fn is_current(&self) -> bool {
        self.uid == geteuid()
    }

    /// Makes `cmd` run as this user (a no-op when it already is the current user).
    pub fn apply(&self, cmd: &mut Command) {
        if self.is_current() {
            return;
        }
        // std also drops root's supplementary groups when it changes the uid.
        cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        if let Some(home) = User::from_uid(self.uid).ok().flatten().map(|u| u.dir) {
            cmd.env("HOME", home);
        }
    }

    pub fn chown(&self, path: &Path) -> Result<(), String> {
        if self.is_current() {
            return Ok(());
        }
        std::os::unix::fs::chown(path, Some(self.uid.as_raw()), Some(self.gid.as_raw()))
            .map_err(|e| format!("chown {} to {}: {e}", path.display(), self.name))
    }
}

fn lookup(name: &str) -> Result<Option<Owner>, String> {
    let user = User::from_name(name).map_err(|e| format!("looking up user {name}: {e}"))?;
    Ok(user.map(|u| Owner {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
    }))
}
